"""Requests and models that used to give garbage, or nothing, without a word: refused before any work, naming the
setting. A tiny random model with SmolLM2's real tokenizer, built through ``Llama.build`` as a user would."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama.checkpoint import CheckpointError
from llama.checkpoint.embedded import default_checkpoint
from llama.generation import Llama
from llama.generation.engine import Request
from llama.generation.sampling import SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=49152, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(default_checkpoint() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def llama(folder):
    return Llama.build(folder, max_seq_len=64, max_batch_size=2, device="cpu")


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("call, message", [
    (lambda l: l.text_completion(["a"], temperature=NAN), "temperature must be a finite number >= 0"),
    (lambda l: l.text_completion(["a"], temperature=INF), "temperature must be a finite number >= 0"),
    (lambda l: l.chat_completion([[{"role": "user", "content": "a"}]], temperature=NAN), "temperature"),
    (lambda l: l.text_completion(["a"], top_p=NAN), r"top_p must be in \(0, 1\], got nan"),
    (lambda l: l.text_completion(["a"], stop=[""]), r"stop must be non-empty strings, got \[''\]"),
    (lambda l: l.text_completion(["a"], stop=""), r"stop must be non-empty strings, got \[''\]"),
    (lambda l: l.text_completion("a string"), "prompts must be a list of strings, got str"),
    (lambda l: l.text_completion(["a"], max_gen_len=-1), "max_gen_len must be an integer >= 0"),
    (lambda l: l.text_completion(["a\udc80"]), "lone surrogate"),
    (lambda l: l.complete([Request([1, 10**6])]), r"the prompt holds token ids outside the vocabulary \(0..49151\)"),
], ids=["temperature_nan", "temperature_inf", "chat_temperature_nan", "top_p_nan", "empty_stop", "empty_stop_str",
        "prompt_string", "negative_length", "surrogate", "token_out_of_range"])
def test_a_request_without_meaning_is_refused_before_any_work(llama, call, message):
    with pytest.raises(ValueError, match=message):
        call(llama)
    assert not llama.engine.busy


def test_sampling_params_refuse_nan_at_construction():
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0 .*, got nan"):
        SamplingParams(temperature=NAN)


def test_weights_that_are_not_finite_are_refused_by_build(folder, tmp_path):
    for file in folder.iterdir():
        shutil.copy(file, tmp_path / file.name)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.norm.weight"][0] = NAN
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'norm.weight' holds 1 non-finite values"):
        Llama.build(tmp_path, max_seq_len=64, max_batch_size=1, device="cpu")
