"""Evaluation speed: the wall time of a HumanEval pass@1 run and of lm-eval tasks, ours against the peers on the
same model (SmolLM2-135M-Instruct, fp32), machine and batch size, in the same run:
- HumanEval: completions from our batched engine vs transformers' ``generate`` in static batches (prompts sorted
  by length, greedy, the same stop sequences through its ``stop_strings``); both run in the same sandbox, whose
  time is reported apart; pass@1 of both and how many completions agree;
- lm-eval: each local task through our ``llama-one`` model vs lm-eval's own ``hf`` model (``simple_evaluate``).

    python -m bench.evaluate                                  # all 164 problems, the three local tasks in full
    python -m bench.evaluate --limit 20 --lm_eval_limit 40    # a shorter run
    python -m bench.evaluate --quick --output /tmp/r          # 1 problem, 8 tokens, 2 examples (what tests run)

Ours runs eager by default: ``--compile`` compiles the engine's decode step for HumanEval (a graph per batch size
of the decode step, up to log2(batch_size) + 1 of them; the first one is timed apart as ``warmup_s``), which pays
on CPU only over runs much longer than these. Times hold everything else.
"""

from __future__ import annotations

import os
import time

import fire
import torch

from bench.common import print_table, write_result
from llama.checkpoint import load_checkpoint
from llama.checkpoint.embedded import default_checkpoint
from llama.evaluation import humaneval as he
from llama.generation import Llama
from llama.generation.text import cut_at_stop

TASKS = "stdlib_docstring_mc,stdlib_doctest,stdlib_docs"
MAIN_METRIC = {"multiple_choice": "acc,none", "generate_until": "exact_match,none",
               "loglikelihood_rolling": "word_perplexity,none"}


def humaneval_ours(folder, problems, batch_size: int, max_tokens: int, compile: bool) -> tuple[list, dict]:
    model, tokenizer = load_checkpoint(folder)
    llama = Llama(model, tokenizer, max_seq_len=1024, max_batch_size=batch_size, compile=compile)
    start = time.perf_counter()
    he.generate(llama, problems[:1], max_tokens=4)  # compiles the decode step
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    samples = he.generate(llama, problems, max_tokens=max_tokens, progress=True)
    return samples, {"seconds": time.perf_counter() - start, "warmup_s": warmup}


@torch.inference_mode()
def humaneval_transformers(folder, problems, batch_size: int, max_tokens: int) -> tuple[list, dict]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer.encode(p["prompt"]) for p in problems]
    order = sorted(range(len(problems)), key=lambda i: -len(prompts[i]))  # little padding within a batch
    completions = [""] * len(problems)
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(prompts[i])) + prompts[i] for i in rows])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             stop_strings=list(he.STOP), tokenizer=tokenizer, pad_token_id=tokenizer.eos_token_id)
        for i, row in zip(rows, out[:, width:].tolist()):
            completions[i] = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), he.STOP)
    seconds = time.perf_counter() - start
    return [[he.Sample(p["task_id"], c)] for p, c in zip(problems, completions)], {"seconds": seconds, "warmup_s": 0.0}


def lm_eval_rows(folder, tasks: list[str], limit, batch_size: int) -> list[dict]:
    import lm_eval

    from llama.evaluation.harness import LlamaOneLM, task_manager

    manager = task_manager(tasks=tasks)
    rows = []
    for task in tasks:
        times, values = {}, {}
        for variant in ("ours", "lm-eval hf"):
            if variant == "ours":
                lm = LlamaOneLM(pretrained=str(folder), batch_size=batch_size)
            else:
                from lm_eval.models.huggingface import HFLM

                lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=batch_size)
            start = time.perf_counter()
            result = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit)
            times[variant] = time.perf_counter() - start
            output_type = result["configs"][task]["output_type"]
            values[variant] = result["results"][task][MAIN_METRIC[output_type]]
            examples = result["results"][task].get("sample_len") or result["n-samples"][task]["effective"]
            del lm
        for variant in times:
            rows.append({"job": f"lm-eval {task}", "variant": variant, "examples": examples,
                         "seconds": times[variant], "metric": MAIN_METRIC[output_type].split(",")[0],
                         "value": values[variant], "x_vs_peer": times["lm-eval hf"] / times[variant]})
    return rows


def main(
    limit: int = 164,
    tasks: str = TASKS,
    lm_eval_limit: float | None = None,
    batch_size: int = 16,
    max_tokens: int = 512,
    compile: bool = False,
    threads: int = 2,
    timeout: float = 10.0,
    output: str | None = None,
    quick: bool = False,
):
    """Time HumanEval pass@1 on the first ``limit`` problems and the lm-eval ``tasks`` (comma list;
    ``lm_eval_limit`` examples each, all by default), ours vs the peers, at ``batch_size``."""
    if quick:
        limit, tasks, lm_eval_limit, max_tokens, compile = 1, "stdlib_docstring_mc", 2, 8, False
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = default_checkpoint()
    problems = he.load_problems(limit)
    rows, passes, runs = [], {}, {}
    for variant, run in (("ours", lambda: humaneval_ours(folder, problems, batch_size, max_tokens, compile)),
                         ("transformers", lambda: humaneval_transformers(folder, problems, batch_size, max_tokens))):
        samples, timing = run()
        start = time.perf_counter()
        he.execute(problems, samples, timeout=timeout)
        result = he.score(problems, samples, ks=(1,))
        runs[variant], passes[variant] = samples, result.pass_at[1]
        rows.append({"job": "humaneval", "variant": variant, "examples": len(problems), **timing,
                     "execution_s": time.perf_counter() - start, "metric": "pass@1", "value": result.pass_at[1]})
    for row in rows:
        row["x_vs_peer"] = rows[1]["seconds"] / row["seconds"]
    agree = sum(a[0].completion == b[0].completion for a, b in zip(runs["ours"], runs["transformers"]))
    rows += lm_eval_rows(folder, tasks.split(","), lm_eval_limit, batch_size)
    print_table(rows, ["job", "variant", "examples", "seconds", "warmup_s", "metric", "value", "x_vs_peer"])
    print(f"HumanEval: {agree} of {len(problems)} completions identical between ours and transformers")
    path = write_result(
        "evaluate", torch.device("cpu"), rows, out_dir=output, model="SmolLM2-135M-Instruct", dtype="float32",
        batch_size=batch_size, max_tokens=max_tokens, compile=compile, humaneval_identical_completions=agree,
        humaneval_problems=he.score(problems, runs["ours"], ks=(1,)).problem_rows(),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(main)
