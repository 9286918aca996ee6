"""Text and chat generation with Meta's ``Llama`` surface: build, text_completion, chat_completion, generate, plus
streaming forms that yield text as it is produced.

A batch of prompts is left-padded to a common length and prefilled in one forward; every row keeps its own rotary
positions and never attends to padding. Decoding then feeds one token per row per step through the model's static
KV cache until every row has hit a stop token, a stop string or its length limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama.checkpoint import load_model
from llama.model import Transformer
from llama.parallel import apply_tensor_parallel, init_tensor_parallel_mesh, local_rank, world_size
from llama.quantize import quantize_weights
from llama.sampling import check_sampling, sample
from tokenizer import check_fits, encode_dialog, load_tokenizer

Dialog = list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]


@dataclass
class _Row:
    """One sequence of a batch while it is being generated."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # generated so far, stop ids excluded
    logprobs: list[float] = field(default_factory=list)  # of `tokens`, under the unscaled model distribution
    prompt_logprobs: list[float] = field(default_factory=list)  # filled when echo and logprobs are asked
    done: bool = False


@dataclass
class _Settings:
    """How one request samples and when it stops."""

    max_gen_len: int | None
    temperature: float
    top_p: float
    top_k: int
    stop: list[str] | None
    generator: torch.Generator


