"""Training refuses nonsense before any work and names it: numbers out of range, a device that is not there, an
index.json of the wrong shape, a shard cut short under a running job, a metrics.jsonl cut mid-line."""

import json
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from llama.training.config import ConfigError, load_config
from llama.training.data import ShardError, TokenWindows, read_index
from llama.training.metrics import MetricsError, MetricsLog, read_metrics
from llama.training.shards import prepare
from llama.training.trainer import train
from tokenizer.train import train as train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = [
    "--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--model.multiple_of=16", "--model.max_seq_len=32",
    "--data.seq_len=16", "--training.global_batch_size=4", "--training.micro_batch_size=2", "--lr.warmup_steps=0",
    "--checkpoint.interval=0", "--checkpoint.export=false", "--training.eval_interval=0",
    "--metrics.progress_bar=false", "--metrics.tensorboard=false",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    files = [str(f) for f in sorted((STDLIB / "json").glob("*.py"))]
    train_tokenizer(files, vocab_size=512, output=str(root / "tok"))
    return prepare(files, str(root / "tok.model"), root / "shards", val_fraction=0, shard_tokens=4000)


# ------------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("arg, message", [
    ("--training.global_batch_size=0", "training.global_batch_size must be an integer >= 1, got 0"),
    ("--training.steps=0", "training.steps must be an integer >= 1, got 0"),
    ("--training.steps=-5", "training.steps must be an integer >= 1, got -5"),
    ("--training.micro_batch_size=0", "training.micro_batch_size must be an integer >= 1, got 0"),
    ("--data.seq_len=0", "data.seq_len must be an integer >= 1, got 0"),
    ("--model.n_heads=0", "model.n_heads must be an integer >= 1, got 0"),
    ("--optimizer.lr=-0.001", "optimizer.lr must be a finite number > 0, got -0.001"),
    ("--optimizer.lr=nan", "optimizer.lr must be a finite number > 0, got nan"),
    ("--optimizer.lr=inf", "optimizer.lr must be a finite number > 0, got inf"),
    ("--optimizer.beta2=1", r"optimizer.beta2 must be a finite number in \[0, 1\), got 1.0"),
    ("--model.norm_eps=0", "model.norm_eps must be a finite number > 0, got 0.0"),
    ("--lr.min_lr_ratio=2", r"lr.min_lr_ratio must be a finite number in \[0, 1\], got 2.0"),
    ("--training.steps=1.5", "training.steps: expected int, got '1.5'"),
])
def test_numbers_out_of_range_are_refused_naming_the_key(arg, message):
    with pytest.raises(ConfigError, match=f"^{arg.partition('=')[0]}: {message}"):
        load_config([arg])


def test_a_config_file_names_itself_and_the_key(tmp_path):
    (tmp_path / "run.toml").write_text("[training]\nglobal_batch_size = 0\n")
    with pytest.raises(ConfigError, match=r"run.toml: training.global_batch_size must be an integer >= 1, got 0"):
        load_config(["--config", str(tmp_path / "run.toml")])


