"""[eval] in llama.train: held-out perplexity and lm-eval tasks logged every eval.interval steps, equal to
llama.evaluation's numbers on the exported model; LoRA evaluated as the adapted model, the training steps unchanged
by the evaluations; a resume that logs nothing twice; bad settings refused before any work; eval.png."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lm-eval reads local tasks only: nothing may be fetched

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from llama.checkpoint import load_model, save_hf
from llama.evaluation.harness import LlamaOneLM, evaluate_tasks
from llama.evaluation.perplexity import evaluate_perplexity, text_windows
from llama.model import ModelArgs, Transformer
from llama.training.config import ConfigError, load_config, parser
from llama.training.evaluation import task_metrics
from llama.training.metrics import read_metrics
from llama.training.shards import prepare
from llama.training.trainer import train
from tokenizer import load_tokenizer
from tokenizer.train import train as train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
HELD_OUT = [STDLIB / "colorsys.py", STDLIB / "bisect.py"]  # not in the training shards
TASKS = ["stdlib_docstring_mc", "stdlib_docs"]  # multiple choice (acc) and rolling log-likelihood (perplexities)
LIMIT, MAX_LENGTH, STRIDE, BATCH = 2, 64, 48, 4
STEPS = 5
TINY = [
    "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.multiple_of=16",
    "--model.max_seq_len=64", "--data.seq_len=32", f"--training.steps={STEPS}", "--training.global_batch_size=4",
    "--training.micro_batch_size=2", "--optimizer.lr=3e-3", "--lr.warmup_steps=1", "--checkpoint.interval=2",
    "--checkpoint.keep=5", "--training.eval_interval=0", "--metrics.progress_bar=false",
    "--metrics.tensorboard=false", "--training.device=cpu",
]
EVAL = [
    "--eval.interval=2", f"--eval.perplexity={HELD_OUT[0]},sorting={HELD_OUT[1]}", f"--eval.max_length={MAX_LENGTH}",
    f"--eval.stride={STRIDE}", f"--eval.tasks={','.join(TASKS)}", f"--eval.limit={LIMIT}", f"--eval.batch_size={BATCH}",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The json and email packages of the standard library, with a 512-piece sentencepiece BPE."""
    root = tmp_path_factory.mktemp("stdlib")
    files = [str(f) for f in sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))]
    train_tokenizer(files, vocab_size=512, output=str(root / "tokenizer"))
    return prepare(files, str(root / "tokenizer.model"), root / "shards", val_fraction=0.1)


def run_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"--data.path={shards}", f"--checkpoint.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def eval_run(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval_run")
    train(load_config(run_args(shards, run_dir, *EVAL)))
    return run_dir


def eval_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in read_metrics(run_dir)
            if any(k.startswith("eval/") for k in r)}


def held_out_perplexity(model, tokenizer, path: Path) -> float:
    windows, n_bytes, _ = text_windows(tokenizer, str(path), MAX_LENGTH, STRIDE)
    return evaluate_perplexity(model, windows, batch_size=BATCH, n_bytes=n_bytes)


def test_perplexity_is_logged_every_interval_and_equals_llama_evaluation_on_the_export(eval_run):
    logged = eval_records(eval_run)
    assert list(logged) == [0, 2, 4, STEPS]  # before the first step, every 2 steps, after the last
    final = load_model(eval_run / "final", dtype=torch.float32)
    tokenizer = load_tokenizer(eval_run / "final")
    for name, path in zip(("colorsys", "sorting"), HELD_OUT):
        expected = held_out_perplexity(final, tokenizer, path)
        assert logged[STEPS][f"eval/ppl/{name}"] == pytest.approx(expected.perplexity, rel=1e-4)
        assert logged[STEPS][f"eval/bpb/{name}"] == pytest.approx(expected.bits_per_byte, rel=1e-4)
        assert logged[STEPS][f"eval/ppl/{name}"] < logged[0][f"eval/ppl/{name}"] - 50  # it trained in between


