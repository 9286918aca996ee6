"""The interactive chat CLI, driven through a pipe as a user would type into it."""

import json
import os
import re
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


def replies(out) -> list[str]:
    return [line for line in out.stdout.split("> ") if line.strip()]


def test_a_line_that_is_not_utf8_is_read_with_a_notice(checkpoint):
    cmd = [sys.executable, "-m", "llama.chat", str(checkpoint), "--temperature", "0", "--max_gen_len", "8"]
    # strict decoding, as a UTF-8 locale gives (the C locale here would give Python's lenient surrogateescape)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    out = subprocess.run(cmd, input=b"Hello \xff\xfe there\nSay hi.\n", capture_output=True, timeout=300, env=env)
    stderr = out.stderr.decode()
    assert out.returncode == 0 and "Traceback" not in stderr, stderr
    assert "[that line is not valid UTF-8: its bad bytes were replaced by \ufffd]" in stderr
    assert len([line for line in out.stdout.decode().split("> ") if line.strip()]) == 2  # both lines answered


def test_a_turn_that_does_not_fit_leaves_the_conversation_as_it_was(checkpoint):
    question = ["My name is Ann.", "What is my name?"]
    options = ("--max_seq_len", "160", "--max_gen_len", "8")
    with_failure = run_chat(checkpoint, [question[0], "word " * 200, question[1]], *options)
    failed = "[this turn failed and is left out of the conversation: this message alone does not fit"
    assert failed in with_failure.stderr
    without = run_chat(checkpoint, question, *options)
    alone = run_chat(checkpoint, question[1:], *options)
    assert replies(with_failure)[-1] == replies(without)[-1] != replies(alone)[-1]  # the first turn is remembered


@pytest.fixture(scope="module")
def strict_template_checkpoint(checkpoint, tmp_path_factory):
    """SmolLM2 whose chat template refuses a dialog of three messages (as templates raise_exception on dialogs
    they do not accept): the second question fails."""
    folder = tmp_path_factory.mktemp("strict")
    for file in checkpoint.iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "tokenizer_config.json").unlink()
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    refusal = "{% if messages|length == 3 %}{{ raise_exception('three messages are too many') }}{% endif %}"
    config["chat_template"] = refusal + config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_failed_turn_is_reported_and_the_chat_goes_on(strict_template_checkpoint):
    out = run_chat(strict_template_checkpoint, ["Hi.", "And then?", "/reset", "Say hi."], "--max_gen_len", "8")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "[this turn failed and is left out of the conversation: the chat template of " in out.stderr
    assert "failed on this dialog: three messages are too many]" in out.stderr
    assert len(replies(out)) == 2  # the first and the last lines were answered


@pytest.mark.parametrize("option, message", [
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--top_p", "0"], r"top_p must be in \(0, 1\]"),
    (["--max_gen_len", "0"], "--max_gen_len must be >= 1, got 0"),
])
def test_bad_numbers_are_refused_before_the_model_is_loaded(tmp_path, option, message):
    out = subprocess.run([sys.executable, "-m", "llama.chat", str(tmp_path / "not-even-there"), *option],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert re.fullmatch(f"python -m llama.chat: error: {message}.*\n", out.stderr), out.stderr