def test_the_command_refuses_before_training(shards, tmp_path):
    """Once, through the command: one line, exit status 1, no run folder."""
    out = subprocess.run([sys.executable, "-m", "llama.train", *TINY, f"--data.path={shards}",
                          f"--checkpoint.dir={tmp_path / 'run'}", "--training.global_batch_size=0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr == ("python -m llama.train: error: --training.global_batch_size: training.global_batch_size "
                          "must be an integer >= 1, got 0\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused(shards, tmp_path):
    with pytest.raises(ConfigError, match="training.device is cuda, but .*; use --training.device=cpu"):
        train(load_config([*TINY, f"--data.path={shards}", f"--checkpoint.dir={tmp_path}", "--training.device=cuda"]))


# ------------------------------------------------------------------------------------------------- shards


def first_file(index: dict) -> dict:
    return index["splits"]["train"]["files"][0]


def edit_index(change):
    """An edit of index.json's text that applies ``change`` to the parsed index."""
    def edit(text: str) -> str:
        index = json.loads(text)
        change(index)
        return json.dumps(index)
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda text: text[: len(text) // 2], "JSONDecodeError"),
    (lambda text: "[]", "TypeError"),
    (edit_index(lambda index: index.pop("splits")), "KeyError: 'splits'"),
    (edit_index(lambda index: index.update(dtype="float32")), "dtype float32 is not uint16 or uint32"),
    (edit_index(lambda index: first_file(index).update(path="../../etc/passwd")), "expected a file name in the folder"),
    (edit_index(lambda index: first_file(index).update(tokens="3")), "a file name in the folder and its tokens"),
], ids=["truncated", "list", "no_splits", "dtype", "path_outside", "tokens_string"])
def test_a_corrupt_index_is_named(shards, tmp_path, edit, message):
    folder = tmp_path / "shards"
    folder.mkdir()
    text = edit((shards / "index.json").read_text())
    (folder / "index.json").write_text(text)
    with pytest.raises(ShardError, match=f"index.json is not a shard index written by `llama.prepare`: .*{message}"):
        read_index(folder)


READ_AFTER_TRUNCATION = """
import sys
from llama.training.data import ShardError, TokenWindows, read_index
windows = TokenWindows(read_index(sys.argv[1]), "train", 16)
with open(sys.argv[2], "r+b") as f:
    f.truncate(1000)  # under the open reader, as another job rewriting the shards would
try:
    windows.batch(range(len(windows)))
except ShardError as e:
    print(e)
"""


def test_a_shard_cut_short_while_being_read_stops_with_a_message(shards, tmp_path):
    """In a subprocess: a memory-mapped read of the lost pages would kill it with SIGBUS."""
    folder = tmp_path / "shards"
    subprocess.run(["cp", "-r", str(shards), str(folder)], check=True)
    out = subprocess.run([sys.executable, "-c", READ_AFTER_TRUNCATION, str(folder), str(folder / "train-00000.bin")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "train-00000.bin is 1000 bytes now, where " in out.stdout
    assert "index.json says " in out.stdout and "it was cut short while training read it" in out.stdout


def test_a_training_run_whose_shard_is_cut_short_stops_with_a_message(shards, tmp_path):
    folder = tmp_path / "shards"
    subprocess.run(["cp", "-r", str(shards), str(folder)], check=True)
    command = [sys.executable, "-m", "llama.train", *TINY, f"--data.path={folder}",
               f"--checkpoint.dir={tmp_path / 'run'}", "--training.steps=100000"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text()):
        assert run.poll() is None and time.time() < deadline, run.stderr.read()[-2000:]
        time.sleep(0.05)
    for shard in folder.glob("train-*.bin"):
        with open(shard, "r+b") as f:
            f.truncate(100)
    try:
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 1, (run.returncode, stderr[-2000:])  # not -SIGBUS
    assert "python -m llama.train: error: shard" in stderr and "cut short while training read it" in stderr
    assert run.returncode != -signal.SIGBUS


def test_a_short_shard_is_refused_when_opened(shards, tmp_path):
    folder = tmp_path / "shards"
    subprocess.run(["cp", "-r", str(shards), str(folder)], check=True)
    with open(folder / "train-00001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ShardError, match="train-00001.bin is truncated or corrupt: 100 bytes, expected"):
        TokenWindows(read_index(folder), "train", 16)


# ------------------------------------------------------------------------------------------------- metrics.jsonl


def write_metrics(run_dir: Path, text: str) -> Path:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_a_last_line_cut_short_is_dropped_with_a_warning(tmp_path):
    run_dir = write_metrics(tmp_path / "run", '{"step": 1, "loss": 6.2}\n{"step": 2, "loss": 6.1}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropped an incomplete last line"):
        assert read_metrics(run_dir) == [{"step": 1, "loss": 6.2}, {"step": 2, "loss": 6.1}]
    with pytest.warns(UserWarning):
        MetricsLog(run_dir, resume_step=2, tensorboard=False).close()  # what a resume does
    assert read_metrics(run_dir) == [{"step": 1, "loss": 6.2}, {"step": 2, "loss": 6.1}]  # and the file is whole again


@pytest.mark.parametrize("text, line", [
    ('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', 2),
    ('{"step": 1}\n[1, 2]\n', 2),
    ('{"loss": 1.0}\n', 1),
])
def test_other_damage_is_refused_naming_file_and_line(tmp_path, text, line):
    run_dir = write_metrics(tmp_path / "run", text)
    with pytest.raises(MetricsError, match=f"metrics.jsonl:{line}: expected one JSON object with a 'step' per line"):
        read_metrics(run_dir)


def test_allow_changed_takes_a_toml_list_or_a_comma_list_of_known_names(tmp_path):
    (tmp_path / "run.toml").write_text('[checkpoint]\nallow_changed = ["seq_len", "seed"]\n')
    assert load_config(["--config", str(tmp_path / "run.toml")]).checkpoint.allow_changed == ("seq_len", "seed")
    assert load_config(["--checkpoint.allow_changed=shards,model"]).checkpoint.allow_changed == ("shards", "model")
    with pytest.raises(ConfigError, match="allow_changed must be one of shards, seq_len, global_batch_size, seed, "
                                          "model, got 'tokenizer'"):
        load_config(["--checkpoint.allow_changed=seq_len,tokenizer"])
