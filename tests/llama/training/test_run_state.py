"""What a run folder guards: its RNG files are loaded without running anything, a resume must continue the run
its checkpoint records (or say what it may change), and one run at a time holds the folder."""

import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from llama.files import FolderInUseError
from llama.training.config import load_config
from llama.training.metrics import read_metrics
from llama.training.resume import CheckpointMismatch, ResumeError, load_rng_state, rng_state
from llama.training.shards import prepare
from llama.training.trainer import train
from tokenizer.train import train as train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
JSON_FILES = [str(f) for f in sorted((STDLIB / "json").glob("*.py"))]
TINY = [
    "--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--model.multiple_of=16", "--model.max_seq_len=32",
    "--data.seq_len=16", "--training.global_batch_size=4", "--training.micro_batch_size=2", "--lr.warmup_steps=0",
    "--checkpoint.interval=2", "--checkpoint.export=false", "--training.eval_interval=0",
    "--metrics.progress_bar=false", "--metrics.tensorboard=false",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Shards of the json package; the same text in other shards (another split); and the same text tokenized by
    another tokenizer with as many tokens (trained on more text): what a careless --data.path may point at."""
    root = tmp_path_factory.mktemp("data")
    train_tokenizer(JSON_FILES, vocab_size=512, output=str(root / "tok"))
    train_tokenizer(JSON_FILES + [str(STDLIB / "textwrap.py")], vocab_size=512, output=str(root / "other_tok"))
    return {
        "shards": prepare(JSON_FILES, str(root / "tok.model"), root / "shards", val_fraction=0),
        "other_split": prepare(JSON_FILES, str(root / "tok.model"), root / "other_split", val_fraction=0.3),
        "other_tokenizer": prepare(JSON_FILES, str(root / "other_tok.model"), root / "other_tokenizer", val_fraction=0),
    }


def args(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"--data.path={data['shards']}", f"--checkpoint.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def run_2_steps(data, tmp_path_factory) -> Path:
    """A run folder whose newest checkpoint is step 2."""
    run_dir = tmp_path_factory.mktemp("run")
    train(load_config(args(data, run_dir, "--training.steps=2")))
    return run_dir


def resumable_copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir / "step-2", to / "step-2")
    shutil.copy(run_dir / "metrics.jsonl", to / "metrics.jsonl")
    return to


# ------------------------------------------------------------------------------------------------- RNG files


def test_rng_states_survive_a_weights_only_load(tmp_path):
    random.seed(3)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = random.random(), torch.rand(3)
    random.seed(4)
    torch.manual_seed(4)
    load_rng_state(tmp_path / "rng.pt")
    python, torch_values = random.random(), torch.rand(3)
    assert python == expected[0] and torch.equal(torch_values, expected[1])


class MakesADirectory:
    """What a hostile checkpoint may hold: an object whose unpickling runs a call of the file's choosing."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_a_pickled_object_in_an_rng_file_is_refused_not_run(run_2_steps, data, tmp_path):
    run_dir = resumable_copy(run_2_steps, tmp_path / "run")
    marker = tmp_path / "the-file-ran-code"
    rng_file = run_dir / "step-2" / "rng-rank-0.pt"
    torch.save({**torch.load(rng_file, weights_only=True), "payload": MakesADirectory(marker)}, rng_file)
    with pytest.raises(ResumeError, match=r"step-2/rng-rank-0.pt: not RNG states .* GLOBAL posix.mkdir"):
        train(load_config(args(data, run_dir, "--training.steps=4")))
    assert not marker.exists()
    assert max(r["step"] for r in read_metrics(run_dir)) == 2  # nothing was trained


# ------------------------------------------------------------------------------------------------- the run


@pytest.mark.parametrize("change, recorded, now", [
    ("--data.path={other_tokenizer}", "tokenizer fingerprint", "tokenizer fingerprint"),
    ("--data.path={other_split}", "shards .*shards \\(\\d+ training tokens", "shards .*other_split"),
    ("--data.seq_len=8", "seq_len 16", "seq_len 8"),
    ("--training.global_batch_size=8", "global_batch_size 4", "global_batch_size 8"),
    ("--training.seed=1", "seed 0", "seed 1"),
    ("--model.rope_theta=500000", "model rope_theta=10000.0", "model rope_theta=500000.0"),
], ids=["tokenizer", "shards", "seq_len", "global_batch_size", "seed", "model"])
def test_a_resume_that_changes_the_run_is_refused_naming_both_values(run_2_steps, data, tmp_path, change, recorded,
                                                                   now):
    run_dir = resumable_copy(run_2_steps, tmp_path / "run")
    change = change.format(**data)
    with pytest.raises(CheckpointMismatch, match=f"step-2 was saved by a run with {recorded}.*, this run has {now}"):
        train(load_config(args(data, run_dir, "--training.steps=4", change)))
    assert max(r["step"] for r in read_metrics(run_dir)) == 2


def test_a_changed_tokenizer_cannot_be_allowed(run_2_steps, data, tmp_path):
    run_dir = resumable_copy(run_2_steps, tmp_path / "run")
    with pytest.raises(CheckpointMismatch, match="train on shards made with it, or use another checkpoint.dir"):
        train(load_config(args(data, run_dir, "--training.steps=4", f"--data.path={data['other_tokenizer']}",
                               "--checkpoint.allow_changed=shards")))


def test_allow_changed_resumes_with_the_change(run_2_steps, data, tmp_path):
    run_dir = resumable_copy(run_2_steps, tmp_path / "run")
    with pytest.raises(CheckpointMismatch, match="add --checkpoint.allow_changed=global_batch_size"):
        train(load_config(args(data, run_dir, "--training.steps=4", "--training.global_batch_size=8")))
    train(load_config(args(data, run_dir, "--training.steps=4", "--training.global_batch_size=8",
                           "--checkpoint.allow_changed=global_batch_size")))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # the resumed run records its own batch: resuming it again needs no allowance
    train(load_config(args(data, run_dir, "--training.steps=6", "--training.global_batch_size=8")))
    assert max(r["step"] for r in read_metrics(run_dir)) == 6


# ------------------------------------------------------------------------------------------------- the lock


def test_one_run_at_a_time_and_a_killed_runs_lock_is_taken_over(data, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "llama.train", *args(data, run_dir, "--training.steps=100000",
                                                           "--checkpoint.interval=0")]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline, "the first run ended before its first step"
            time.sleep(0.05)
        second = subprocess.run([*command, "--training.steps=2"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"is in use by process {first.pid} on host" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        with pytest.raises(FolderInUseError, match=f"process {first.pid}"):  # in-process callers too
            train(load_config(args(data, run_dir, "--training.steps=2")))
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # no chance to clean up: the kernel drops its lock
        first.wait()
    steps_before = len(read_metrics(run_dir))
    train(load_config(args(data, run_dir, "--training.steps=2")))  # no checkpoint: starts over, holding the lock
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2] and steps_before >= 1
