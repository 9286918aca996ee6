"""examples/configs/smollm2_sft_lora.toml on the real SmolLM2-135M-Instruct, through the README's commands: the
chat set built from the standard library's docstrings, shards, LoRA training, chat with the result.

The whole run (about 10 minutes on a busy 2-core machine) is opt-in: ``pytest -m real tests/examples``. It checks
that the held-out loss falls and that most held-out questions are answered in the taught way ("From the Python
docs: ...") where the base model answers almost none so. The suite runs a short version: a few steps, the loss
falling, the merged export chatting."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama.checkpoint.embedded import default_checkpoint
from llama.generation import Llama
from llama.training.metrics import read_metrics

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "examples" / "configs" / "smollm2_sft_lora.toml"
spec = importlib.util.spec_from_file_location("stdlib_chat", ROOT / "examples" / "stdlib_chat.py")
stdlib_chat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stdlib_chat)


def run(*command: str, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    """(the chat shards, the held-out questions), by the README's first two commands."""
    root = tmp_path_factory.mktemp("sft")
    run("examples/stdlib_chat.py", "build", str(root / "data"), timeout=300)
    run("-m", "llama.prepare", "--format", "chat", "--input", str(root / "data" / "chats.jsonl"), "--tokenizer",
        str(default_checkpoint()), "--output", str(root / "shards"), "--val_fraction", "0.05", timeout=600)
    return root / "shards", root / "data" / "heldout.jsonl"


def test_the_chat_set_is_built_deterministically_from_docstrings(shards):
    first = stdlib_chat.entries()
    assert first == stdlib_chat.entries() and len(first) > 500
    assert all(answer.startswith(stdlib_chat.PHRASE) for _, answer in first)
    index = json.loads((shards[0] / "index.json").read_text())
    assert index["format"] == "chat" and index["boundary_mismatches"] == 0


def train(shards: Path, run_dir: Path, *extra: str):
    run("-m", "llama.train", "--config", str(CONFIG), f"--model.init_from={default_checkpoint()}",
        f"--data.path={shards}", f"--checkpoint.dir={run_dir}", "--metrics.progress_bar=false", *extra, timeout=3600)


def test_short_run_lowers_the_held_out_loss_and_chats(shards, tmp_path):
    train(shards[0], tmp_path, "--data.seq_len=192", "--training.steps=4", "--training.eval_interval=4",
          "--training.eval_batches=1", "--training.global_batch_size=2", "--training.micro_batch_size=2",
          "--lr.warmup_steps=1", "--optimizer.lr=3e-3", "--checkpoint.interval=0")
    val = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r}
    assert val[4] < val[0] - 0.2, val
    llm = Llama.build(tmp_path / "final", max_seq_len=256, max_batch_size=2, device="cpu")
    answer = llm.chat_completion([[{"role": "user", "content": "What does `json.dumps` do?"}]], temperature=0,
                                 max_gen_len=6)
    assert answer[0]["generation"]["content"]


@pytest.mark.real
def test_example_config_teaches_the_style(shards, tmp_path):
    """The full example run; the figures it prints are those in README and the closing note."""
    train(shards[0], tmp_path)
    val = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r}
    rows = [json.loads(line) for line in shards[1].read_text().splitlines()]
    before = stdlib_chat.taught_share(Llama.build(default_checkpoint(), max_seq_len=512, device="cpu"), rows)
    after = stdlib_chat.taught_share(Llama.build(tmp_path / "final", max_seq_len=512, device="cpu"), rows)
    print(f"held-out loss {val}; taught answers before {before:.3f}, after {after:.3f} of {len(rows)}")
    assert val[max(val)] < val[0] - 0.5
    assert before <= 0.05 and after >= 0.8
