"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import torch


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """Refuse settings that have no meaning, before any work is done."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 means no limit), got {top_k}")


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (bs,) from logits (bs, vocab_size). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs_sorted, order = probs.sort(dim=-1, descending=True)
    if top_k:
        probs_sorted[:, top_k:] = 0.0
    # Nucleus: keep the smallest prefix whose mass reaches top_p (the token that crosses it is kept).
    mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
    probs_sorted[mass_before > top_p] = 0.0
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i / sum(p), like
    # torch.multinomial, but without a host synchronisation (which multinomial's checks need on CUDA).
    race = torch.empty_like(probs_sorted).exponential_(generator=generator)
    choice = (probs_sorted / race).argmax(dim=-1, keepdim=True)
    return order.gather(-1, choice).squeeze(-1)
