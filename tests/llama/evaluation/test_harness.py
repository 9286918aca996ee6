"""Our lm-eval model ``llama-one`` against lm-eval's own ``hf`` model on SmolLM2 and the local tasks: the same
per-example log-likelihoods (to 1e-4, fp32), greedy flags, generations and metrics; packed multiple-choice rows
against one plain forward per request; registration in lm-eval's registry and its command line."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hf model reads a local folder: nothing may be fetched

import json
import subprocess
import sys

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from llama.checkpoint.embedded import default_checkpoint
from llama.evaluation.harness import TASKS_DIR, LlamaOneLM, _pack, task_manager
from llama.model import ModelArgs, Transformer

TASKS = ["stdlib_docstring_mc", "stdlib_docs", "stdlib_doctest"]


@pytest.fixture(scope="module")
def both():
    """The same few examples of each local task evaluated by our model and by lm-eval's hf model."""
    checkpoint = str(default_checkpoint())
    # max_length 64: the documents span several rolling windows; two of the questions and two of the doctest
    # contexts (the latter get 64 - 32 generated tokens) are longer, so both models cut them on the left
    samples = {"stdlib_docstring_mc": [0, 126, 173], "stdlib_doctest": [0, 1, 10], "stdlib_docs": [0, 1, 2]}
    options = dict(tasks=TASKS, task_manager=task_manager(), samples=samples, batch_size=2, log_samples=True)
    ours = lm_eval.simple_evaluate(model="llama-one", model_args=f"pretrained={checkpoint},max_length=64", **options)
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint},dtype=float32,max_length=64",
                                 device="cpu", **options)
    return ours, hf


