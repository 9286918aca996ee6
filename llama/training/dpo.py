"""Direct preference optimisation (Rafailov et al., 2023): a step over preference pairs and its validation.

For a prompt x with a chosen answer y_w and a rejected one y_l, the policy's and the reference's log-probabilities
of each answer give the loss

    -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

averaged over the pairs of the global batch. beta * (log pi - log ref) is an answer's implicit reward; the logged
reward margin is the chosen's minus the rejected's, and the accuracy the share of pairs where it is positive.
An answer's log-probability is the sum over its trained tokens (``llama.training.packing.PreferencePairs``).

The reference is the starting model: under LoRA the same model with its adapters disabled
(``llama.transforms.lora.adapters_disabled``), else a frozen copy made before training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama.training.data import Batch
from llama.transforms.lora import adapters_disabled, lora_layers

METRICS = ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (loss, chosen reward, rejected reward) from the answers' summed log-probabilities."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


def answer_logps(model, batch: Batch) -> torch.Tensor:
    """(rows,) summed log-probability of each row's trained tokens."""
    per_token = model(batch.inputs, input_pos=batch.positions, mask=batch.mask, targets=batch.targets,
                      reduction="none")
    return -per_token.sum(-1)


def reference_logps(model, reference, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        if reference is not None:
            return answer_logps(reference, batch)
        with adapters_disabled(model):
            return answer_logps(model, batch)


def check_reference(model, reference) -> None:
    if reference is None and not any(True for _ in lora_layers(model)):
        raise ValueError("DPO needs a reference: a frozen copy of the model, or LoRA adapters to disable")


def _pairs_metrics(model, reference, batch: Batch, beta: float):
    k = batch.inputs.shape[0] // 2
    policy = answer_logps(model, batch)
    ref = reference_logps(model, reference, batch)
    losses, chosen, rejected = dpo_loss(policy[:k], policy[k:], ref[:k], ref[k:], beta)
    sums = torch.stack([losses.detach().sum(), (chosen - rejected).sum(), (chosen > rejected).sum(), chosen.sum(),
                        rejected.sum()]).double()
    return losses, sums


def forward_backward(model, data, windows, micro_batch: int, device, max_norm: float, beta: float,
                     reference=None) -> tuple[float, float, dict]:
    """Accumulates the DPO gradient of this rank's pairs in micro-batches of pairs and clips it; returns the loss,
    the gradient norm before clipping and the reward metrics, all over the global batch."""
    check_reference(model, reference)
    world = dist.get_world_size()
    pairs = len(windows) * world
    sums = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
    for i in range(0, len(windows), micro_batch):
        batch = data.training_batch(windows[i : i + micro_batch]).to(device)
        losses, batch_sums = _pairs_metrics(model, reference, batch, beta)
        (losses.sum() / pairs * world).backward()  # FSDP averages the gradients over ranks: their sum is wanted
        sums += batch_sums
    dist.all_reduce(sums)
    metrics = dict(zip(METRICS, (sums / pairs).tolist()))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return metrics.pop("loss"), grad_norm.item(), metrics


@torch.no_grad()
def evaluate(model, val, pairs_per_pass: int, micro_batch: int, device, beta: float, reference=None) -> dict:
    """The DPO metrics over the first ``pairs_per_pass`` pairs of the validation split, as ``val_*``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    count = min(pairs_per_pass, len(val))
    per_rank = -(-count // world)
    windows = list(range(rank * per_rank, (rank + 1) * per_rank))
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=device)
    for i in range(0, per_rank, micro_batch):
        chunk = windows[i : i + micro_batch]
        batch = val.training_batch([w % len(val) for w in chunk]).to(device)
        k = len(chunk)
        policy, ref = answer_logps(model, batch), reference_logps(model, reference, batch)
        losses, chosen, rejected = dpo_loss(policy[:k], policy[k:], ref[:k], ref[k:], beta)
        counted = torch.tensor([w < count for w in chunk], dtype=torch.float64, device=device)
        values = torch.stack([losses, chosen - rejected, (chosen > rejected).to(losses.dtype), chosen, rejected])
        sums += torch.cat([(values.double() * counted).sum(-1), counted.sum()[None]])
    dist.all_reduce(sums)
    return {f"val_{name}": (value / sums[-1]).item() for name, value in zip(METRICS, sums[:-1])}