class Llama:
    def __init__(
        self,
        model: Transformer,
        tokenizer,
        max_seq_len: int = 2048,
        max_batch_size: int = 8,
        seed: int = 1,
        compile: bool = False,
        quantize: str | None = None,
    ):
        """Wrap a loaded model and its tokenizer; ``max_seq_len`` (capped by the model's context) and
        ``max_batch_size`` size the static KV cache allocated here.

        ``compile``: the one-token decode step runs through ``torch.compile`` (CUDA graphs on GPU) over a
        static-shape mask that spans the whole cache; prefill stays eager. ``quantize="int8"`` or ``"int4"``:
        weight-only quantised linears (``llama.quantize``), applied in place to ``model``."""
        check_fits(tokenizer, model.args.vocab_size)
        if quantize is not None:
            quantize_weights(model, quantize)  # refuses an unknown method
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_len = min(max_seq_len, model.args.max_seq_len)
        self.max_batch_size = max_batch_size
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        model.setup_caches(max_batch_size, self.max_seq_len)
        self.compiled = compile
        self._decode_step = model
        if compile:
            self._decode_step = _compiled_decode_step(model)

    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path | None = None,
        max_seq_len: int = 2048,
        max_batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 1,
        compile: bool = False,
        quantize: str | None = None,
    ) -> Llama:
        """Load any checkpoint ``llama.checkpoint.load_model`` reads (Meta or HF folder, ``.gguf`` file) and the
        tokenizer beside it (or at ``tokenizer_path``). Defaults: CUDA in bf16 when present, else CPU in fp32.
        Under ``torchrun --nproc_per_node N`` with N > 1 the model is split over the N processes by tensor
        parallelism (``llama.parallel``); with plain ``python`` or N = 1 no process group is created."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank())
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if world_size() > 1 and quantize:
            raise ValueError(f"quantize={quantize!r} cannot be combined with tensor parallelism (torchrun with N > 1)")
        tokenizer = load_tokenizer(tokenizer_path or ckpt_dir)
        model = load_model(ckpt_dir, device=device, dtype=dtype)
        if world_size() > 1:
            apply_tensor_parallel(model, init_tensor_parallel_mesh(device))
        return Llama(model, tokenizer, max_seq_len, max_batch_size, seed, compile, quantize)

    # ----------------------------------------------------------------------------------------------- generate

    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate continuations of token prompts; returns (token lists, logprob lists or None).

        Token lists exclude the stop id that ended them; a row ended by a stop string ends with the token that
        completed it (the completions cut the text before the string). ``max_gen_len`` defaults to what fits in
        ``max_seq_len`` after the batch's longest prompt. Logprobs are those of the chosen tokens under the model's
        unscaled distribution. With ``echo`` the prompt comes first, and its logprobs too; the first prompt
        token has no context, so its logprob is reported as 0.0 (as Meta's reference does).
        ``top_k`` 0 means no limit; ``seed`` gives this call its own random stream, otherwise the stream seeded
        in ``build`` continues."""
        rows, settings = self._request(prompt_tokens, max_gen_len, temperature, top_p, top_k, stop, seed)
        for chunk in self._chunks(rows):
            for _ in self._decode(chunk, settings, logprobs, prompt_logprobs=logprobs and echo):
                pass
        out_tokens = [(r.prompt if echo else []) + r.tokens for r in rows]
        if not logprobs:
            return out_tokens, None
        return out_tokens, [(r.prompt_logprobs if echo else []) + r.logprobs for r in rows]

    def generate_stream(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[list[str]]:
        """Like ``generate``, but yields after each step a list with the new text of every prompt ('' for none).
        A row's pieces concatenate to its completion text: a multi-byte character split across tokens is held
        back until complete, and so is text that may be the start of a stop string."""
        rows, settings = self._request(prompt_tokens, max_gen_len, temperature, top_p, top_k, stop, seed)
        return self._stream(rows, settings)  # not a generator itself, so bad input is refused at the call

    def _stream(self, rows: list[_Row], settings: _Settings) -> Iterator[list[str]]:
        emitted = [""] * len(rows)
        for chunk in self._chunks(rows):
            for _ in self._decode(chunk, settings):
                pieces = []
                for i, row in enumerate(rows):
                    text = self._stable_text(row, settings.stop)
                    pieces.append(text[len(emitted[i]) :])
                    emitted[i] = text
                if any(pieces):
                    yield pieces

    # ----------------------------------------------------------------------------------------------- text

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        **options,
    ) -> list[dict]:
        """Complete text prompts: ``[{"generation": str}]``, plus ``"tokens"`` (each token decoded) and
        ``"logprobs"`` when asked. ``options``: top_k, stop, seed (see ``generate``)."""
        prompt_tokens = self._encode_prompts(prompts)
        outputs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, **options)
        return [
            {"generation": text, **extra}
            for text, extra in self._texts(prompt_tokens, *outputs, echo, options.get("stop"))
        ]

    def stream_text_completion(
        self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int | None = None,
        **options,
    ) -> Iterator[list[str]]:
        """Text increments per prompt, step by step (see ``generate_stream``)."""
        prompt_tokens = self._encode_prompts(prompts)
        return self.generate_stream(prompt_tokens, max_gen_len, temperature, top_p, **options)

    # ----------------------------------------------------------------------------------------------- chat

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        **options,
    ) -> list[dict]:
        """Answer dialogs: ``[{"generation": {"role": "assistant", "content": str}}]``, plus ``"tokens"`` and
        ``"logprobs"`` when asked. Dialogs are formatted by the checkpoint's own chat template."""
        prompt_tokens = self._encode_dialogs(dialogs)
        outputs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, **options)
        return [
            {"generation": {"role": "assistant", "content": text}, **extra}
            for text, extra in self._texts(prompt_tokens, *outputs, False, options.get("stop"))
        ]

    def stream_chat_completion(
        self, dialogs: list[Dialog], temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int | None = None,
        **options,
    ) -> Iterator[list[str]]:
        """Answer increments per dialog, step by step (see ``generate_stream``)."""
        prompt_tokens = self._encode_dialogs(dialogs)
        return self.generate_stream(prompt_tokens, max_gen_len, temperature, top_p, **options)

    # ----------------------------------------------------------------------------------------------- internals

    def _texts(self, prompt_tokens, tokens, logprobs, echo, stop) -> Iterator[tuple[str, dict]]:
        """Each row's text, cut before its first stop string (looked for after the prompt's text when echoed),
        with its decoded tokens and logprobs when they were asked for."""
        for i, (prompt, row_tokens) in enumerate(zip(prompt_tokens, tokens)):
            head = len(self.tokenizer.decode(prompt)) if echo else 0
            text = self.tokenizer.decode(row_tokens)
            extra = {}
            if logprobs is not None:
                extra = {"tokens": [self.tokenizer.decode([t]) for t in row_tokens], "logprobs": logprobs[i]}
            yield text[:head] + self._cut_at_stop(text[head:], stop), extra

    def _encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        if not prompts:
            raise ValueError("no prompts given")
        return [self.tokenizer.encode(p, bos=self.tokenizer.add_bos) for p in prompts]

    def _encode_dialogs(self, dialogs: list[Dialog]) -> list[list[int]]:
        if not dialogs:
            raise ValueError("no dialogs given")
        for dialog in dialogs:
            check_dialog(dialog)
        return [encode_dialog(self.tokenizer, dialog) for dialog in dialogs]

    def _request(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, stop, seed):
        """Validate a request (before any work); one row per prompt, and the request's settings."""
        check_sampling(temperature, top_p, top_k)
        if not prompt_tokens:
            raise ValueError("no prompts given")
        if max_gen_len is not None and max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        for i, prompt in enumerate(prompt_tokens):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: there is nothing to condition on")
            if len(prompt) > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens, more than max_seq_len={self.max_seq_len}")
        generator = self.generator if seed is None else torch.Generator(self.device).manual_seed(seed)
        settings = _Settings(max_gen_len, temperature, top_p, top_k, stop, generator)
        return [_Row(list(p)) for p in prompt_tokens], settings

    def _chunks(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        for start in range(0, len(rows), self.max_batch_size):
            yield rows[start : start + self.max_batch_size]

    @torch.inference_mode()
    def _decode(
        self, rows: list[_Row], settings: _Settings, logprobs: bool = False, prompt_logprobs: bool = False
    ) -> Iterator[None]:
        """Prefill ``rows`` in one forward, then decode one token per row per step, appending to the rows (and
        the chosen tokens' logprobs with ``logprobs``); yields after every step."""
        bs, prompt_len = len(rows), max(len(r.prompt) for r in rows)
        n_steps = self.max_seq_len - prompt_len
        if settings.max_gen_len is not None:
            n_steps = min(n_steps, settings.max_gen_len)
        stop = settings.stop
        stop_ids = torch.tensor(sorted(self.tokenizer.stop_ids), dtype=torch.long, device=self.device)

        # Left padding: row i's prompt occupies cache slots pad[i] .. prompt_len - 1.
        pad = torch.tensor([prompt_len - len(r.prompt) for r in rows], device=self.device)  # (bs,)
        tokens = torch.zeros(bs, prompt_len, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            tokens[i, pad[i] :] = torch.tensor(row.prompt, device=self.device)
        slots = torch.arange(self.max_seq_len, device=self.device)
        is_real = slots[None, :] >= pad[:, None]  # (bs, max_seq_len): slots holding real tokens
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (bs, max_seq_len)

        # Prefill: real tokens attend causally to real tokens; pad queries attend to themselves so no row is empty.
        prefill_slots = slots[:prompt_len]
        causal = prefill_slots[None, :] <= prefill_slots[:, None]  # (prompt_len, prompt_len)
        mask = (causal & is_real[:, None, :prompt_len]) | torch.eye(prompt_len, dtype=torch.bool, device=self.device)
        logits = self.model(
            tokens, prefill_slots, positions[:, :prompt_len], mask[:, None], last_only=not prompt_logprobs
        )
        if prompt_logprobs:  # log p(prompt[t] | prompt[:t]) for t >= 1
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
            for i, row in enumerate(rows):
                row.prompt_logprobs = [0.0] + lp[i, pad[i] :].tolist()
        logits = logits[:, -1]  # (bs, vocab_size)

        for step in range(n_steps):
            next_tokens = sample(logits, settings.temperature, settings.top_p, settings.top_k, settings.generator)
            chosen_logprobs = [None] * bs  # a log-softmax over the vocabulary only when asked: ~1 % of a CPU step
            if logprobs:
                chosen_logprobs = torch.log_softmax(logits.float(), -1).gather(-1, next_tokens[:, None])[:, 0].tolist()
            finished = torch.isin(next_tokens, stop_ids).tolist()
            for row, token, logprob, is_stop in zip(rows, next_tokens.tolist(), chosen_logprobs, finished):
                if row.done:
                    continue
                if is_stop:
                    row.done = True
                    continue
                row.tokens.append(token)
                if logprobs:
                    row.logprobs.append(logprob)
                if len(row.tokens) == n_steps or (stop and self._stop_string_seen(row, stop)):
                    row.done = True
            yield
            if all(r.done for r in rows):
                return
            slot = prompt_len + step
            if self.compiled:  # one static shape for every step: the whole cache, future slots masked out
                mask = (is_real & (slots <= slot))[:, None, None, :]
            else:  # eager: attend over the slots written so far only
                mask = is_real[:, None, None, : slot + 1]
            logits = self._decode_step(
                next_tokens[:, None], slots[slot : slot + 1], positions[:, slot : slot + 1], mask
            )[:, -1]

    def _stop_string_seen(self, row: _Row, stop: list[str]) -> bool:
        text = self.tokenizer.decode(row.tokens)
        return any(s in text for s in stop)

    @staticmethod
    def _cut_at_stop(text: str, stop: list[str] | None) -> str:
        """The text before the first stop string."""
        cut = min((i for i in (text.find(s) for s in stop or []) if i >= 0), default=len(text))
        return text[:cut]

    def _stable_text(self, row: _Row, stop: list[str] | None) -> str:
        """The part of a row's text that can no longer change: all of it when the row is done; otherwise without
        a trailing incomplete UTF-8 character (decoded as U+FFFD) or a tail that could begin a stop string."""
        text = self._cut_at_stop(self.tokenizer.decode(row.tokens), stop)
        if row.done:
            return text
        text = text.rstrip("\ufffd")
        held = max((n for s in stop or [] for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[: len(text) - held]


def _compiled_decode_step(model: Transformer) -> Callable[..., torch.Tensor]:
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

    def step(*args) -> torch.Tensor:
        return model(*args)

    # Dynamo keeps compiled graphs per code object; without guards on the module, another model's call would
    # find this model's graphs. A code object of its own per model keeps them apart.
    step.__code__ = step.__code__.replace(co_name=f"decode_step_{id(model):x}")
    return torch.compile(step, fullgraph=True, dynamic=False, options=options)


def check_dialog(dialog: Dialog) -> None:
    """A dialog is an optional system message, then user and assistant turns alternating, ending with the user."""
    if not dialog:
        raise ValueError("empty dialog: it needs at least one user message")
    roles = [m.get("role") for m in dialog]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if turns != expected or not turns or turns[-1] != "user":
        raise ValueError(
            f"dialog roles {roles} are out of order: expected an optional 'system' first, then 'user' and "
            "'assistant' alternating, starting and ending with 'user'"
        )