def responses(result, task):
    return [sample["resps"] for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_loglikelihoods_and_accuracy_equal_the_hf_model(both):
    ours, hf = both
    ours_resps, hf_resps = responses(ours, "stdlib_docstring_mc"), responses(hf, "stdlib_docstring_mc")
    assert len(ours_resps) == 3 and all(len(r) == 4 for r in ours_resps)  # four choices each
    for ours_choices, hf_choices in zip(ours_resps, hf_resps):
        for [(ours_ll, ours_greedy)], [(hf_ll, hf_greedy)] in zip(ours_choices, hf_choices):
            assert float(ours_ll) == pytest.approx(float(hf_ll), abs=1e-4)
            assert ours_greedy == hf_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["stdlib_docstring_mc"][metric] == hf["results"]["stdlib_docstring_mc"][metric]


def test_rolling_loglikelihoods_equal_the_hf_model(both):
    ours, hf = both
    for [[ours_ll]], [[hf_ll]] in zip(responses(ours, "stdlib_docs"), responses(hf, "stdlib_docs")):
        # sums over hundreds of tokens: each within ~2e-5 (our CPU loss kernel's softmax sums run ~1.7e-5 nats
        # low at SmolLM2's 49k vocabulary; its logits agree with transformers' to ~1e-6 a token)
        assert ours_ll == pytest.approx(hf_ll, rel=2e-5)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["stdlib_docs"][metric] == pytest.approx(hf["results"]["stdlib_docs"][metric], rel=1e-4)


def test_greedy_generations_equal_the_hf_model(both):
    ours, hf = both
    assert responses(ours, "stdlib_doctest") == responses(hf, "stdlib_doctest")
    assert ours["results"]["stdlib_doctest"]["exact_match,none"] == hf["results"]["stdlib_doctest"]["exact_match,none"]


class ByteTokenizer:
    vocab_size, bos_id, eos_id, pad_id = 258, 256, 257, None
    stop_ids = frozenset({257})
    special_tokens = {"<s>": 256, "</s>": 257}
    chat_template = None
    add_bos = False
    source = "bytes"

    def encode(self, text, bos=False, eos=False, allow_special=False):
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_name(self, token_id):
        return {256: "<s>", 257: "</s>"}.get(token_id)


def test_packed_rows_give_each_continuation_the_loglikelihood_of_a_plain_forward():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, multiple_of=16,
                                  max_seq_len=64)).eval()
    lm = LlamaOneLM(model=model, tokenizer=ByteTokenizer(), batch_size=2)
    pairs = [("The cat", " sat"), ("The cat", " ran away"), ("The cat", "!"), ("A dog", " barked"),
             ("A dog", " x"), ("", "Lonely"), ("The cat", " sat")]  # shared contexts, an empty one, a repeat
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (loglikelihood, greedy) in zip(pairs, results):
        context_ids = list(context.encode()) or [ByteTokenizer.bos_id]
        ids = torch.tensor([context_ids + list(continuation.encode())])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0, len(context_ids) - 1 :]
        targets = ids[0, len(context_ids) :]
        assert loglikelihood == pytest.approx(float(logprobs.gather(-1, targets[:, None]).sum()), abs=1e-5)
        assert greedy == bool((logprobs.argmax(-1) == targets).all())
    # the model's own greedy continuations (as lm-eval hands them over, in tokens): greedy, whatever else is packed
    context = list(b"The cat")
    greedy_tokens = []
    with torch.no_grad():
        for _ in range(3):
            greedy_tokens.append(int(model(torch.tensor([context + greedy_tokens]))[0, -1].argmax()))
    requests = [(("", ""), context, greedy_tokens[:n]) for n in (1, 2, 3)] + [(("", ""), context, [7, 9])]
    flags = [greedy for _, greedy in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
    assert flags == [True, True, True, greedy_tokens[:2] == [7, 9]]


def test_pack_lays_out_context_then_each_continuation():
    tokens, positions, segments, scored = _pack((5, 6, 7), [[1, 2], [3], [4, 8, 9]])
    assert tokens == [5, 6, 7, 1, 4, 8]  # each continuation's last token is never read
    assert positions == [0, 1, 2, 3, 3, 4]  # every continuation goes on from the context's end
    assert segments == [-1, -1, -1, 0, 2, 2]
    assert scored == [2, 3, 2, 2, 4, 5]  # the first token of each is predicted at the context's last position


def test_texts_are_encoded_as_the_hf_model_encodes_them():
    from transformers import AutoTokenizer

    checkpoint = default_checkpoint()
    ours = LlamaOneLM(pretrained=str(checkpoint))
    theirs = AutoTokenizer.from_pretrained(checkpoint)
    for text in ["Question: What is 2+2?\nAnswer:", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                 " leading space", "naïve ☕"]:
        assert ours.tok_encode(text) == theirs.encode(text)
        assert ours.tok_encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    dialog = [{"role": "user", "content": "Hi"}]
    expected = theirs.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(dialog) == expected
    assert ours.prefix_token_id == theirs.bos_token_id and ours.eot_token_id == theirs.eos_token_id


def test_quantised_weights_score_close_to_full_precision():
    checkpoint = str(default_checkpoint())
    text = "The json module encodes Python objects as JSON text and decodes them back."
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    full = LlamaOneLM(pretrained=checkpoint).loglikelihood_rolling(requests, disable_tqdm=True)[0]
    int8 = LlamaOneLM(pretrained=checkpoint, quantize="int8").loglikelihood_rolling(requests, disable_tqdm=True)[0]
    assert int8 != full and int8 == pytest.approx(full, rel=0.05)


def test_llama_one_is_in_lm_evals_registry_beside_its_own_models():
    assert get_model("llama-one") is LlamaOneLM
    assert get_model("hf").__name__ == "HFLM"


def test_lm_evals_command_line_runs_llama_one(tmp_path):
    command = [
        sys.executable, "-m", "llama.evaluation.harness", "run", "--model", "llama-one",
        "--model_args", f"pretrained={default_checkpoint()}", "--tasks", "stdlib_docstring_mc",
        "--include_path", str(TASKS_DIR), "--limit", "2", "--output_path", str(tmp_path),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stdlib_docstring_mc" in out.stdout and "acc" in out.stdout  # lm-eval's table
    (written,) = tmp_path.rglob("results_*.json")
    assert json.loads(written.read_text())["results"]["stdlib_docstring_mc"]["sample_len"] == 2
