"""One training step (forward and backward over micro-batches, clipping) and a validation pass."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from llama.loss import IGNORE_INDEX
from llama.training.data import Batch


def loss_on(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 of (bs, seq_len + 1) token windows."""
    return model(tokens[:, :-1], targets=tokens[:, 1:])


def trained_tokens(batch: Batch) -> int:
    return int((batch.targets != IGNORE_INDEX).sum())


def global_count(count: float, device) -> float:
    """``count`` summed over all processes."""
    total = torch.tensor(float(count), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def forward_backward(model, data, windows, micro_batch: int, device, max_norm: float):
    """Accumulates the gradient of this rank's windows (``data.training_batch``) in micro-batches and clips it;
    returns the global loss and the gradient norm before clipping (both over all ranks).

    The loss is normalised by the number of trained tokens in the whole global batch, counted first over every
    micro-batch of every process: each micro-batch contributes its summed token losses / that count. So a token
    weighs the same whatever micro-batch or process it lands in, and whatever the lengths of its neighbours (an
    average per micro-batch would overweight the tokens of short samples)."""
    batches = [data.training_batch(windows[i : i + micro_batch]) for i in range(0, len(windows), micro_batch)]
    total = global_count(sum(trained_tokens(b) for b in batches), device)
    world = dist.get_world_size()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        loss = model(batch.inputs, input_pos=batch.positions, mask=batch.mask, targets=batch.targets,
                     reduction="sum") / total
        (loss * world).backward()  # FSDP averages the gradients over ranks: their sum is wanted
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor: all shards
    return loss_sum.item(), grad_norm.item()


@torch.no_grad()
def evaluate(model, val, windows_per_pass: int, micro_batch: int, device) -> float:
    """Mean loss per trained token over the first ``windows_per_pass`` windows of the validation split (or all of
    it), from the chunked loss's per-token values (the logits never exist whole)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    count = min(windows_per_pass, len(val))
    per_rank = math.ceil(count / world)  # every rank runs the same number of forwards (FSDP's gathers are collective)
    windows = list(range(rank * per_rank, (rank + 1) * per_rank))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, trained tokens)
    for i in range(0, per_rank, micro_batch):
        chunk = windows[i : i + micro_batch]
        batch = val.training_batch([w % len(val) for w in chunk]).to(device)
        per_token = model(batch.inputs, input_pos=batch.positions, mask=batch.mask, targets=batch.targets,
                          reduction="none")  # (bs, seq_len)
        # windows past `count` only pad the last ranks' work: they weigh nothing, so the mean does not depend
        # on the number of processes
        counted = torch.tensor([w < count for w in chunk], device=device)[:, None] & (batch.targets != IGNORE_INDEX)
        total += torch.stack([per_token.double()[counted].sum(), counted.sum().double()])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()
