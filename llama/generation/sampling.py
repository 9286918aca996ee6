"""Choosing the next token of each row from its logits, each row with its own settings and random stream: greedy,
temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llama.generation.text import stop_strings


@dataclass
class SamplingParams:
    """How one request samples and when it stops."""

    temperature: float = 0.6  # 0: greedy (argmax)
    top_p: float = 0.9  # keep the smallest set of tokens whose probability reaches top_p (1: all)
    top_k: int = 0  # keep the k most likely tokens (0: no limit)
    max_tokens: int | None = None  # tokens to generate at most (None: until the context is full)
    stop: tuple[str, ...] = ()  # strings that end the completion; the text is cut before the first one
    seed: int | None = None  # this request's own random stream (None: drawn from the engine's)
    logprobs: bool = False  # report each generated token's logprob
    stop_ids: tuple[int, ...] = ()  # token ids that end the completion, besides the tokenizer's stop ids

    def __post_init__(self):
        self.stop = stop_strings(self.stop)
        self.stop_ids = tuple(self.stop_ids)
        self.check()

    def check(self) -> None:
        """Refuse settings that have no meaning, before any work is done."""
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 means no limit), got {self.top_k}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise ValueError(f"max_gen_len must be an integer >= 0, got {self.max_tokens}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {list(self.stop)}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_ids):
            raise ValueError(f"stop_ids must be token ids (integers >= 0), got {list(self.stop_ids)}")


@dataclass
class RowSampler:
    """The settings and random stream of one row."""

    params: SamplingParams
    generator: torch.Generator = field(repr=False)


def sample(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """Next token ids (n,) from logits (n, vocab_size), row i sampled as ``rows[i]`` says."""
    temperatures = [r.params.temperature for r in rows]
    if not any(temperatures):
        return logits.argmax(dim=-1)
    device = logits.device
    temperature = torch.tensor([t or 1.0 for t in temperatures], device=device)[:, None]
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i / sum(p), like
    # torch.multinomial, but without a host synchronisation (which multinomial's checks need on CUDA). Each row
    # draws from its own generator, one draw per token id, so its tokens do not depend on the other rows of the
    # batch (nor on whether another row's top-k or top-p has the batch sorted).
    race = torch.ones_like(probs)
    for i, row in enumerate(rows):
        if temperatures[i]:
            race[i].exponential_(generator=row.generator)
    if any(r.params.top_p < 1 or r.params.top_k for r in rows):
        probs_sorted, order = probs.sort(dim=-1, descending=True)
        race = race.gather(-1, order)  # each token keeps its own draw in the sorted order
        top_k = torch.tensor([r.params.top_k or probs.shape[-1] for r in rows], device=device)[:, None]
        top_p = torch.tensor([r.params.top_p for r in rows], device=device)[:, None]
        # Nucleus: keep the smallest prefix whose mass reaches top_p (the token that crosses it is kept).
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        rank = torch.arange(probs.shape[-1], device=device)
        probs_sorted = probs_sorted.masked_fill((rank >= top_k) | (mass_before > top_p), 0.0)
    else:
        probs_sorted, order = probs, None
    choice = (probs_sorted / race).argmax(dim=-1, keepdim=True)
    sampled = (order.gather(-1, choice) if order is not None else choice).squeeze(-1)
    if all(temperatures):
        return sampled
    greedy = torch.tensor([t == 0 for t in temperatures], device=device)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