def test_lm_eval_metrics_are_logged_and_equal_evaluate_tasks_on_the_export(eval_run):
    logged = eval_records(eval_run)[STEPS]
    final = load_model(eval_run / "final", dtype=torch.float32)
    lm = LlamaOneLM(model=final, tokenizer=load_tokenizer(eval_run / "final"), batch_size=BATCH,
                    max_length=MAX_LENGTH)
    expected = task_metrics(evaluate_tasks(lm, TASKS, limit=LIMIT, bootstrap_iters=0)["results"])
    assert {"eval/stdlib_docstring_mc/acc", "eval/stdlib_docs/word_perplexity"} <= expected.keys()
    tasks_logged = {k: v for k, v in logged.items() if not k.startswith(("eval/ppl/", "eval/bpb/"))}
    assert tasks_logged.keys() == expected.keys()
    for key, value in expected.items():
        assert tasks_logged[key] == pytest.approx(value, rel=1e-4), key
    assert eval_records(eval_run)[0]["eval/stdlib_docs/word_perplexity"] != logged["eval/stdlib_docs/word_perplexity"]


def test_a_resume_logs_each_evaluation_once(eval_run, shards, tmp_path):
    shutil.copytree(eval_run / "step-2", tmp_path / "step-2")
    shutil.copy(eval_run / "metrics.jsonl", tmp_path / "metrics.jsonl")  # steps after 2 are dropped and redone
    train(load_config(run_args(shards, tmp_path, *EVAL)))
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(STEPS + 1))  # one record per step, step 0's (the evaluation before training) kept
    resumed, reference = eval_records(tmp_path), eval_records(eval_run)
    assert resumed.keys() == reference.keys()
    for step, metrics in reference.items():
        assert resumed[step] == pytest.approx(metrics, rel=1e-6), step


def test_two_processes_log_the_evaluations_of_one(eval_run, shards, tmp_path):
    """FSDP2 over two processes: every rank runs the evaluation forwards (the val loss is off, so [eval]'s are the
    first ones the sharded model runs), and the numbers are those of one process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "llama.train", *run_args(shards, tmp_path, *EVAL)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = eval_records(tmp_path), eval_records(eval_run)
    assert two.keys() == one.keys()
    for step, metrics in one.items():
        assert two[step] == pytest.approx(metrics, rel=1e-4), step


def test_two_processes_can_generate_before_the_first_step(shards, tmp_path):
    """A generation task as the sharded model's very first forward (the generation engine runs in inference mode),
    with a tokenizer whose EOS decodes to no text: the run evaluates, then trains."""
    args = run_args(shards, tmp_path, "--eval.interval=1", "--eval.tasks=stdlib_doctest", "--eval.limit=1",
                    "--training.steps=1", "--checkpoint.interval=0", "--checkpoint.export=false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "llama.train", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1] and "loss" in records[1]
    assert all("eval/stdlib_doctest/exact_match" in r for r in records)


@pytest.fixture(scope="module")
def tiny_checkpoint(shards, tmp_path_factory) -> Path:
    """A tiny random model with the shards' tokenizer, as an HF folder for LoRA to adapt."""
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                                  vocab_size=512))
    model.init_weights(seed=1)
    return save_hf(model, tmp_path_factory.mktemp("base") / "base", tokenizer=load_tokenizer(shards / "tokenizer"))


def test_lora_evaluates_as_the_adapted_model_and_trains_as_without_eval(shards, tiny_checkpoint, tmp_path):
    lora = [f"--model.init_from={tiny_checkpoint}", "--lora.rank=4", "--lora.alpha=8", "--lora.dropout=0.3",
            "--checkpoint.interval=0", "--optimizer.lr=1e-2"]
    with_eval = [f"--eval.perplexity={HELD_OUT[0]}", "--eval.tasks=stdlib_docstring_mc", "--eval.interval=2",
                 f"--eval.max_length={MAX_LENGTH}", f"--eval.stride={STRIDE}", "--eval.limit=1",
                 f"--eval.batch_size={BATCH}"]
    train(load_config(run_args(shards, tmp_path / "eval", *lora, *with_eval)))
    train(load_config(run_args(shards, tmp_path / "plain", *lora, "--checkpoint.export=false")))
    records = read_metrics(tmp_path / "eval")
    # lm-eval seeds the random generators; dropout draws the same masks as without the evaluations
    assert [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in read_metrics(tmp_path / "plain")]
    merged = load_model(tmp_path / "eval" / "final", dtype=torch.float32)  # adapters merged into the base
    expected = held_out_perplexity(merged, load_tokenizer(tiny_checkpoint), HELD_OUT[0]).perplexity
    logged = [r["eval/ppl/colorsys"] for r in records if "eval/ppl/colorsys" in r]
    assert logged[-1] == pytest.approx(expected, rel=1e-4)
    base = held_out_perplexity(load_model(tiny_checkpoint, dtype=torch.float32), load_tokenizer(tiny_checkpoint),
                               HELD_OUT[0]).perplexity
    assert logged[0] == pytest.approx(base, rel=1e-4) and abs(logged[-1] / base - 1) > 1e-3  # B starts at zero


