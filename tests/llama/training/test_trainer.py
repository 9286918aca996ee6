"""llama.train on CPU with gloo: FSDP2 training on real text, exact resume, export, and refusal of bad input.

One two-process run (``run_a``) is the reference the other runs are compared with: one process at the same global
batch, a resume on another number of processes, and a run killed with SIGKILL and started again."""

import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from llama.training.resume import CheckpointMismatch
from llama.training.config import ConfigError, load_config
from llama.training.data import ShardError
from llama.checkpoint.embedded import default_checkpoint
from llama.training.metrics import read_metrics
from llama.model import ModelArgs, Transformer
from llama.training.shards import prepare
from llama.training.optim import lr_factor
from llama.training.trainer import TrainingDiverged, train
from tokenizer.train import train as train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
STEPS = 30
TINY = [
    "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.multiple_of=16",
    "--model.max_seq_len=64", "--data.seq_len=32", f"--training.steps={STEPS}", "--training.global_batch_size=8",
    "--training.micro_batch_size=2", "--optimizer.lr=3e-3", "--lr.warmup_steps=3", "--checkpoint.interval=10",
    "--checkpoint.keep=3", "--training.eval_interval=10", "--training.eval_batches=2", "--metrics.log_samples=true",
    "--metrics.progress_bar=false", "--metrics.tensorboard=false",
]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread per process, as torchrun's workers do: tiny matmuls gain nothing from more,
    and on a busy machine competing threads slow them down several-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as an HF folder with its tokenizer (converted once from the embedded GGUF)."""
    return default_checkpoint()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Real text: the json and email packages of the standard library, with a 512-piece sentencepiece BPE."""
    root = tmp_path_factory.mktemp("stdlib")
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))
    train_tokenizer([str(f) for f in files], vocab_size=512, output=str(root / "tokenizer"))
    return prepare([str(f) for f in files], str(root / "tokenizer.model"), root / "shards", val_fraction=0.1)


def run_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"--data.path={shards}", f"--checkpoint.dir={run_dir}", *extra]


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "llama.train", *args]


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_command(nproc, args), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}


def windows(run_dir: Path) -> dict[int, list[int]]:
    return {r["step"]: r["windows"] for r in read_metrics(run_dir) if "windows" in r}


def dcp_model(step_dir: Path, args: ModelArgs) -> Transformer:
    """A plain model holding the weights of a sharded checkpoint (read without any process group)."""
    model = Transformer(args)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    model.load_state_dict(state["model"])
    return model.eval()


TINY_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64, vocab_size=512)


