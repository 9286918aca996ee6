"""python -m llama.eval: each subcommand on the embedded SmolLM2 prints its Markdown table and writes its JSON;
bad input ends in one line naming what was wrong."""

import inspect
import json

import pytest

from llama.checkpoint.embedded import default_checkpoint
from llama.eval import main


@pytest.fixture(scope="module")
def checkpoint():
    return str(default_checkpoint())


def run(capsys, *argv):
    main([str(a) for a in argv])
    return capsys.readouterr().out


def test_perplexity_of_text_files(capsys, tmp_path, checkpoint):
    (tmp_path / "doc.txt").write_text(inspect.getdoc(json)[:600])
    out = run(capsys, "perplexity", checkpoint, "--data", tmp_path / "doc.txt", "--max_length", 64, "--stride", 48,
              "--output", tmp_path / "ppl.json")
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert out.startswith("| documents | tokens | bytes | nll_per_token | perplexity | bits_per_byte |")
    assert result["documents"] == 1 and result["bytes"] == 600 and result["windows"] > 1
    assert 1 < result["perplexity"] < 100 and result["bits_per_byte"] > 0


def test_humaneval_writes_a_summary_and_a_line_per_problem(capsys, tmp_path, checkpoint):
    out = run(capsys, "humaneval", checkpoint, "--limit", 2, "--max_tokens", 32, "--output", tmp_path / "he.json")
    summary = json.loads((tmp_path / "he.json").read_text())
    problems = [json.loads(line) for line in (tmp_path / "he.jsonl").read_text().splitlines()]
    assert "| problems | n | prompt | pass@1 |" in out
    assert summary["problems"] == 2 and summary["n"] == 1 and 0 <= summary["pass@1"] <= 1
    assert summary["passed"] + summary["failed"] + summary["timed_out"] == 2
    assert summary["stop"] == ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1"]
    assert summary["pass@1"] == sum(p["pass@1"] for p in problems) / 2


def test_lm_eval_on_a_local_task(capsys, tmp_path, checkpoint):
    out = run(capsys, "lm-eval", checkpoint, "--tasks", "stdlib_docstring_mc", "--limit", 2, "--output",
              tmp_path / "lm.json")
    result = json.loads((tmp_path / "lm.json").read_text())
    assert "stdlib_docstring_mc" in out and "acc" in out
    assert result["results"]["stdlib_docstring_mc"]["sample_len"] == 2


@pytest.mark.parametrize("argv, message", [
    (["perplexity", "--data", "/no/such/file.txt"], "input /no/such/file.txt matches no file or folder"),
    (["perplexity", "--data", "{doc}", "--max_length", "16", "--stride", "17"], "stride must be in 1..max_length"),
    (["humaneval", "--limit", "0"], "--limit must be in 1..164"),
    (["humaneval", "--n", "0"], "--n must be >= 1"),
    (["lm-eval", "--tasks", "no_such_task"], "no_such_task"),
])
def test_bad_input_is_one_line(capsys, tmp_path, checkpoint, argv, message):
    (tmp_path / "doc.txt").write_text("Some text to score.")
    argv = [a.replace("{doc}", str(tmp_path / "doc.txt")) for a in argv]
    with pytest.raises(SystemExit) as exit:
        main([argv[0], checkpoint, *argv[1:], "--output", str(tmp_path / "out.json")])
    assert exit.value.code.startswith("python -m llama.eval: error:") and message in exit.value.code
    assert not (tmp_path / "out.json").exists()
