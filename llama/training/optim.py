"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from functools import partial

import torch

from llama.training.config import LRConfig, OptimizerConfig


def build_optimizer(model, opt: OptimizerConfig) -> torch.optim.AdamW:
    """Fused AdamW with weight decay on matrices only: norms and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "tok_embeddings" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, fused=True)


def lr_factor(completed: int, lr: LRConfig, total_steps: int) -> float:
    """Learning rate of update number ``completed + 1``, as a fraction of the peak."""
    step = completed + 1
    if step <= lr.warmup_steps:
        return step / lr.warmup_steps
    floor = lr.min_lr_ratio
    if lr.schedule == "cosine":
        progress = (step - lr.warmup_steps) / max(1, total_steps - lr.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if lr.schedule == "wsd":
        decay_steps = max(1, round(lr.decay_fraction * total_steps))
        into_decay = step - (total_steps - decay_steps)
        return 1.0 if into_decay <= 0 else 1 - (1 - floor) * min(into_decay / decay_steps, 1.0)
    return 1.0


def build_scheduler(optimizer, lr: LRConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, lr=lr, total_steps=total_steps))
