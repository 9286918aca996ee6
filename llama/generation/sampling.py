"""Choosing the next token of each row from its logits, each row with its own settings and random stream: greedy,
temperature, top-k, top-p (nucleus) and min-p sampling, after OpenAI's logit bias and presence/frequency
penalties."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llama.generation.text import stop_strings

MAX_TOP_LOGPROBS = 20  # as OpenAI's API
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # a bias lies in [-100, 100] (OpenAI's range)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one (0: all)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    top_logprobs: int = 0  # also report the logprobs of this many most likely tokens at each position

    def __post_init__(self):
        self.stop = stop_strings(self.stop)
        self.stop_ids = tuple(self.stop_ids)
        self.check()

    def check(self) -> None:
        """Refuse settings that have no meaning, before any work is done."""
        if not _number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 means no limit), got {self.top_k}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise ValueError(f"max_gen_len must be an integer >= 0, got {self.max_tokens}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {list(self.stop)}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_ids):
            raise ValueError(f"stop_ids must be token ids (integers >= 0), got {list(self.stop_ids)}")
        if not (_number(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (_number(getattr(self, name)) and abs(getattr(self, name)) <= MAX_PENALTY):
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}")
        bias = self.logit_bias
        if not isinstance(bias, dict) or not all(
            isinstance(t, int) and t >= 0 and _number(b) and abs(b) <= MAX_LOGIT_BIAS for t, b in bias.items()
        ):
            raise ValueError(f"logit_bias must map token ids to numbers in [-100, 100], got {self.logit_bias}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty)


@dataclass
class RowSampler:
    """The settings and random stream of one row, and (with penalties) how often it generated each token."""

    params: SamplingParams
    generator: torch.Generator = field(repr=False)
    counts: torch.Tensor | None = field(default=None, repr=False)  # (vocab_size,) with penalties only

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits (vocab_size,) in fp32 after its logit bias and penalties."""
        p = self.params
        logits = logits.float().clone()
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        if self.counts is not None:
            logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0)
        return logits

    def count(self, token: torch.Tensor) -> None:
        """Note one more generation of ``token`` (a 1-element tensor: no host synchronisation) for penalties."""
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.counts.index_add_(0, token, torch.ones(1, device=token.device))


def row_seeds(seed: int | None, n: int) -> list[int | None]:
    """Seeds of ``n`` rows that share one request ``seed``: the first n of the stream it seeds (None: each row's
    is drawn by the engine)."""
    if seed is None:
        return [None] * n
    return torch.randint(2**62, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def sample(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """Next token ids (n,) from logits (n, vocab_size), row i sampled as ``rows[i]`` says."""
    adjusting = [r.params.adjusts_logits for r in rows]
    if not any(adjusting):  # the common case costs one test more
        return _choose(logits, rows)
    for row in rows:
        p = row.params
        if (p.presence_penalty or p.frequency_penalty) and row.counts is None:
            row.counts = torch.zeros(logits.shape[-1], device=logits.device)
    logits = torch.stack([row.adjust(x) if a else x.float() for row, x, a in zip(rows, logits, adjusting)])
    tokens = _choose(logits, rows)
    for i, row in enumerate(rows):
        row.count(tokens[i : i + 1])
    return tokens


def _choose(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
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
    if any(r.params.min_p for r in rows):  # relative to the most likely token, which top-k and top-p always keep
        min_p = torch.tensor([r.params.min_p for r in rows], device=device)[:, None]
        probs_sorted = probs_sorted.masked_fill(probs_sorted < min_p * probs_sorted.amax(-1, keepdim=True), 0.0)
    choice = (probs_sorted / race).argmax(dim=-1, keepdim=True)
    sampled = (order.gather(-1, choice) if order is not None else choice).squeeze(-1)
    if all(temperatures):
        return sampled
    greedy = torch.tensor([t == 0 for t in temperatures], device=device)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
