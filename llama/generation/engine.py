"""The generation engine: the model's static KV cache as ``max_batch_size`` sequence slots, and the steps that
fill them.

Each row of the cache is a slot holding one sequence at positions 0..len-1, written and attended at that row's own
positions, so rows of different lengths decode together and a new request joins at the next step. A step
1. admits waiting requests into free slots (a slot whose kept tokens share a prefix with the prompt first: those
   tokens' keys and values are reused and not computed again);
2. prefills one group of admitted prompts (up to ``prefill_chunk`` tokens each; a longer prompt takes several
   steps), sampling the first token of those whose prompt is complete;
3. decodes one token for every request that has one pending.
A finished or cancelled request frees its slot at once; the slot keeps its tokens for a later request with the
same prefix. Every request samples with its own settings and random stream (``llama.generation.sampling``), so
its tokens do not depend on what else is running.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llama.generation.sampling import RowSampler, SamplingParams, sample
from llama.model import Transformer, causal_mask


@dataclass
class Request:
    """One prompt to complete, and what the engine has made of it so far."""

    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    echo_logprobs: bool = False  # also the logprob of each prompt token (the first has no context: 0.0)
    tokens: list[int] = field(default_factory=list)  # generated, the stop id that ended them excluded
    logprobs: list[float] = field(default_factory=list)  # of ``tokens``, under the unscaled model distribution
    prompt_logprobs: list[float] = field(default_factory=list)  # with ``echo_logprobs``
    finish_reason: str | None = None  # "stop" (a stop id or string), "length" or "cancelled"
    reused_tokens: int = 0  # prompt tokens whose keys and values came from a slot's earlier content

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)  # slots are told apart by identity
class _Slot:
    """One row of the KV cache."""

    index: int
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values the row holds, positions 0..len-1
    request: Request | None = None
    sampler: RowSampler | None = None
    max_new_tokens: int = 0
    next_token: int | None = None  # sampled and not yet fed: the request is decoding

    @property
    def prefilling(self) -> bool:
        return self.request is not None and len(self.cached) < len(self.request.prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    def __init__(
        self,
        model: Transformer,
        stop_ids: frozenset[int],
        max_batch_size: int,
        max_seq_len: int,
        *,
        decode_text: Callable[[list[int]], str],
        compile: bool = False,
        prefill_chunk: int | None = None,
        prefix_cache: bool = True,
        seed: int = 1,
    ):
        """``model`` gets a KV cache of ``max_batch_size`` slots of ``max_seq_len`` positions. ``decode_text``
        turns tokens into text (stop strings are looked for in it). ``compile``: the one-token decode step runs
        through ``torch.compile`` over a static-shape mask spanning the whole cache; prefill stays eager.
        ``prefill_chunk``: prompt tokens prefilled per step and request (None: whole prompts). ``prefix_cache``:
        slots keep their tokens after a request for a later one with the same prefix. ``seed`` seeds the streams
        of requests that bring no seed of their own."""
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch_size and max_seq_len must be >= 1, got {max_batch_size}, {max_seq_len}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        self.model = model
        self.stop_ids = stop_ids
        self.decode_text = decode_text
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.prefill_chunk = prefill_chunk or max_seq_len
        self.prefix_cache = prefix_cache
        self.device = model.tok_embeddings.weight.device
        self.seeds = torch.Generator().manual_seed(seed)  # on the CPU: drawing a seed never waits for the device
        model.setup_caches(max_batch_size, max_seq_len)
        self.slots = [_Slot(i) for i in range(max_batch_size)]
        self.waiting: deque[Request] = deque()
        self.compiled = compile
        self.decode_step = compiled_decode_step(model) if compile else model

    # ------------------------------------------------------------------------------------------------ requests

    def check(self, request: Request, name: str = "the prompt") -> None:
        """Refuse a request the engine cannot serve, before any work; messages call the prompt ``name``."""
        request.sampling.check()
        if not request.prompt:
            raise ValueError(f"{name} is empty: there is nothing to condition on")
        if len(request.prompt) > self.max_seq_len:
            raise ValueError(f"{name} has {len(request.prompt)} tokens, more than max_seq_len={self.max_seq_len}")
        vocab_size = self.model.args.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in request.prompt):
            raise ValueError(f"{name} holds token ids outside the vocabulary (0..{vocab_size - 1})")

    def submit(self, request: Request) -> None:
        self.check(request)
        self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Stop working on ``request``: it leaves the queue, or frees its slot at once."""
        if request in self.waiting:
            self.waiting.remove(request)
            request.finish_reason = "cancelled"
        for slot in self.slots:
            if slot.request is request:
                self._finish(slot, "cancelled")

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(slot.request is not None for slot in self.slots)

    def run(self, requests: list[Request]) -> Iterator[None]:
        """Submit ``requests`` and step until they are done; yields after each step. Closing the iterator early
        cancels what is left of them."""
        for request in requests:
            self.submit(request)
        try:
            while not all(r.done for r in requests):
                self.step()
                yield
        finally:
            for request in requests:
                if not request.done:
                    self.cancel(request)

    # ------------------------------------------------------------------------------------------------ a step

    @torch.inference_mode()
    def step(self) -> None:
        """Admit, prefill one group, decode one token per decoding request."""
        self._admit()
        prefilled = self._prefill()
        self._decode(prefilled)

    def _admit(self) -> None:
        free = [slot for slot in self.slots if slot.request is None]
        while self.waiting and free:
            request = self.waiting.popleft()
            slot, reused = free[0], 0
            if self.prefix_cache and not request.echo_logprobs:
                best = max(free, key=lambda s: _common_prefix(s.cached, request.prompt))
                # at least the prompt's last token is fed again: its logits give the first sampled token
                reused = min(_common_prefix(best.cached, request.prompt), len(request.prompt) - 1)
                slot = best if reused else slot
            free.remove(slot)
            del slot.cached[reused:]
            seed = request.sampling.seed
            if seed is None:
                seed = int(torch.randint(2**62, (1,), generator=self.seeds))
            slot.request, slot.next_token = request, None
            slot.sampler = RowSampler(request.sampling, torch.Generator(self.device).manual_seed(seed))
            room = self.max_seq_len - len(request.prompt)
            wanted = request.sampling.max_tokens
            slot.max_new_tokens = room if wanted is None else min(room, wanted)
            request.reused_tokens = reused
            request.prompt_logprobs = [0.0] if request.echo_logprobs else []

    def _prefill_group(self) -> list[_Slot]:
        """Prefilling slots whose next chunks fit one forward: right-padded to the longest, each row's padding
        writes only past its own content and inside the cache."""
        group, top, longest = [], 0, 0
        for slot in self.slots:
            if slot.prefilling:
                length = min(len(slot.request.prompt) - len(slot.cached), self.prefill_chunk)
                if max(top, len(slot.cached)) + max(longest, length) <= self.max_seq_len:
                    group.append(slot)
                    top, longest = max(top, len(slot.cached)), max(longest, length)
        return group

    def _prefill(self) -> list[_Slot]:
        """Prefill one group; returns it."""
        group = self._prefill_group()
        if not group:
            return group
        chunks = [slot.request.prompt[len(slot.cached) : len(slot.cached) + self.prefill_chunk] for slot in group]
        width = max(map(len, chunks))
        tokens = torch.tensor([chunk + [0] * (width - len(chunk)) for chunk in chunks], device=self.device)
        starts = torch.tensor([len(slot.cached) for slot in group], device=self.device)
        input_pos = starts[:, None] + torch.arange(width, device=self.device)  # (group, width)
        kv_len = max(len(slot.cached) for slot in group) + width
        rows = [slot.index for slot in group]
        cache_rows = None if rows == list(range(len(rows))) else torch.tensor(rows, device=self.device)
        every_position = any(slot.request.echo_logprobs for slot in group)
        lasts = torch.tensor([len(chunk) - 1 for chunk in chunks], device=self.device)
        logits = self.model(
            tokens, input_pos, causal_mask(input_pos, kv_len), cache_rows, logits_at=None if every_position else lasts
        )
        if every_position:
            self._record_prompt_logprobs(group, chunks, logits)
            logits = logits[torch.arange(len(group), device=self.device), lasts, None]
        complete = []
        for i, (slot, chunk) in enumerate(zip(group, chunks)):
            slot.cached += chunk
            if not slot.prefilling:
                complete.append(i)
        if complete:
            self._sample([group[i] for i in complete], logits[complete, -1])
        return group

    def _record_prompt_logprobs(self, group: list[_Slot], chunks: list[list[int]], logits: torch.Tensor) -> None:
        """log p(prompt[t] | prompt[:t]) for the chunk's tokens after the first of the prompt."""
        for i, (slot, chunk) in enumerate(zip(group, chunks)):
            if not slot.request.echo_logprobs:
                continue
            start, prompt = len(slot.cached), slot.request.prompt
            following = prompt[start + 1 : start + len(chunk) + 1]  # the last position may predict past the prompt
            lp = torch.log_softmax(logits[i, : len(following)].float(), dim=-1)
            slot.request.prompt_logprobs += lp.gather(-1, torch.tensor(following, device=self.device)[:, None])[:, 0].tolist()

    def _decode(self, prefilled: list[_Slot]) -> None:
        """One token for every request with one pending, except those whose first token this step sampled: their
        stream shows it before the next forward."""
        decoding = [slot for slot in self.slots if slot.next_token is not None and slot not in prefilled]
        if not decoding:
            return
        # the step runs over rows 0..n-1; rows without a pending token are fed a placeholder at their first free
        # position (never attended, overwritten by their next real write)
        n = decoding[-1].index + 1
        if self.compiled:  # Dynamo compiles a graph per batch size: a few sizes, not one per count of busy rows
            n = min(self.max_batch_size, 1 << (n - 1).bit_length())
        rows = self.slots[:n]
        positions = []
        for slot in rows:
            position = len(slot.cached)
            if slot not in decoding and position == self.max_seq_len:
                position -= 1  # a full row: give up its last kept token
                del slot.cached[position:]
            positions.append(position)
        tokens = torch.tensor([[s.next_token if s in decoding else 0] for s in rows], device=self.device)
        input_pos = torch.tensor(positions, device=self.device)[:, None]  # (n, 1)
        # compiled: one static shape for every step, the whole cache with future slots masked out
        kv_len = self.max_seq_len if self.compiled else max(positions) + 1
        logits = self.decode_step(tokens, input_pos, causal_mask(input_pos, kv_len))[:, -1]
        for slot in decoding:
            slot.cached.append(slot.next_token)
        if len(decoding) < len(rows):
            logits = logits[[slot.index for slot in decoding]]
        self._sample(decoding, logits)

    def _sample(self, slots: list[_Slot], logits: torch.Tensor) -> None:
        """Sample one token for each of ``slots`` from its logits (n, vocab_size) and record it."""
        tokens = sample(logits, [slot.sampler for slot in slots])
        logprobs = [None] * len(slots)  # a log-softmax over the vocabulary only when asked: ~1 % of a CPU step
        if any(slot.request.sampling.logprobs for slot in slots):
            logprobs = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None])[:, 0].tolist()
        for slot, token, logprob in zip(slots, tokens.tolist(), logprobs):
            self._accept(slot, token, logprob)

    def _accept(self, slot: _Slot, token: int, logprob: float | None) -> None:
        request = slot.request
        if slot.max_new_tokens == 0:
            return self._finish(slot, "length")
        if token in self.stop_ids:
            return self._finish(slot, "stop")
        request.tokens.append(token)
        if request.sampling.logprobs:
            request.logprobs.append(logprob)
        stop = request.sampling.stop
        if stop and any(s in self.decode_text(request.tokens) for s in stop):
            return self._finish(slot, "stop")
        if len(request.tokens) >= slot.max_new_tokens:
            return self._finish(slot, "length")
        slot.next_token = token

    def _finish(self, slot: _Slot, reason: str) -> None:
        slot.request.finish_reason = reason
        slot.request = slot.sampler = slot.next_token = None
        if not self.prefix_cache:
            slot.cached.clear()


