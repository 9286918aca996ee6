"""One training step (forward and backward over micro-batches, clipping) and a validation pass."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from llama.training.data import TokenWindows


def loss_on(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 of (bs, seq_len + 1) token windows."""
    return model(tokens[:, :-1], targets=tokens[:, 1:])


def forward_backward(model, data: TokenWindows, windows, micro_batch: int, device, max_norm: float):
    """Accumulates the gradient of this rank's windows in micro-batches and clips it; returns the global mean
    loss and the gradient norm before clipping (both over all ranks)."""
    micro_batches = [windows[i : i + micro_batch] for i in range(0, len(windows), micro_batch)]
    loss_sum = torch.zeros((), device=device)
    for chunk in micro_batches:
        loss = loss_on(model, data.batch(chunk).to(device)) / len(micro_batches)
        loss.backward()  # FSDP averages the gradients over ranks
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor: all shards
    return loss_sum.item(), grad_norm.item()


@torch.no_grad()
def evaluate(model, val: TokenWindows, windows_per_pass: int, micro_batch: int, device) -> float:
    """Mean loss over the first ``windows_per_pass`` windows of the validation split (or all of it), from the
    chunked loss's per-token values (the logits never exist whole)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    count = min(windows_per_pass, len(val))
    per_rank = math.ceil(count / world)  # every rank runs the same number of forwards (FSDP's gathers are collective)
    windows = list(range(rank * per_rank, (rank + 1) * per_rank))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, windows)
    for i in range(0, per_rank, micro_batch):
        chunk = windows[i : i + micro_batch]
        tokens = val.batch([w % len(val) for w in chunk]).to(device)  # (bs, seq_len + 1)
        per_token = model(tokens[:, :-1], targets=tokens[:, 1:], reduction="none")  # (bs, seq_len)
        per_window = per_token.mean(-1)  # (bs,)
        # windows past `count` only pad the last ranks' work: they weigh nothing, so the mean does not depend
        # on the number of processes
        counted = torch.tensor([w < count for w in chunk], dtype=torch.float64, device=device)
        total += torch.stack([(per_window.double() * counted).sum(), counted.sum()])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()
