"""``Llama.text_infilling`` (Code Llama's API) on a tiny random model with a sentencepiece vocabulary holding Code
Llama's four FIM pieces; the engine's per-request stop ids."""

import pytest
import torch

from llama.generation import Llama, Request, SamplingParams
from llama.model import ModelArgs, Transformer
from tokenizer import TokenizerError
from tokenizer.fim import fim_tokens, infilling_prompt

PREFIXES = ["def add(a, b):\n    return ", "", "x = 1\n"]
SUFFIXES = ["\n\nprint(add(1, 2))\n", " + 1\n", ""]


def tiny_llama(vocab_size: int, seed: int = 0) -> Llama:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
                     max_seq_len=128)
    model = Transformer(args)
    model.init_weights(std=0.3, seed=seed)
    return model


def test_full_text_is_prefix_generation_suffix(fim_tokenizers):
    _, tokenizer = fim_tokenizers
    llama = Llama(tiny_llama(tokenizer.vocab_size), tokenizer, max_seq_len=128, max_batch_size=2)
    for suffix_first in (False, True):
        results = llama.text_infilling(PREFIXES, SUFFIXES, temperature=0, max_gen_len=12, logprobs=True,
                                       suffix_first=suffix_first)
        prompts = [infilling_prompt(tokenizer, p, s, suffix_first) for p, s in zip(PREFIXES, SUFFIXES)]
        tokens, _ = llama.generate(prompts, max_gen_len=12, temperature=0, stop_ids=(fim_tokens(tokenizer).end,))
        for prefix, suffix, result, row in zip(PREFIXES, SUFFIXES, results, tokens):
            assert result["generation"] == tokenizer.decode_infill(row) and row
            assert result["full_text"] == prefix + result["generation"] + suffix
            assert len(result["tokens"]) == len(result["logprobs"]) == len(row)


def test_generation_stops_at_eot(fim_tokenizers):
    """EOT's output row is made twice the row of a token the model emits: from then on EOT wins where that token
    would, and the middle ends there, without it."""
    _, tokenizer = fim_tokenizers
    model = tiny_llama(tokenizer.vocab_size, seed=1)
    llama = Llama(model, tokenizer, max_seq_len=128, max_batch_size=1)
    free = llama.text_infilling(PREFIXES[:1], SUFFIXES[:1], temperature=0, max_gen_len=16, logprobs=True)[0]
    prompt = infilling_prompt(tokenizer, PREFIXES[0], SUFFIXES[0])
    unstopped, _ = llama.generate([prompt], max_gen_len=16, temperature=0)
    emitted = unstopped[0][3]
    eot = fim_tokens(tokenizer).end
    with torch.no_grad():
        model.output.weight[eot] = 2 * model.output.weight[emitted]
    request = Request(prompt, SamplingParams(temperature=0, max_tokens=16, stop_ids=(eot,)))
    llama.complete([request])
    assert request.finish_reason == "stop" and request.stop_token == eot
    assert 0 < len(request.tokens) <= 3 and request.tokens == unstopped[0][: len(request.tokens)]
    stopped = llama.text_infilling(PREFIXES[:1], SUFFIXES[:1], temperature=0, max_gen_len=16)[0]
    assert stopped["generation"] == tokenizer.decode_infill(request.tokens) != free["generation"]


def test_tokenizer_without_fim_tokens_is_refused(fim_tokenizers):
    plain, _ = fim_tokenizers
    llama = Llama(tiny_llama(plain.vocab_size), plain, max_seq_len=64, max_batch_size=1)
    with pytest.raises(TokenizerError, match="no fill-in-the-middle tokens"):
        llama.text_infilling(["a"], ["b"])
    with pytest.raises(ValueError, match="same length"):
        llama.text_infilling(["a", "b"], ["c"])


def test_stop_ids_are_checked():
    with pytest.raises(ValueError, match="stop_ids must be token ids"):
        SamplingParams(stop_ids=("x",))
