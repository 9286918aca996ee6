"""Evaluation: held-out perplexity (``perplexity``), EleutherAI's lm-evaluation-harness with our model registered as
``llama-one`` and local tasks built from the standard library (``harness``, ``tasks/``), HumanEval pass@k
(``humaneval``) with model-written code run in sandboxed subprocesses (``sandbox``); ``report`` writes the tables
and JSON of ``python -m llama.eval``.

For a training loop: ``evaluate_perplexity(model, windows)`` over ``shard_windows(...)`` or ``text_windows(...)``,
and ``evaluate_tasks(LlamaOneLM(model=model, tokenizer=tokenizer), ["stdlib_docstring_mc"])`` on the in-memory model;
``llama.train``'s ``[eval]`` section does both every ``eval.interval`` steps (``llama.training.evaluation``).
"""

from llama.evaluation.perplexity import (
    Perplexity, Window, evaluate_perplexity, shard_windows, sliding_windows, text_windows, window_nlls,
)

__all__ = [
    "Perplexity", "Window", "evaluate_perplexity", "shard_windows", "sliding_windows", "text_windows", "window_nlls",
]
