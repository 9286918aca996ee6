"""Evaluate a checkpoint: held-out perplexity, lm-evaluation-harness tasks, HumanEval pass@k.

    python -m llama.eval perplexity CKPT --data SHARDS_OR_TEXT [--split val] [--max_length N] [--stride N]
    python -m llama.eval lm-eval CKPT --tasks stdlib_docstring_mc stdlib_doctest [--limit N] [--num_fewshot K]
    python -m llama.eval humaneval CKPT [--n 1] [--temperature 0] [--limit K] [--chat]

CKPT is anything ``llama.checkpoint`` reads (default: the embedded SmolLM2-135M-Instruct). Each subcommand prints
a Markdown table and writes its results as JSON to --output (default ``runs/eval/<kind>-<checkpoint>-<time>.json``;
HumanEval also writes one line per problem to the same name with ``.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from llama import cli
from llama.evaluation.report import default_output, markdown_table, write_json
from llama.transforms.quantize import QUANTIZATIONS

PROG = "python -m llama.eval"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load(args):
    """(model, tokenizer) as the options say; the checkpoint defaults to the embedded model."""
    from llama.checkpoint import load_checkpoint
    from llama.transforms.quantize import quantize_weights
    from tokenizer import check_fits

    if args.ckpt is None:
        from llama.checkpoint.embedded import default_checkpoint

        args.ckpt = str(default_checkpoint())
    model, tokenizer = load_checkpoint(args.ckpt, args.tokenizer_path, device=args.device, dtype=DTYPES[args.dtype])
    check_fits(tokenizer, model.args.vocab_size)
    if args.quantize:
        quantize_weights(model, args.quantize)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------- perplexity


def perplexity(args) -> dict:
    from llama.evaluation.perplexity import evaluate_perplexity, shard_windows, text_windows

    model, tokenizer = load(args)
    max_length = min(args.max_length or model.args.max_seq_len, model.args.max_seq_len)
    start = time.perf_counter()
    if len(args.data) == 1 and (Path(args.data[0]) / "index.json").is_file():
        windows, n_bytes, documents = shard_windows(tokenizer, args.data[0], args.split, max_length, args.stride)
    else:
        windows, n_bytes, documents = text_windows(tokenizer, args.data, max_length, args.stride)
    result = evaluate_perplexity(model, windows, batch_size=args.batch_size, n_bytes=n_bytes, documents=documents,
                                 progress=True)
    seconds = time.perf_counter() - start
    return {
        "kind": "perplexity", "checkpoint": args.ckpt, "data": args.data, "split": args.split,
        "max_length": max_length, "stride": args.stride or max_length, "dtype": args.dtype, "quantize": args.quantize,
        **result.as_dict(), "seconds": seconds, "tokens_per_second": result.tokens / seconds,
    }


def perplexity_table(result: dict) -> str:
    return markdown_table([result], ["documents", "tokens", "bytes", "nll_per_token", "perplexity", "bits_per_byte"])


# ------------------------------------------------------------------------------------------------- lm-eval


def lm_eval(args) -> dict:
    from lm_eval.utils import handle_non_serializable, make_table

    from llama.evaluation.harness import LlamaOneLM, evaluate_tasks, task_manager

    manager = task_manager(args.include_path, args.tasks)  # unknown tasks are refused before the model loads
    model, tokenizer = load(args)
    lm = LlamaOneLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                    max_gen_toks=args.max_gen_toks, compile=args.compile, seed=args.seed)
    lm.name = args.ckpt
    start = time.perf_counter()
    results = evaluate_tasks(
        lm, args.tasks, manager=manager, limit=args.limit, num_fewshot=args.num_fewshot,
        log_samples=args.log_samples, apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.apply_chat_template, gen_kwargs=args.gen_kwargs, random_seed=args.seed,
    )
    seconds = time.perf_counter() - start
    results["table"] = make_table(results)
    plain = json.loads(json.dumps(results, default=handle_non_serializable))  # numpy numbers, functions in configs
    return {"kind": "lm-eval", "checkpoint": args.ckpt, "tasks": args.tasks, "limit": args.limit,
            "dtype": args.dtype, "quantize": args.quantize, "compile": args.compile, "seconds": seconds, **plain}


# ------------------------------------------------------------------------------------------------- HumanEval


def humaneval(args) -> dict:
    from llama.evaluation import humaneval as he
    from llama.generation import Llama

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    problems = he.load_problems(args.limit)
    model, tokenizer = load(args)
    llama = Llama(model, tokenizer, args.max_seq_len, args.batch_size, seed=args.seed, compile=args.compile)
    start = time.perf_counter()
    samples = he.generate(llama, problems, n=args.n, temperature=args.temperature, top_p=args.top_p,
                          max_tokens=args.max_tokens, chat=args.chat, seed=args.seed, progress=True)
    generation_seconds = time.perf_counter() - start
    start = time.perf_counter()
    he.execute(problems, samples, timeout=args.timeout, workers=args.workers, progress=True)
    execution_seconds = time.perf_counter() - start
    result = he.score(problems, samples, args.k)
    args.problems_file = Path(args.output).with_suffix(".jsonl")
    write_jsonl(args.problems_file, result.problem_rows())
    outcomes = [s.outcome for row in samples for s in row]
    return {
        "kind": "humaneval", "checkpoint": args.ckpt, "prompt": "chat" if args.chat else "completion",
        "problems": len(problems), "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
        "max_tokens": args.max_tokens, "stop": [] if args.chat else list(he.STOP), "dtype": args.dtype,
        "quantize": args.quantize, "compile": args.compile,
        **{f"pass@{k}": v for k, v in result.pass_at.items()},
        "passed": sum(o.passed for o in outcomes), "failed": sum(o.status == "failed" for o in outcomes),
        "timed_out": sum(o.status == "timed out" for o in outcomes), "sandbox": outcomes[0].isolation,
        "generation_seconds": generation_seconds, "execution_seconds": execution_seconds,
        "problems_file": str(args.problems_file),
    }


def humaneval_table(result: dict) -> str:
    ks = [key for key in result if key.startswith("pass@")]
    return markdown_table([result], ["problems", "n", "prompt", *ks, "passed", "failed", "timed_out"])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(PROG, __doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{perplexity,lm-eval,humaneval}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("ckpt", nargs="?", help="checkpoint folder or .gguf file (default: embedded SmolLM2)")
    common.add_argument("--tokenizer_path", help="tokenizer file or folder (default: beside the checkpoint)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    common.add_argument("--quantize", choices=QUANTIZATIONS, help="weight-only int8 or grouped int4 linears")
    common.add_argument("--batch_size", type=int, default=8, help="sequences per forward / generation slots")
    common.add_argument("--seed", type=int, default=1, help="seeds sampling (and lm-eval's few-shot draws)")
    common.add_argument("--output", help="the JSON file to write (default: runs/eval/<kind>-<checkpoint>-<time>.json)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help, description=help, allow_abbrev=False,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    p = command("perplexity", "token-level NLL, perplexity and bits per byte over held-out data")
    p.add_argument("--data", nargs="+", required=True,
                   help="a shard folder (llama.prepare) or text inputs: files, folders, globs, comma lists")
    p.add_argument("--split", default="val", help="the split of a shard folder")
    p.add_argument("--max_length", type=int, help="tokens a window reads (default: the model's context)")
    p.add_argument("--stride", type=int, help="new tokens scored per window (default: max_length, no overlap)")
    p.set_defaults(work=perplexity, table=perplexity_table)

    p = command("lm-eval", "lm-evaluation-harness tasks through our model (the local stdlib_* tasks included)")
    p.add_argument("--tasks", nargs="+", required=True, help="task or group names")
    p.add_argument("--include_path", nargs="*", help="more folders of task YAML files")
    p.add_argument("--limit", type=float, help="examples per task (a fraction below 1)")
    p.add_argument("--num_fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--max_length", type=int, help="context in tokens (default: the model's)")
    p.add_argument("--max_gen_toks", type=int, default=256, help="generated tokens at most, unless a task says")
    p.add_argument("--gen_kwargs", help="generation settings for every generation task, as k=v,k=v")
    p.add_argument("--apply_chat_template", action="store_true", help="prompts in the checkpoint's chat format")
    p.add_argument("--log_samples", action="store_true", help="keep every request and response in the JSON")
    p.add_argument("--compile", action="store_true", help="compile the generation engine's decode step")
    p.set_defaults(work=lm_eval, table=lambda result: result["table"])

    p = command("humaneval", "HumanEval pass@k: engine completions run in sandboxed subprocesses")
    p.add_argument("--n", type=int, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling (with a temperature)")
    p.add_argument("--limit", type=int, help="the first K problems only")
    p.add_argument("--chat", action="store_true", help="instruct form: the prompt in a chat message")
    p.add_argument("--max_tokens", type=int, default=512, help="generated tokens per completion at most")
    p.add_argument("--max_seq_len", type=int, default=1024,
                   help="KV-cache length per slot: prompt and completion (HumanEval's longest prompt is ~440 tokens)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 10, 100], help="pass@k for these k (those <= n)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--workers", type=int, help="programs run at once (default: the CPU count)")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.set_defaults(work=humaneval, table=humaneval_table)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.output = args.output or str(default_output(args.command, args.ckpt or "SmolLM2-135M-Instruct"))
    result = cli.run(PROG, args.work, args)
    print(args.table(result))
    print(f"wrote {write_json(args.output, result)}")


if __name__ == "__main__":
    main()
