"""The benchmarks run end to end in --quick mode and write complete result files (no timing is asserted).

Only the eager variants run here: compiling even a tiny model costs tens of seconds on the CI machine.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.train
from llama.model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(module: str, out_dir: Path, *options: str) -> dict:
    cmd = [sys.executable, "-m", module, "--quick", "--output", str(out_dir), *options]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out_dir.glob("*.json")
    assert f"wrote {path}" in done.stdout
    result = json.loads(path.read_text())
    assert result["command"].endswith(" ".join(["--quick", "--output", str(out_dir), *options]))
    for key in ("device", "torch", "commit", "time", "load_average"):
        assert key in result
    return result


def test_generate_benchmark_compares_with_transformers(tmp_path):
    result = run_benchmark("bench.generate", tmp_path, "--variants", "eager,int8", "--repeats", "1")
    assert result["benchmark"] == "generate"
    rows = result["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [
        (v, b) for v in ("transformers", "eager", "int8") for b in (1, 8)
    ]
    for row in rows:
        assert row["model"] == "tiny-random"
        assert row["ttft_ms"] > 0 and row["warmup_s"] > 0
        assert row["gen_tokens"] == 8  # a random model may stop early only on a stop id; greedy here does not
        assert row["aggregate_tok_s"] == row["decode_tok_s"] * row["batch"]
        assert row["x_vs_hf"] is not None and row["mbu"] is None  # MBU is measured on GPU only
    hf, eager, int8 = rows[0], rows[2], rows[4]
    assert hf["x_vs_hf"] == 1.0
    # int8 reads about a quarter of fp32's bytes per step (plus per-channel scales and the fp32 norms)
    assert eager["weight_bytes"] == hf["weight_bytes"] and 0.25 < int8["weight_bytes"] / eager["weight_bytes"] < 0.3


def test_train_benchmark_matches_transformers_loss(tmp_path):
    # compiled too: the blocks' graphs take our CPU attention op (llama/cpu_kernels.py) where it is built
    result = run_benchmark("bench.train", tmp_path, "--variants", "eager,compiled", "--steps", "2", "--warmup", "1")
    assert result["benchmark"] == "train" and result["peak_flops"] is None
    hf, *ours = result["rows"]
    assert [row["variant"] for row in result["rows"]] == ["transformers", "eager", "compiled"]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["mfu"] is None
        # the same weights and batches: the loops compute the same losses
        assert abs(row["first_loss"] - hf["first_loss"]) < 1e-4
        assert abs(row["last_loss"] - hf["last_loss"]) < 1e-3
    # each of ours against the transformers loop timed in turns with it; the fastest of those is the first row
    for row in ours:
        assert row["x_vs_hf"] == row["hf_step_s"] / row["step_s"]
    assert hf["step_s"] == min(row["hf_step_s"] for row in ours)
    # the matmul floor is part of a step
    assert 0 < result["linear_matmul_floor_s"] < hf["step_s"]
    assert result["max_x_vs_hf"] == hf["step_s"] / result["linear_matmul_floor_s"]


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_matmul_floor_times_every_linear_layer_once(monkeypatch, tie_embeddings):
    monkeypatch.setattr(bench.train, "timed", lambda fn, device: 1.0)  # one second per weight's three matmuls
    model = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                  tie_embeddings=tie_embeddings))
    # 7 linears per block (q, k, v, o, gate, up, down) and the output projection, tied or not
    assert bench.train.linear_matmul_floor_s(model, 8, torch.float32, torch.device("cpu")) == 7 * 3 + 1


def test_generate_benchmark_refuses_unknown_models():
    from bench import generate

    with pytest.raises(ValueError, match="llama3.2-1b-shape"):
        generate.main(models="llama-9000")


def test_evaluate_benchmark_compares_with_the_peers(tmp_path):
    result = run_benchmark("bench.evaluate", tmp_path)
    assert result["benchmark"] == "evaluate" and result["compile"] is False
    rows = result["rows"]
    assert [(r["job"], r["variant"]) for r in rows] == [
        ("humaneval", "ours"), ("humaneval", "transformers"),
        ("lm-eval stdlib_docstring_mc", "ours"), ("lm-eval stdlib_docstring_mc", "lm-eval hf"),
    ]
    for row in rows:
        assert row["seconds"] > 0 and row["x_vs_peer"] > 0
    assert rows[1]["x_vs_peer"] == rows[3]["x_vs_peer"] == 1.0
    assert rows[0]["metric"] == "pass@1" and rows[0]["execution_s"] > 0
    assert rows[2]["examples"] == 2 and rows[2]["value"] == rows[3]["value"]  # the same accuracy as lm-eval's hf
    assert [p["task_id"] for p in result["humaneval_problems"]] == ["HumanEval/0"]
