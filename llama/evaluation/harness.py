"""Our model as a model of EleutherAI's lm-evaluation-harness (lm-eval 0.4.x), registered as ``llama-one``.

    python -m llama.eval lm-eval CKPT --tasks stdlib_docstring_mc            # the reliable path
    llama-lm-eval run --model llama-one --model_args pretrained=CKPT,compile=True --tasks T [--include_path DIR]

lm-eval 0.4 finds models in its own registry only (its built-in list, no entry points), so ``llama-one`` exists
in a process that imported this module: ``llama-lm-eval`` is lm-eval's own command line with it imported, and
Python code can ``import llama.evaluation.harness`` before ``lm_eval.simple_evaluate(model="llama-one", ...)``.

How each request type runs:
- ``loglikelihood``: requests are grouped by context (after lm-eval's left truncation); each group is one packed
  row, the context followed by every continuation's input tokens, each continuation attending to the context and
  to itself only (a block mask; each continuation's positions go on from the context's end). A question costs
  its context once, not once per choice, and only the scored positions go through the output projection.
- ``loglikelihood_rolling``: windows of ``max_length`` tokens scored with the chunked per-token loss
  (``llama.evaluation.perplexity``), as lm-eval's rolling windows.
- ``generate_until``: the batched generation engine (``llama.generation.Engine``) with per-request stop strings
  and sampling settings; ``compile`` compiles its decode step.
Tokens are encoded as lm-eval's ``hf`` model encodes them (control-token text parsed, BOS as the tokenizer adds
it), so the two give the same log-likelihoods (tested to 1e-4 in fp32).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lm_eval.models  # noqa: F401  the built-in models (hf, ...) register before ours
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from llama.evaluation.generate import complete
from llama.evaluation.perplexity import Window, sliding_windows, window_nlls
from llama.generation import Engine, Request, SamplingParams
from llama.model import Transformer
from tokenizer import check_fits, encode_dialog
from tokenizer.chat_format import render_template

eval_logger = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).parent / "tasks"  # the local tasks (stdlib_docstring_mc, stdlib_doctest, stdlib_docs)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGIT_ELEMENTS = 1 << 26  # scored logits held at once (256 MB of fp32): bounds a batch of long continuations


@register_model("llama-one")
class LlamaOneLM(TemplateLM):
    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        *,
        model: Transformer | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        compile: bool = False,
        quantize: str | None = None,
        seed: int = 1234,
    ):
        """Load ``pretrained`` (any checkpoint ``llama.checkpoint`` reads) and its tokenizer (or ``tokenizer``), or
        wrap an in-memory ``model`` and ``tokenizer`` object. ``batch_size``: rows per scoring forward and
        generation slots ("auto" means the default, 8; ``max_batch_size``, for "auto" in lm-eval, is not used). ``max_length``: the context (default: the model's).
        ``compile``: compile the generation engine's decode step; ``quantize``: "int8" or "int4" weights (when
        loading; quantise an in-memory model yourself)."""
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("llama-one needs pretrained=CHECKPOINT (or an in-memory model)")
            from llama.checkpoint import load_checkpoint
            from llama.transforms.quantize import quantize_weights

            if device and torch.device(device).type == "cuda" and not torch.cuda.is_available():
                eval_logger.warning("device %s asked for, but CUDA is not available: running on the CPU", device)
                device = None  # as lm-eval's hf model does (its command line asks for cuda by default)
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if dtype == "auto":
                dtype = "bfloat16" if device.type == "cuda" else "float32"
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
            model, tokenizer = load_checkpoint(pretrained, tokenizer, device=device, dtype=DTYPES[dtype])
            if quantize:
                quantize_weights(model, quantize)
        elif quantize:
            raise ValueError("quantize applies when loading a checkpoint; quantise an in-memory model beforehand")
        check_fits(tokenizer, model.args.vocab_size)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._device = model.tok_embeddings.weight.device
        self._max_length = min(max_length or model.args.max_seq_len, model.args.max_seq_len)
        self.batch_size = _batch_size(batch_size)
        self._max_gen_toks = max_gen_toks
        self.compile = compile
        self.seed = seed
        self.name = str(pretrained or "in-memory model")

    # ------------------------------------------------------------------------------------------ lm-eval's API

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The context of a continuation that has none: BOS, else EOS (as the hf model)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.source.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if self.tokenizer.chat_template is not None:
            return render_template(self.tokenizer, chat_history, add_generation_prompt)
        return self.tokenizer.decode(encode_dialog(self.tokenizer, chat_history, add_generation_prompt))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As the hf model: control-token text becomes control tokens; BOS as the tokenizer adds it, unless asked
        otherwise or the text already starts with it."""
        bos = self.tokenizer.add_bos if add_special_tokens is None else add_special_tokens and self.tokenizer.add_bos
        bos_text = self.tokenizer.token_name(self.tokenizer.bos_id)
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            bos = False
        return self.tokenizer.encode(string, bos=bos, allow_special=True)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each ((context, continuation), context ids, continuation ids)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored with max_length "
                                 f"{self.max_length}")
            # the hf model's left truncation: the last max_length + 1 tokens, the last one not read
            kept = (context + continuation)[-(self.max_length + 1) :]
            groups.setdefault(tuple(kept[: -len(continuation)]), []).append(i)
        rows = sorted(groups.items(), key=lambda item: -_packed_length(item, requests))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        with _kv_cache_aside(self.model):
            for batch in self._batches(rows, requests):
                for i, result in self._score(batch, requests):
                    results[i] = result
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
                bar.update(sum(len(members) for _, members in batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in windows of ``max_length`` tokens (lm-eval's rolling windows)."""
        windows: list[Window] = []
        owners: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in sliding_windows([self.prefix_token_id] + self.tok_encode(string), self.max_length):
                windows.append(window)
                owners.append(i)
        with _kv_cache_aside(self.model):
            nlls = window_nlls(self.model, windows, self.batch_size, progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, nll in zip(owners, nlls):
            totals[owner] -= nll
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, until one of its stop strings (and EOS), on the generation engine."""
        eos = self.tok_decode([self.eot_token_id]) or None  # a tokenizer may decode EOS to nothing: its id stops anyway
        work = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in max_length {self.max_length}")
            prompt = (self.tok_encode(context) or [self.prefix_token_id])[-(self.max_length - max_new) :]
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            sampling = SamplingParams(temperature, float(kwargs.get("top_p") or 1.0), int(kwargs.get("top_k") or 0),
                                      max_new, tuple(until))
            work.append(Request(prompt, sampling))
        if not work:
            return []
        room = max(len(r.prompt) + r.sampling.max_tokens for r in work)  # the cache holds the longest request
        with _kv_cache_aside(self.model):
            engine = Engine(self.model, self.tokenizer.stop_ids, min(self.batch_size, len(work)),
                            min(room, self.max_length), decode_text=self.tokenizer.decode, compile=self.compile,
                            seed=self.seed)
            complete(engine, work, "generate_until", progress=not disable_tqdm)
        texts, control = [], set(self.tokenizer.special_tokens.values())
        for request, (context, gen_kwargs) in zip(work, (req.args for req in requests)):
            # the text of control tokens left out, as the hf model decodes
            text = self.tok_decode([t for t in request.tokens if t not in control])
            text = postprocess_generated_text(text, list(request.sampling.stop), None)
            texts.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return texts

    # ------------------------------------------------------------------------------------------ scoring

    def _batches(self, rows, requests) -> Iterator[list]:
        """Rows (longest first) in batches of at most ``batch_size``, whose scored logits fit LOGIT_ELEMENTS."""
        vocab = self.model.args.vocab_size
        batch, widest = [], 0
        for row in rows:
            scored = sum(len(requests[i][2]) for i in row[1])
            too_many_logits = (len(batch) + 1) * max(widest, scored) * vocab > LOGIT_ELEMENTS
            if batch and (len(batch) == self.batch_size or too_many_logits):
                yield batch
                batch, widest = [], 0
            batch.append(row)
            widest = max(widest, scored)
        if batch:
            yield batch

    @torch.inference_mode()
    def _score(self, batch, requests) -> Iterator[tuple[int, tuple[float, bool]]]:
        """One forward over packed rows: each row a context and the input tokens of its continuations."""
        packed = [_pack(context, [requests[i][2] for i in members]) for context, members in batch]
        width = max(len(tokens) for tokens, *_ in packed)
        n_scored = max(len(at) for *_, at in packed)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        segments = torch.full((len(batch), width), -2, dtype=torch.long)  # padding: its own segment
        logits_at = torch.zeros(len(batch), n_scored, dtype=torch.long)
        for row, (row_tokens, row_positions, row_segments, at) in enumerate(packed):
            n = len(row_tokens)
            tokens[row, :n], positions[row, :n], segments[row, :n] = (
                torch.tensor(row_tokens), torch.tensor(row_positions), torch.tensor(row_segments)
            )
            logits_at[row, : len(at)] = torch.tensor(at)
        device = self._device
        if all(len(members) == 1 for _, members in batch):  # plain causal rows, padded on the right
            logits = self.model(tokens.to(device), logits_at=logits_at.to(device))
        else:
            # a continuation (segment j >= 0) attends to the context (segment -1) and to its own earlier tokens
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            keys, queries = segments[:, None, :], segments[:, :, None]
            mask = causal & ((keys == -1) | (keys == queries))
            logits = self.model(tokens.to(device), positions.to(device), mask[:, None].to(device),
                                logits_at=logits_at.to(device))
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (rows, n_scored, vocab)
        greedy = logprobs.argmax(dim=-1)
        for row, (_, members) in enumerate(batch):
            start = 0
            for i in members:
                continuation = torch.tensor(requests[i][2], device=logprobs.device)
                span = slice(start, start + len(continuation))
                picked = logprobs[row, span].gather(-1, continuation[:, None])[:, 0]
                yield i, (float(picked.sum()), bool((greedy[row, span] == continuation).all()))
                start += len(continuation)


def _batch_size(batch_size) -> int:
    if batch_size is None or str(batch_size).startswith("auto"):
        return 8
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


def _packed_length(item, requests) -> int:
    context, members = item
    return len(context) + sum(len(requests[i][2]) - 1 for i in members)


def _pack(context: tuple[int, ...], continuations: list[list[int]]):
    """(tokens, rotary positions, segments, scored positions) of one packed row: the context (segment -1), then
    each continuation's tokens but its last (segment j, positions going on from the context's end). The first
    token of every continuation is predicted at the context's last position."""
    tokens, positions = list(context), list(range(len(context)))
    segments = [-1] * len(context)
    scored = []
    for j, continuation in enumerate(continuations):
        start = len(tokens)
        tokens += continuation[:-1]
        positions += range(len(context), len(context) + len(continuation) - 1)
        segments += [j] * (len(continuation) - 1)
        scored += [len(context) - 1] + list(range(start, start + len(continuation) - 1))
    return tokens, positions, segments, scored


@contextmanager
def _kv_cache_aside(model: Transformer):
    """Scoring passes positions without a KV cache, and generation sets up a cache of its own: whatever cache the
    model holds is set aside meanwhile, and put back after (freeing the one made inside)."""
    caches = [layer.attention.kv_cache for layer in model.layers]
    for layer in model.layers:
        layer.attention.kv_cache = None
    try:
        yield
    finally:
        for layer, cache in zip(model.layers, caches):
            layer.attention.kv_cache = cache


def task_manager(include_path: list[str | os.PathLike] | None = None, tasks: list[str] = ()):
    """lm-eval's task index with our local tasks (and ``include_path``) added; refuses ``tasks`` it does not hold
    (names of tasks, groups or tags, or YAML files)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_path or [])])
    unknown = [t for t in tasks if t not in manager.task_index and not Path(t).is_file()]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; the local ones are "
                         f"{', '.join(sorted(_local_tasks()))} (see `lm-eval ls tasks` for lm-eval's own)")
    return manager


def _local_tasks() -> list[str]:
    return [path.stem for path in TASKS_DIR.glob("*.yaml")]


def evaluate_tasks(lm: LlamaOneLM, tasks: list[str], *, include_path=None, manager=None, **options) -> dict:
    """Run lm-eval ``tasks`` on ``lm`` (a ``LlamaOneLM``, e.g. around a trainer's in-memory model:
    ``LlamaOneLM(model=model, tokenizer=tokenizer)``); ``options`` go to ``lm_eval.simple_evaluate`` (limit,
    num_fewshot, log_samples, apply_chat_template, gen_kwargs, ...). ``manager``: a ``task_manager`` already built.
    Returns lm-eval's results dict."""
    from lm_eval import simple_evaluate

    options.setdefault("log_samples", False)
    manager = manager or task_manager(include_path, tasks)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, **options)


def lm_eval_cli() -> None:
    """``llama-lm-eval``: lm-eval's own command line, with the ``llama-one`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    lm_eval_cli()