@pytest.fixture(scope="module")
def run_a(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run_a")
    torchrun(2, run_args(shards, run_dir))
    return run_dir


def test_two_processes_learn_on_stdlib_text(run_a):
    records = read_metrics(run_a)
    loss = losses(run_a)
    assert len(loss) == STEPS
    assert sum(loss[s] for s in range(26, 31)) / 5 < loss[1] - 0.6  # from ln(512) = 6.24 towards ~5.3
    val = val_losses(run_a)
    assert list(val) == [0, 10, 20, 30] and val[30] < val[0] - 0.5
    assert math.isclose(val[0], math.log(512), abs_tol=0.1)  # an untrained model is uniform over the vocabulary
    last = records[-1]
    assert last["tokens_per_s"] > 0 and last["mfu"] is None and last["peak_memory_gib"] > 0  # no MFU on CPU
    assert [p.name for p in sorted(run_a.glob("step-*"))] == ["step-10", "step-20", "step-30"]
    assert (run_a / "final" / "config.json").is_file()


def test_one_process_matches_two_at_the_same_global_batch(run_a, shards, tmp_path):
    train(load_config(run_args(shards, tmp_path)))
    one, two = losses(tmp_path), losses(run_a)
    assert max(abs(one[s] - two[s]) for s in two) < 1e-5
    # 4 micro-batches here, 2 per process there: the gradient (and its norm) must not depend on their count
    norm_one, norm_two = ({r["step"]: r["grad_norm"] for r in read_metrics(run) if "loss" in r}
                          for run in (tmp_path, run_a))
    assert max(abs(norm_one[s] / norm_two[s] - 1) for s in norm_two) < 1e-4
    val_one, val_two = (val_losses(run) for run in (tmp_path, run_a))
    assert val_one.keys() == val_two.keys() and max(abs(val_one[s] - val_two[s]) for s in val_two) < 1e-5
    assert windows(tmp_path) == windows(run_a)


def test_resume_on_another_process_count_continues_the_sample_order(run_a, shards, tmp_path):
    shutil.copytree(run_a / "step-10", tmp_path / "step-10")
    shutil.copy(run_a / "metrics.jsonl", tmp_path / "metrics.jsonl")  # steps after 10 are dropped and redone
    train(load_config(run_args(shards, tmp_path)))  # one process where run_a had two
    resumed, reference = windows(tmp_path), windows(run_a)
    assert resumed == reference
    consumed = [w for s in range(1, STEPS + 1) for w in resumed[s]]
    assert len(set(consumed)) == len(consumed) == STEPS * 8  # nothing repeated within the epoch, nothing skipped
    assert max(abs(losses(tmp_path)[s] - losses(run_a)[s]) for s in range(11, STEPS + 1)) < 1e-5


def test_kill_9_then_rerun_gives_bit_identical_weights(run_a, shards, tmp_path):
    command = torchrun_command(2, run_args(shards, tmp_path))
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "step-10" / "train_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, without any chance to clean up
    proc.wait()
    assert not (tmp_path / "final").exists(), "the run finished before it could be killed"
    # Leftovers of interrupted saves: a temp folder of a writer that is gone (another host's), and a step folder
    # whose train_state.json was never written.
    leftover = tmp_path / ".step-28.tmp-gone.example-12345"
    shutil.copytree(tmp_path / "step-10", leftover)
    shutil.copytree(tmp_path / "step-10", tmp_path / "step-29")
    (tmp_path / "step-29" / "train_state.json").unlink()

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "step-29" not in result.stderr
    assert not leftover.exists()  # the interrupted save's leftover is cleaned up
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == (run_a / "final" / "model.safetensors").read_bytes()
    assert losses(tmp_path) == losses(run_a)


def test_export_only_writes_the_newest_checkpoint(run_a, shards, tmp_path):
    shutil.copytree(run_a / f"step-{STEPS}", tmp_path / f"step-{STEPS}")
    train(load_config(run_args(shards, tmp_path, "--checkpoint.export_only=true")))
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == (run_a / "final" / "model.safetensors").read_bytes()
    assert not (tmp_path / "metrics.jsonl").exists()  # no training happened


def test_exported_folder_gives_transformers_our_logits(run_a):
    transformers = pytest.importorskip("transformers")
    ours = dcp_model(run_a / f"step-{STEPS}", TINY_ARGS)  # the trained weights straight from the sharded save
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run_a / "final", dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        delta = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert delta < 1e-4, delta


def test_checkpoint_from_another_model_is_refused(run_a, shards, tmp_path):
    shutil.copytree(run_a / f"step-{STEPS}", tmp_path / f"step-{STEPS}")
    with pytest.raises(CheckpointMismatch, match=r"saved by a run with model dim=64, .* this run has model dim=32"):
        train(load_config(run_args(shards, tmp_path, "--model.dim=32")))
    # allowed to change the model's arguments, its shapes must still fit the checkpoint's tensors
    with pytest.raises(CheckpointMismatch, match=r"different model: tok_embeddings.weight has shape \(512, 64\)"):
        train(load_config(run_args(shards, tmp_path, "--model.dim=32", "--checkpoint.allow_changed=model")))


def test_activation_checkpointing_leaves_the_losses_unchanged(shards, tmp_path):
    runs = {}
    for mode in ("none", "full", "selective"):
        train(load_config(run_args(shards, tmp_path / mode, "--training.steps=3", "--checkpoint.export=false",
                                   f"--training.activation_checkpointing={mode}")))
        runs[mode] = losses(tmp_path / mode)
    assert runs["full"] == runs["none"]
    assert max(abs(runs["selective"][s] - runs["none"][s]) for s in runs["none"]) < 1e-6


def test_non_finite_steps_are_skipped_then_the_run_stops(shards, tmp_path):
    # A learning rate of 1e30 sends the weights to ~1e30 after the first update; the next losses are not finite.
    args = run_args(shards, tmp_path, "--optimizer.lr=1e30", "--lr.warmup_steps=0", "--lr.schedule=constant",
                    "--training.max_bad_steps=2", "--checkpoint.interval=1", "--training.eval_interval=0")
    with pytest.raises(TrainingDiverged, match="2 steps in a row had a non-finite loss"):
        train(load_config(args))
    records = read_metrics(tmp_path)
    assert [r["skipped"] for r in records] == [False, True, True]
    assert records[-1]["skipped_steps"] == 2
    # A skipped step leaves the weights as they were.
    after_1, after_2 = dcp_model(tmp_path / "step-1", TINY_ARGS), dcp_model(tmp_path / "step-2", TINY_ARGS)
    for (name, a), b in zip(after_1.state_dict().items(), after_2.state_dict().values()):
        assert torch.equal(a, b), name


def test_continued_pretraining_of_smollm2_starts_at_its_own_loss(smollm2, tmp_path):
    files = [STDLIB / "json" / "decoder.py", STDLIB / "json" / "encoder.py", STDLIB / "textwrap.py"]
    shards = prepare([str(f) for f in files], str(smollm2), tmp_path / "shards", val_fraction=0.34)
    train(load_config([
        f"--model.init_from={smollm2}", f"--data.path={shards}", f"--checkpoint.dir={tmp_path / 'run'}",
        "--data.seq_len=32", "--training.steps=2", "--training.global_batch_size=1", "--training.micro_batch_size=1",
        "--optimizer.lr=1e-5", "--lr.warmup_steps=0", "--checkpoint.interval=0", "--checkpoint.export=false",
        "--training.eval_interval=2", "--training.eval_batches=1", "--metrics.progress_bar=false",
    ]))
    records = read_metrics(tmp_path / "run")
    # Before any update the validation loss is the model's own: transformers on the same window (the first one
    # of the validation split) gives the same number.
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    window = torch.from_numpy(np.fromfile(shards / "val-00000.bin", dtype=np.uint16)[:33].astype(np.int64))[None]
    with torch.no_grad():
        hf_loss = reference(window, labels=window).loss.item()
    assert records[0]["val_loss"] == pytest.approx(hf_loss, abs=1e-4)
    uniform = math.log(49152)
    assert records[0]["val_loss"] < uniform / 2  # a trained model on Python source: far below chance (10.8)
    assert records[1]["loss"] < uniform / 2
    assert abs(records[-1]["val_loss"] - records[0]["val_loss"]) < 0.5  # a tiny lr keeps it where it was


def test_shards_from_another_tokenizer_are_refused(shards, smollm2, tmp_path):
    with pytest.raises(ShardError, match="tokenized with a different tokenizer than .*SmolLM2"):
        train(load_config(run_args(shards, tmp_path, f"--model.init_from={smollm2}")))


@pytest.mark.parametrize("extra, error, message", [
    (["--data.seq_len=65"], ConfigError, "data.seq_len 65 exceeds the model's context of 64"),
    (["--training.global_batch_size=6", "--training.micro_batch_size=4"], ConfigError, "must be a multiple of"),
    (["--model.vocab_size=100"], ShardError, "vocabulary of 512 tokens, the model has only 100"),
])
def test_bad_configuration_is_refused_before_training(shards, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        train(load_config(run_args(shards, tmp_path, *extra)))
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard folder .*nope does not exist"):
        train(load_config(run_args(tmp_path / "nope", tmp_path)))


def test_learning_rate_schedules():
    cfg = load_config(["--training.steps=100", "--lr.warmup_steps=10", "--lr.min_lr_ratio=0.1"])
    factors = [lr_factor(i, cfg.lr, cfg.training.steps) for i in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0  # linear warmup, peak at the end of it
    assert factors[-1] == pytest.approx(0.1) and factors[54] == pytest.approx(0.55)  # cosine: half-way at 55
    cfg = load_config(["--training.steps=100", "--lr.warmup_steps=10", "--lr.schedule=wsd", "--lr.decay_fraction=0.2",
                       "--lr.min_lr_ratio=0"])
    factors = [lr_factor(i, cfg.lr, cfg.training.steps) for i in range(100)]
    assert factors[10:80] == [1.0] * 70 and factors[89] == pytest.approx(0.5) and factors[99] == 0.0


def test_plot_writes_curves(run_a):
    pytest.importorskip("matplotlib")
    from llama.training.plots import plot

    assert [p.name for p in plot(run_a)] == ["loss.png", "lr.png", "throughput.png"]
    assert all(p.stat().st_size > 1000 for p in run_a.glob("*.png"))