@pytest.mark.parametrize("extra, message", [
    (["--eval.tasks=stdlib_docstring_mc,no_such_task"], r"eval.tasks: unknown lm-eval task\(s\) no_such_task"),
    ([f"--eval.perplexity=held={STDLIB / 'no_such_file.txt'}"], r"eval.perplexity held: input .*no_such_file.txt "
                                                                r"matches no file"),
    ([f"--eval.perplexity={STDLIB / 'json' / '*.py'}"], r"eval.perplexity: name the glob .*json/\*.py"),
    ([f"--eval.perplexity={HELD_OUT[0]},colorsys={HELD_OUT[1]}"], "two entries are named 'colorsys'"),
    ([f"--eval.perplexity={HELD_OUT[0]}", "--eval.stride=65"], "eval.stride 65 exceeds eval.max_length 64"),
    ([f"--eval.perplexity={HELD_OUT[0]}", "--eval.max_length=65"], "eval.max_length 65 exceeds the model's context"),
    ([], "eval.interval is 3, but there is nothing to evaluate"),
])
def test_bad_eval_settings_are_refused_before_any_work(shards, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(load_config(run_args(shards, tmp_path / "run", "--eval.interval=3", *extra)))
    assert not (tmp_path / "run").exists()  # no lock, no metrics: refused before the run folder or model existed


def test_interval_zero_turns_eval_off_unchecked(shards, tmp_path):
    train(load_config(run_args(shards, tmp_path, "--eval.tasks=no_such_task", "--training.steps=1",
                               "--checkpoint.export=false", "--checkpoint.interval=0")))
    assert not eval_records(tmp_path)


def test_help_lists_every_eval_key_with_its_meaning():
    text = parser().format_help()
    for key in ("interval", "perplexity", "max_length", "stride", "tasks", "limit", "batch_size"):
        assert f"--eval.{key}" in text
    assert "eval/ppl/NAME" in text and "eval/TASK/METRIC" in text


def test_task_metrics_name_lm_eval_results():
    results = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                         "exact_match,flexible-extract": 0.5},
               "arc_easy": {"acc,none": 0.75, "acc_stderr,none": "N/A", "acc_norm,none": 0.5, "samples": 4}}
    assert task_metrics(results) == {"eval/gsm8k/exact_match/strict-match": 0.25,
                                     "eval/gsm8k/exact_match/flexible-extract": 0.5,
                                     "eval/arc_easy/acc": 0.75, "eval/arc_easy/acc_norm": 0.5}


def test_plot_draws_the_eval_series(eval_run):
    pytest.importorskip("matplotlib")
    from llama.training.plots import eval_groups, plot

    assert [p.name for p in plot(eval_run)] == ["loss.png", "lr.png", "throughput.png", "eval.png"]
    assert (eval_run / "eval.png").stat().st_size > 1000
    groups = eval_groups(read_metrics(eval_run))
    assert list(groups)[:2] == ["ppl", "bpb"] and sorted(groups)[2:] == sorted(TASKS)  # tasks in lm-eval's order
    assert groups["ppl"] == ["eval/ppl/colorsys", "eval/ppl/sorting"]
    assert set(groups["stdlib_docstring_mc"]) == {"eval/stdlib_docstring_mc/acc", "eval/stdlib_docstring_mc/acc_norm"}
