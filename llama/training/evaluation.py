"""Evaluations during training (``[eval]``): the perplexity of held-out text and lm-eval tasks, run on the model
being trained every ``eval.interval`` steps, before the first step and after the last, and logged with that step's
metrics as ``eval/ppl/NAME``, ``eval/bpb/NAME`` (bits per byte) and ``eval/TASK/METRIC``.

The shards' validation split is not scored here: ``training.eval_interval``'s validation loss does that, cheaply and
often, on windows of the training length. ``[eval]`` runs what is new and costs more, at its own interval: other
text in the sliding windows of ``llama.evaluation.perplexity`` (the numbers ``python -m llama.eval perplexity``
gives for the same ``max_length`` and ``stride``) and lm-eval tasks through ``llama.evaluation.harness``.

Everything that can be checked is checked before the model exists (``prepare``): the texts are read and tokenized,
the task names looked up in lm-eval's index. The model is evaluated as it trains (under LoRA with its adapters),
in eval mode, without gradients, and with the random number generators put back afterwards (lm-eval seeds them),
so the training steps are the same with or without ``[eval]``. On several processes every rank runs the forwards,
as FSDP2 gathers each block's weights collectively: the perplexity windows are split between the ranks as the
validation windows are; the lm-eval tasks run whole on every rank, each sending the same requests, so every rank
runs the same forwards.
"""

from __future__ import annotations

import glob
import math
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llama.evaluation.perplexity import Perplexity, Window, text_windows, window_nlls
from llama.training.config import ConfigError, EvalConfig

NAME = re.compile(r"[\w.-]+")  # a held-out text's name: one component of a metric's name


@dataclass
class HeldOutText:
    name: str
    windows: list[Window]
    n_bytes: int
    documents: int


@dataclass
class Evaluation:
    """What ``[eval]`` runs, made ready by ``prepare``."""

    cfg: EvalConfig
    tokenizer: object
    max_length: int
    texts: list[HeldOutText]
    task_manager: object = None  # lm-eval's, when there are tasks

    def due(self, step: int, last_step: int) -> bool:
        return step % self.cfg.interval == 0 or step == last_step

    def __call__(self, model, device: torch.device) -> dict:
        """The metrics of ``model`` (collective: every rank calls it)."""
        metrics = {}
        with evaluating(model), rng_kept(device), torch.no_grad():
            # llama.evaluation scores and generates in inference mode. FSDP2 allocates its all-gather buffers at a
            # model's first forward and keeps them: made in inference mode (an evaluation before the first step)
            # they would be inference tensors that the training forwards cannot write into. A one-token forward
            # under no_grad first makes sure they exist as ordinary tensors.
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
            for text in self.texts:
                result = perplexity_on_ranks(model, text, self.cfg.batch_size, device)
                metrics[f"eval/ppl/{text.name}"] = result.perplexity
                metrics[f"eval/bpb/{text.name}"] = result.bits_per_byte
            if self.cfg.tasks:
                metrics.update(self.run_tasks(model))
        return metrics

    def run_tasks(self, model) -> dict:
        from llama.evaluation.harness import LlamaOneLM, evaluate_tasks


        lm = LlamaOneLM(model=model, tokenizer=self.tokenizer, batch_size=self.cfg.batch_size,
                        max_length=self.max_length)
        # no bootstrapped standard errors: they are not logged, and lm-eval draws 100,000 resamples per metric
        results = evaluate_tasks(lm, list(self.cfg.tasks), manager=self.task_manager, limit=self.cfg.limit or None,
                                 bootstrap_iters=0)
        # under torchrun lm-eval returns the results on LOCAL_RANK 0 only (None elsewhere): rank 0 is the one that logs
        return task_metrics(results["results"]) if results is not None else {}


