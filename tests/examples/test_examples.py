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


def test_tool_call_round_trip_on_the_embedded_model():
    """SmolLM2's template ignores tools; the example states the tool in the system message and SmolLM2-135M
    (greedy) calls it: the function runs and its result is in the final answer's dialog."""
    cmd = [sys.executable, EXAMPLES / "tool_call.py", "--max_gen_len", "40"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "> Tool: get_current_temperature(location='Paris, France') returned" in out.stdout, out.stdout
    assert out.stdout.count("> Assistant: ") == 2


def test_infilling_refuses_a_vocabulary_without_fim_tokens():
    cmd = [sys.executable, EXAMPLES / "infilling.py", "--ckpt_dir", default_checkpoint()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "has no fill-in-the-middle tokens" in out.stderr


@pytest.mark.parametrize("example", ["text_completion.py", "chat_completion.py", "infilling.py", "tool_call.py"])
def test_sampling_settings_are_refused_before_the_model_loads(example, tmp_path):
    """A NaN temperature is named, not met after loading (the checkpoint given does not even exist)."""
    cmd = [sys.executable, EXAMPLES / example, "--ckpt_dir", tmp_path / "nowhere", "--temperature", "nan"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "temperature must be a finite number" in out.stderr, out.stderr[-1000:]