def compiled_decode_step(model: Transformer) -> Callable[..., torch.Tensor]:
    """``model(tokens, input_pos, mask)`` compiled for one-token steps of static shape."""
    from torch._inductor import config as inductor_config  # here: importing Inductor takes ~1 s

    options = {}
    device = model.tok_embeddings.weight.device.type
    if device == "cuda":  # CUDA graphs: one launch per decode step
        options.update(torch._inductor.list_mode_options("reduce-overhead"))
        # as gpt-fast: lets Inductor fuse int8 dequantisation into one-row matmuls (otherwise a bf16 copy of each
        # weight is written and read every step); compiling takes longer
        options["coordinate_descent_tuning"] = True
    elif device == "cpu" and hasattr(inductor_config, "cpp_wrapper_build_separate"):
        # On CPU the step's ~500 calls (kernels, matmuls, attention) from a C++ wrapper rather than Python: ~15 %
        # faster decode of SmolLM2 on 2 cores. Built apart from the kernels, it adds ~20 s to the first compile
        # (together with them, ~160 s). An option of torch >= 2.8, measured on 2.13. Without the wrapper's ~800
        # size and stride checks of inputs and matmul outputs (static shapes, fixed once built): ~5 % more.
        options.update(cpp_wrapper=True, cpp_wrapper_build_separate=True, size_asserts=False)
    skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.7
    if skip_module_guards:
        # The weights and cache are fixed once built, so Dynamo need not check each of the model's few hundred
        # tensors before every call (~1.5 ms of a ~20 ms CPU step of SmolLM2).
        options["guard_filter_fn"] = skip_module_guards

    def step(tokens, input_pos, mask) -> torch.Tensor:
        return model(tokens, input_pos, mask)

    # Dynamo keeps compiled graphs per code object; without guards on the module, another model's call would
    # find this model's graphs. A code object of its own per model keeps them apart.
    step.__code__ = step.__code__.replace(co_name=f"decode_step_{id(model):x}")
    return torch.compile(step, fullgraph=True, dynamic=False, options=options)