def task_metrics(results: dict) -> dict:
    """``eval/TASK/METRIC`` for each number of lm-eval's results (``METRIC/FILTER`` when a filter other than
    ``none`` made it), standard errors left out."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or isinstance(value, bool):
                continue  # alias, sample counts and the like
            if isinstance(value, (int, float)):
                metrics[f"eval/{task}/{metric if filter_name == 'none' else f'{metric}/{filter_name}'}"] = value
    return metrics


def prepare(cfg: EvalConfig, tokenizer, context: int) -> Evaluation | None:
    """The evaluations ``cfg`` asks for, checked and ready, before any model exists: None when ``eval.interval``
    is 0. ``tokenizer`` is the shards' (the model's); ``context`` the model's ``max_seq_len``."""
    if cfg.interval == 0:
        return None
    if not cfg.perplexity and not cfg.tasks:
        raise ConfigError(f"eval.interval is {cfg.interval}, but there is nothing to evaluate: set eval.perplexity "
                          "or eval.tasks (the shards' val split is training.eval_interval's)")
    max_length = cfg.max_length or context
    if max_length > context:
        raise ConfigError(f"eval.max_length {max_length} exceeds the model's context of {context}")
    if cfg.stride > max_length:
        raise ConfigError(f"eval.stride {cfg.stride} exceeds eval.max_length {max_length}")
    texts = []
    for name, inputs in held_out_inputs(cfg.perplexity).items():
        try:
            windows, n_bytes, documents = text_windows(tokenizer, inputs, max_length, cfg.stride or None)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"eval.perplexity {name}: {e}") from None
        if not windows:
            raise ConfigError(f"eval.perplexity {name}: {inputs} holds no text to score")
        texts.append(HeldOutText(name, windows, n_bytes, documents))
    manager = None
    if cfg.tasks:
        try:
            from llama.evaluation.harness import task_manager
        except ImportError as e:
            raise ConfigError(f"eval.tasks needs lm-eval ({e}): pip install -e '.[eval]'") from None
        try:
            manager = task_manager(tasks=list(cfg.tasks))
        except ValueError as e:
            raise ConfigError(f"eval.tasks: {e}") from None
    return Evaluation(cfg, tokenizer, max_length, texts, manager)


def held_out_inputs(entries: tuple[str, ...]) -> dict[str, str]:
    """Name -> input of each ``eval.perplexity`` entry: ``NAME=PATH``, or a path named after its file or folder
    (without suffix). A glob needs a name; names must differ."""
    named = {}
    for entry in entries:
        name, sep, inputs = entry.partition("=")
        if not sep or not NAME.fullmatch(name) or Path(entry).exists():
            inputs = entry
            if glob.has_magic(entry):
                raise ConfigError(f"eval.perplexity: name the glob {entry!r}, as NAME={entry} (NAME is its metrics' "
                                  "name: eval/ppl/NAME)")
            name = Path(entry).stem
        if not NAME.fullmatch(name):
            raise ConfigError(f"eval.perplexity: {entry!r} needs a name of letters, digits, '.', '-' or '_', as "
                              f"NAME={entry}")
        if name in named:
            raise ConfigError(f"eval.perplexity: two entries are named {name!r} ({named[name]} and {inputs}); "
                              "tell them apart as NAME=PATH")
        named[name] = inputs
    return named


def perplexity_on_ranks(model, text: HeldOutText, batch_size: int, device: torch.device) -> Perplexity:
    """``evaluate_perplexity`` with the windows split between the ranks, each running the same number of
    forwards (FSDP's gathers are collective): the last ranks pad their share with windows that are not counted."""
    rank, world = dist.get_rank(), dist.get_world_size()
    windows = text.windows
    per_rank = math.ceil(len(windows) / world)
    mine = windows[rank * per_rank : (rank + 1) * per_rank]
    nlls = window_nlls(model, mine + windows[: per_rank - len(mine)], batch_size)
    nll = torch.tensor(math.fsum(nlls[: len(mine)]), dtype=torch.float64, device=device)
    dist.all_reduce(nll)
    return Perplexity(nll.item(), sum(w.scored for w in windows), text.n_bytes, len(windows), text.documents)


@contextmanager
def evaluating(model) -> Iterator[None]:
    """``model`` in eval mode (no dropout, LoRA's included) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def rng_kept(device: torch.device) -> Iterator[None]:
    """The Python, NumPy and torch random states as they were before the block (lm-eval seeds all three)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
