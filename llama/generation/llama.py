"""Text and chat generation with Meta's ``Llama`` surface: build, text_completion, chat_completion, generate, plus
streaming forms that yield text as it is produced. Every call runs on the engine (``llama.generation.engine``):
prompts of different lengths share the batch, each in its own cache slot at its own positions, and each gives the
tokens it gives alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from llama.checkpoint import load_checkpoint
from llama.generation.engine import Engine, Request
from llama.generation.sampling import SamplingParams, row_seeds
from llama.generation.text import cut_at_stop, stable_text, stop_strings
from llama.model import Transformer
from llama.transforms.lora import load_adapter
from llama.transforms.quantize import quantize_weights
from llama.transforms.tensor_parallel import apply_tensor_parallel, init_tensor_parallel_mesh, local_rank, world_size
from tokenizer import Dialog, check_fits, encode_dialog
from tokenizer.fim import fim_tokens, infilling_prompt
from tokenizer.tools import parse_tool_calls


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
        prefill_chunk: int | None = None,
    ):
        """Wrap a loaded model and its tokenizer; ``max_seq_len`` (capped by the model's context) and
        ``max_batch_size`` size the static KV cache the engine allocates here.

        ``compile``: the one-token decode step runs through ``torch.compile`` (CUDA graphs on GPU) over a
        static-shape mask that spans the whole cache; prefill stays eager. ``quantize="int8"`` or ``"int4"``:
        weight-only quantised linears (``llama.transforms.quantize``), applied in place to ``model``.
        ``prefill_chunk``: prompt tokens prefilled per engine step and request (None: whole prompts; a server
        interleaves chunks of long prompts with the running decode steps)."""
        check_fits(tokenizer, model.args.vocab_size)
        if quantize is not None:
            quantize_weights(model, quantize)  # refuses an unknown method
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_len = min(max_seq_len, model.args.max_seq_len)
        self.max_batch_size = max_batch_size
        self.engine = Engine(
            model, tokenizer.stop_ids, max_batch_size, self.max_seq_len, decode_text=tokenizer.decode,
            compile=compile, seed=seed, prefill_chunk=prefill_chunk,
        )

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
        prefill_chunk: int | None = None,
        adapter: str | Path | None = None,
    ) -> Llama:
        """Load any checkpoint ``llama.checkpoint.load_model`` reads (Meta or HF folder, ``.gguf`` file) and the
        tokenizer beside it (or at ``tokenizer_path``). Defaults: CUDA in bf16 when present, else CPU in fp32.
        ``adapter``: a peft LoRA adapter folder (``llama.train``'s ``RUN/adapter``, or peft's own) applied to the
        model unmerged (``llama.transforms.lora``); with ``quantize`` the adapted layers stay in float.
        Under ``torchrun --nproc_per_node N`` with N > 1 the model is split over the N processes by tensor
        parallelism (``llama.transforms.tensor_parallel``); with plain ``python`` or N = 1 no process group is
        created."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank())
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if world_size() > 1 and (quantize or adapter):
            what = f"quantize={quantize!r}" if quantize else "an adapter"
            raise ValueError(f"{what} cannot be combined with tensor parallelism (torchrun with N > 1)")
        model, tokenizer = load_checkpoint(ckpt_dir, tokenizer_path, device=device, dtype=dtype)
        if adapter is not None:
            load_adapter(model, adapter)
        if world_size() > 1:
            apply_tensor_parallel(model, init_tensor_parallel_mesh(device))
        return Llama(model, tokenizer, max_seq_len, max_batch_size, seed, compile, quantize, prefill_chunk)

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
        stop_ids: tuple[int, ...] = (),
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate continuations of token prompts; returns (token lists, logprob lists or None).

        Token lists exclude the stop id that ended them; a row ended by a stop string ends with the token that
        completed it (the completions cut the text before the string). ``max_gen_len`` defaults to what fits in
        ``max_seq_len`` after each prompt. Logprobs are those of the chosen tokens under the model's unscaled
        distribution. With ``echo`` the prompt comes first, and its logprobs too; the first prompt token has no
        context, so its logprob is reported as 0.0 (as Meta's reference does). ``top_k`` 0 means no limit;
        ``seed`` gives this call's rows their own random streams, otherwise they are drawn from the stream seeded
        in ``build``; ``stop_ids`` end the rows besides the tokenizer's stop ids."""
        requests = self._requests(
            prompt_tokens, max_gen_len, temperature, top_p, top_k, stop, seed, logprobs, echo, stop_ids
        )
        self.complete(requests)
        out_tokens = [(r.prompt if echo else []) + r.tokens for r in requests]
        if not logprobs:
            return out_tokens, None
        return out_tokens, [(r.prompt_logprobs if echo else []) + r.logprobs for r in requests]

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
        requests = self._requests(prompt_tokens, max_gen_len, temperature, top_p, top_k, stop, seed)
        return self.stream(requests)  # not a generator itself, so bad input is refused at the call

    def complete(self, requests: list[Request]) -> list[Request]:
        """Run ``requests``, each with its own sampling settings, to the end."""
        for _ in self.engine.run(requests):
            pass
        return requests

    def stream(self, requests: list[Request]) -> Iterator[list[str]]:
        """Run ``requests``, yielding after each step the new text of each (see ``generate_stream``). Closing the
        iterator early cancels them."""
        emitted = [""] * len(requests)
        for _ in self.engine.run(requests):
            pieces = []
            for i, request in enumerate(requests):
                text = stable_text(self.tokenizer.decode(request.tokens), request.sampling.stop, request.done)
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

    # ----------------------------------------------------------------------------------------------- infilling

    def text_infilling(
        self,
        prefixes: list[str],
        suffixes: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        suffix_first: bool = False,
        **options,
    ) -> list[dict]:
        """Fill in the middle between each prefix and suffix, as Code Llama's ``text_infilling``:
        ``[{"generation": middle, "full_text": prefix + middle + suffix}]``, plus ``"tokens"`` and ``"logprobs"``
        when asked. The prompt is Code Llama's layout (``tokenizer.fim``), prefix-suffix-middle or, with
        ``suffix_first``, suffix-prefix-middle; the middle ends at the vocabulary's end-of-infill token (``EOT``)
        or EOS. ``options``: top_k, stop, seed (see ``generate``). A tokenizer without FIM tokens is refused."""
        if isinstance(prefixes, str) or isinstance(suffixes, str) or len(prefixes) != len(suffixes):
            raise ValueError("prefixes and suffixes must be lists of strings of the same length")
        if not all(isinstance(text, str) for text in [*prefixes, *suffixes]):
            raise ValueError("prefixes and suffixes must be strings")
        end = fim_tokens(self.tokenizer).end  # refuses a vocabulary without FIM tokens
        prompt_tokens = [infilling_prompt(self.tokenizer, p, s, suffix_first) for p, s in zip(prefixes, suffixes)]
        stop_ids = () if end is None else (end,)
        tokens, token_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, stop_ids=stop_ids, **options
        )
        results = []
        for i, (prefix, suffix, row_tokens) in enumerate(zip(prefixes, suffixes, tokens)):
            middle = cut_at_stop(self.tokenizer.decode_infill(row_tokens), stop_strings(options.get("stop")))
            result = {"generation": middle, "full_text": prefix + middle + suffix}
            if logprobs:
                result.update(tokens=[self.tokenizer.decode([t]) for t in row_tokens], logprobs=token_logprobs[i])
            results.append(result)
        return results

    # ----------------------------------------------------------------------------------------------- chat

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        *,
        tools: list[dict] | None = None,
        builtin_tools: list[str] | None = None,
        **options,
    ) -> list[dict]:
        """Answer dialogs: ``[{"generation": {"role": "assistant", "content": str, "stop_reason": ...}}]``, plus
        ``"tokens"`` and ``"logprobs"`` when asked. Dialogs are formatted by the checkpoint's own chat format.
        ``stop_reason`` is Meta's llama-models': "end_of_turn", "end_of_message" (``<|eom_id|>``: the model waits
        for a tool's result) or "out_of_tokens". With ``tools`` (JSON schemas) or ``builtin_tools`` the prompt
        offers them (``encode_dialog``) and an answer that calls one comes back as ``"tool_calls"`` in
        transformers' structure with content "" (``tokenizer.tools.parse_tool_calls``). ``options``: top_k, stop,
        seed (see ``generate``)."""
        prompt_tokens = self._encode_dialogs(dialogs, tools, builtin_tools)
        requests = self._requests(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs=logprobs,
            **{"top_k": 0, "stop": None, "seed": None, **options},
        )
        self.complete(requests)
        outputs = [r.tokens for r in requests], [r.logprobs for r in requests] if logprobs else None
        end_of_message = self.tokenizer.token_id("<|eom_id|>")
        results = []
        for request, (text, extra) in zip(requests, self._texts(prompt_tokens, *outputs, False, options.get("stop"))):
            generation = {"role": "assistant", "content": text}
            if tools or builtin_tools:
                content, calls = parse_tool_calls(text)
                generation = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            generation["stop_reason"] = (
                "out_of_tokens" if request.finish_reason == "length"
                else "end_of_message" if request.stop_token is not None and request.stop_token == end_of_message
                else "end_of_turn"
            )
            results.append({"generation": generation, **extra})
        return results

    def stream_chat_completion(
        self, dialogs: list[Dialog], temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int | None = None,
        *, tools: list[dict] | None = None, builtin_tools: list[str] | None = None, **options,
    ) -> Iterator[list[str]]:
        """Answer increments per dialog, step by step (see ``generate_stream``); ``tools`` and ``builtin_tools``
        are offered in the prompt as ``chat_completion`` offers them, and a call streams as the text it is."""
        prompt_tokens = self._encode_dialogs(dialogs, tools, builtin_tools)
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
            yield text[:head] + cut_at_stop(text[head:], stop_strings(stop)), extra

    def _encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("no prompts given")
        return [self.tokenizer.encode(p, bos=self.tokenizer.add_bos) for p in prompts]

    def _encode_dialogs(self, dialogs: list[Dialog], tools=None, builtin_tools=None) -> list[list[int]]:
        if not dialogs:
            raise ValueError("no dialogs given")
        return [encode_dialog(self.tokenizer, dialog, tools=tools, builtin_tools=builtin_tools) for dialog in dialogs]

    def _requests(
        self, prompt_tokens, max_gen_len, temperature, top_p, top_k, stop, seed, logprobs=False, echo=False,
        stop_ids=(),
    ) -> list[Request]:
        """One request per prompt, all checked before any work. With ``seed``, row i's stream is the i-th of the
        streams ``seed`` draws."""
        if not prompt_tokens:
            raise ValueError("no prompts given")
        requests = []
        for i, (prompt, row_seed) in enumerate(zip(prompt_tokens, row_seeds(seed, len(prompt_tokens)))):
            sampling = SamplingParams(temperature, top_p, top_k, max_gen_len, stop, row_seed, logprobs, stop_ids)
            request = Request(list(prompt), sampling, echo_logprobs=echo and logprobs)
            self.engine.check(request, name=f"prompt {i}")
            requests.append(request)
        return requests
