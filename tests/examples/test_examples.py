"""The example scripts run as Meta's do (under torchrun) and as plain scripts, on the embedded default model."""

import subprocess
import sys
from pathlib import Path

import pytest

from llama.checkpoint.embedded import default_checkpoint

EXAMPLES = Path(__file__).parents[2] / "examples"
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module", autouse=True)
def converted_default_model():
    default_checkpoint()  # convert once here, not inside a timed subprocess


def test_chat_completion_under_torchrun():
    cmd = [TORCHRUN, "--nproc_per_node", "1", EXAMPLES / "chat_completion.py", "--max_gen_len", "4",
           "--temperature", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line.startswith("> Assistant: ")]
    assert len(answers) == 3 and all(len(a) > len("> Assistant: ") for a in answers)
    assert "User: what is the recipe of mayonnaise?" in out.stdout


def test_text_completion_as_a_plain_script():
    cmd = [sys.executable, EXAMPLES / "text_completion.py", "--max_gen_len", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n> ") == 3 and "I believe the meaning of life is" in out.stdout
