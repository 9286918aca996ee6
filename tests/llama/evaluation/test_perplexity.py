"""Perplexity: sliding windows that score every token once, with the context they promise; per-window NLLs equal
transformers' loss on the same windows (fp32), on a tiny random model and on SmolLM2; text files and shards count
the bytes of the text they score."""

import copy
import inspect
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama.checkpoint import load_checkpoint, load_model
from llama.checkpoint.embedded import default_checkpoint
from llama.evaluation.perplexity import (
    Perplexity, document_tokens, evaluate_perplexity, shard_windows, sliding_windows, text_windows, window_nlls,
)
from llama.training.shards import is_validation, prepare
from llama.transforms.quantize import quantize_weights

TEXT = inspect.getdoc(json)  # real text, ~1,500 characters


@pytest.mark.parametrize("max_length, stride", [(16, 16), (16, 5), (16, 1), (100, 100), (200, 7), (1, 1)])
def test_windows_score_every_token_but_the_first_once_with_their_context(max_length, stride):
    tokens = list(range(100))  # a token is its own index
    windows = list(sliding_windows(tokens, max_length, stride))
    assert [t for w in windows for t in w.tokens[len(w.tokens) - w.scored :]] == tokens[1:]
    for w in windows:
        assert len(w.tokens) - 1 <= max_length  # the tokens the model reads
        first_scored = w.tokens[len(w.tokens) - w.scored]
        assert len(w.tokens) - w.scored >= min(max_length - stride + 1, first_scored)  # its context
    assert list(sliding_windows([7], 16)) == []  # nothing after the first token


def test_a_stride_longer_than_the_window_is_refused():
    with pytest.raises(ValueError, match="stride must be in 1..max_length"):
        list(sliding_windows(list(range(50)), 16, 17))


def hf_window_loss(hf, window) -> float:
    """transformers' own loss on the window: labels -100 on the context, the model shifts them itself."""
    ids = torch.tensor([list(window.tokens)])
    labels = ids.clone()
    labels[:, : len(window.tokens) - window.scored] = -100
    with torch.no_grad():
        return float(hf(input_ids=ids, labels=labels).loss)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-5,
                         initializer_range=0.3)
    hf = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(folder)
    return hf, load_model(folder)


@pytest.mark.parametrize("stride", [32, 12])
def test_window_nlls_equal_transformers_loss_on_a_tiny_random_model(tiny, stride):
    hf, model = tiny
    tokens = torch.randint(300, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    windows = list(sliding_windows(tokens, 32, stride))  # the last window is shorter: padding in a batch
    for batch_size in (1, 3):
        ours = window_nlls(model, windows, batch_size=batch_size)
        for window, nll in zip(windows, ours):
            assert nll / window.scored == pytest.approx(hf_window_loss(hf, window), abs=1e-4)
    result = evaluate_perplexity(model, windows, batch_size=4)
    expected = sum(hf_window_loss(hf, w) * w.scored for w in windows) / 149
    assert result.tokens == 149 and result.nll_per_token == pytest.approx(expected, abs=1e-4)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-4)


def test_window_nlls_equal_transformers_loss_on_smollm2():
    folder = default_checkpoint()
    model, tokenizer = load_checkpoint(folder)
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = document_tokens(tokenizer, TEXT[:700])
    assert tokens[0] == tokenizer.bos_id
    windows = list(sliding_windows(tokens, 64, 40))
    assert len(windows) >= 3
    for window, nll in zip(windows, window_nlls(model, windows, batch_size=2)):
        assert nll / window.scored == pytest.approx(hf_window_loss(hf, window), abs=1e-4)


def test_a_quantised_output_projection_gives_the_losses_of_its_logits(tiny):
    _, model = tiny
    model = quantize_weights(copy.deepcopy(model), "int8")  # the output projection too
    tokens = torch.randint(300, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        losses = model(tokens[:, :-1], targets=tokens[:, 1:], reduction="none")
        logits = model(tokens[:, :-1]).float()
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-4)


def test_text_files_and_shards_count_the_bytes_they_score(tmp_path):
    folder = default_checkpoint()
    _, tokenizer = load_checkpoint(folder, tokenizer=True)
    documents = [TEXT[:400], "Zürich — naïve café ☕", TEXT[400:900], "short"]
    for i, text in enumerate(documents):
        (tmp_path / f"doc{i}.txt").write_text(text)
    windows, n_bytes, count = text_windows(tokenizer, [str(tmp_path / "doc*.txt")], max_length=32)
    assert count == 4 and n_bytes == sum(len(d.encode()) for d in documents)
    assert sum(w.scored for w in windows) == sum(len(tokenizer.encode(d)) for d in documents)

    shards = prepare([str(tmp_path / "doc*.txt")], str(folder), str(tmp_path / "shards"), val_fraction=0.5)
    windows, n_bytes, count = shard_windows(tokenizer, shards, "val", max_length=32, stride=20)
    val = [d for i, d in enumerate(documents) if is_validation(i, 0.5)]
    stream = [t for d in val for t in tokenizer.encode(d, eos=True)]  # SmolLM2 adds no BOS; EOS ends each document
    assert sum(w.scored for w in windows) == len(stream) - 1  # the stream's first token is context only
    first = len(tokenizer.decode(stream[:1]).encode())
    assert count == len(val) and n_bytes == sum(len(d.encode()) for d in val) - first  # EOS spells no bytes


def test_bits_per_byte_and_perplexity_follow_from_the_sums():
    result = Perplexity(nll=1000.0, tokens=400, bytes=1600)
    assert result.perplexity == pytest.approx(math.exp(2.5))
    assert result.bits_per_byte == pytest.approx(1000 / math.log(2) / 1600)
    assert Perplexity(nll=1.0, tokens=1).bits_per_byte is None
