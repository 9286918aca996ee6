"""The commands, as a user meets them: each ``python -m <command> --help`` exits 0 and lists its options with their
defaults, and a bad option is answered with a one-line error (argparse's usage summary may precede it), a non-zero
exit status and no traceback.

``--help`` runs each command as the user does, in a fresh interpreter (~3 s of imports each, so they are all started
at once, up front). A bad option is given to each command's ``main`` in this process: what would be a traceback
there is an exception other than ``SystemExit`` here."""

import dataclasses
import importlib
import re
import subprocess
import sys

import pytest

COMMANDS = [
    "llama.train", "llama.prepare", "llama.convert", "llama.chat", "llama.plot", "llama.serve", "llama.eval",
    "tokenizer.train",
]

# Options each command's help must name, with a default where the command has one.
HELP_NAMES = {
    "llama.train": [
        "--config FILE.toml", "--model.dim", "--model.rope_scaling", "--data.path", "--training.steps",
        "--optimizer.lr", "--lr.schedule", "--checkpoint.dir", "--metrics.progress_bar",
    ],
    "llama.prepare": [
        "--input", "--tokenizer", "--output", "--val_fraction", "--workers", "--shard_tokens", "--exclude",
    ],
    "llama.convert": ["src", "dst", "--format {hf,meta}", "--dtype {bf16,fp16,fp32}"],
    "llama.chat": [
        "ckpt", "--tokenizer_path", "--system", "--temperature", "--top_p", "--max_seq_len", "--max_gen_len", "--seed",
        "--compile", "--quantize {int8,int4}",
    ],
    "llama.plot": ["run_dir"],
    "llama.serve": ["ckpt", "--host", "--port", "--api-key", "--max-batch-size", "--max-seq-len", "--quantize {int8,int4}"],
    "llama.eval": ["perplexity", "lm-eval", "humaneval"],
    "tokenizer.train": ["--input", "--vocab_size", "--output", "--max_sentences", "--exclude"],
}

# Each option's line in the help ends (after wrapping) with its default.
HELP_DEFAULTS = {
    "llama.train": [
        ("--training.steps", "(default: 1000)"), ("--model.dim", "(default: 4096)"),
        ("--model.rope_scaling", "(default: None)"), ("--lr.schedule", "(default: 'cosine')"),
    ],
    "llama.prepare": [("--val_fraction", "(default: 0.01)"), ("--workers", "(default: 1)")],
    "llama.convert": [("--format", "(default: hf)")],
    "llama.chat": [("--temperature", "(default: 0.6)"), ("--max_gen_len", "(default: 512)")],
    "llama.plot": [],
    "llama.serve": [("--host", "(default: 127.0.0.1)"), ("--max-batch-size", "(default: 8)"),
                    ("ckpt", "(default: embedded SmolLM2)")],
    "llama.eval": [],
    "tokenizer.train": [("--max_sentences", "(default: 2000000)")],
}

# A bad option, with whatever else the command requires so that the bad option is what it complains about.
BAD_OPTION = {
    "llama.train": ["--training.stepz=3"],
    "llama.prepare": ["--input", "x", "--tokenizer", "t", "--output", "o", "--stepz", "3"],
    "llama.convert": ["src", "dst", "--stepz", "3"],
    "llama.chat": ["--stepz", "3"],
    "llama.plot": ["run", "--stepz", "3"],
    "llama.serve": ["--stepz", "3"],
    "llama.eval": ["humaneval", "--stepz", "3"],
    "tokenizer.train": ["--input", "x", "--vocab_size", "300", "--output", "o", "--stepz", "3"],
}


@pytest.fixture(scope="module")
def helps():
    """command -> its finished ``python -m <command> --help``, all run side by side."""
    started = {
        command: subprocess.Popen(
            [sys.executable, "-m", command, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command in COMMANDS
    }
    results = {}
    for command, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        results[command] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


def option_entry(help_text: str, option: str) -> str:
    """The help's entry for ``option``: its line and the wrapped lines of its description, joined."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
    entry = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 6) or line.strip().startswith("-"):
            break
        entry.append(line)
    return " ".join(" ".join(entry).split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0_and_names_every_option(helps, command):
    result = helps[command]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {command}")
    assert "Traceback" not in result.stderr
    for name in HELP_NAMES[command]:
        assert name in result.stdout, f"{command} --help does not name {name}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_gives_each_option_its_default(helps, command):
    help_text = helps[command].stdout
    for option, default in HELP_DEFAULTS[command]:
        assert option_entry(help_text, option).endswith(default), option_entry(help_text, option)
    assert not re.search(r"\(default: [^)]*\) \(default: ", " ".join(help_text.split())), "a default given twice"


def test_train_help_lists_every_key_of_every_section(helps):
    from llama.training.config import Config

    help_text = helps["llama.train"].stdout
    for section in dataclasses.fields(Config):
        assert f"[{section.name}]:" in help_text
        for key in dataclasses.fields(getattr(Config(), section.name)):
            assert f"--{section.name}.{key.name} VALUE" in help_text


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_option_gives_a_one_line_error_without_a_traceback(command, capsys):
    main = importlib.import_module(command).main
    with pytest.raises(SystemExit) as exited:
        main(BAD_OPTION[command])
    assert exited.value.code not in (0, None)
    out, err = capsys.readouterr()
    error = [line for line in err.splitlines() if not line.startswith(("usage:", " "))]
    assert len(error) == 1, err
    assert error[0].startswith(f"python -m {command}: error:") and "stepz" in error[0], error[0]
    assert out == ""
