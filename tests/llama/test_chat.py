"""The interactive chat CLI, driven through a pipe as a user would type into it."""

import subprocess
import sys

import pytest

from llama.checkpoint.embedded import default_checkpoint


@pytest.fixture(scope="module")
def checkpoint():
    return default_checkpoint()


def run_chat(checkpoint, lines, *options):
    cmd = [sys.executable, "-m", "llama.chat", str(checkpoint), "--temperature", "0", *options]
    return subprocess.run(cmd, input="".join(f"{line}\n" for line in lines), capture_output=True, text=True,
                          timeout=300)


def test_turns_history_window_reset_and_quit(checkpoint):
    lines = ["My name is Ann.", "What is my name?", "Say hi.", "/reset", "Hello!", "/quit", "never read"]
    # 96 tokens: the template's default system prompt and two short turns fill it, so the third drops the first
    out = run_chat(checkpoint, lines, "--max_seq_len", "96", "--max_gen_len", "12")
    assert out.returncode == 0, out.stderr
    replies = [line for line in out.stdout.split("> ") if line.strip()]
    assert len(replies) == 4  # one per message, none after /quit
    assert "dropped the 1 oldest turn(s)" in out.stderr
    assert "[conversation reset]" in out.stderr
    assert "Traceback" not in out.stderr


def test_end_of_input_exits_cleanly(checkpoint):
    out = run_chat(checkpoint, ["/system Answer in French."])
    assert out.returncode == 0, out.stderr
    assert "[system prompt set; conversation reset]" in out.stderr
    assert out.stdout == "> > "  # the command was read, then end of input at the next prompt
    assert "Traceback" not in out.stderr
