"""``python -m llama.convert`` as a user runs it: HF -> Meta -> HF, ending where it started; refusing what
``Llama.build`` refuses; killed midway and run again."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM


def convert(*args):
    result = subprocess.run([sys.executable, "-m", "llama.convert", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def test_hf_to_meta_to_hf_round_trip(tmp_path):
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=64)
    hf = LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "hf")

    convert(tmp_path / "hf", tmp_path / "meta", "--format", "meta")
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["n_kv_heads"] == 2
    result = convert(tmp_path / "meta", tmp_path / "back", "--format", "hf")
    assert "converting" in result.stderr  # the tqdm bar over tensors

    back = load_file(tmp_path / "back" / "model.safetensors")
    original = hf.state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)

    convert(tmp_path / "hf", tmp_path / "bf16", "--dtype", "bf16")
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_as_llama_build_refuses_it(tmp_path):
    from llama.checkpoint.embedded import default_checkpoint
    from llama.generation import Llama
    from tokenizer import TokenizerError

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=1000, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # SmolLM2's: 49152 tokens
        (tmp_path / "hf" / name).write_bytes((default_checkpoint() / name).read_bytes())
    result = subprocess.run([sys.executable, "-m", "llama.convert", tmp_path / "hf", tmp_path / "out"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "tokenizer.json has 49152 tokens, model " in result.stderr and "has 1000" in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(TokenizerError, match="has 49152 tokens, model the model has 1000"):
        Llama.build(tmp_path / "hf", device="cpu")


def test_a_convert_killed_midway_leaves_nothing_once_rerun(tmp_path):
    from llama.checkpoint.embedded import default_checkpoint

    command = [sys.executable, "-m", "llama.convert", str(default_checkpoint()), str(tmp_path / "out"),
               "--format", "meta"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")):  # the hidden folder being filled
        assert proc.poll() is None and time.time() < deadline, "convert ended before it started writing"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists(), "convert finished before it was killed"
    assert list(tmp_path.glob(".out.tmp-*"))  # what the kill left (~540 MB here)
    convert(default_checkpoint(), tmp_path / "out", "--format", "meta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the leftover is gone, nothing else is hidden
    assert (tmp_path / "out" / "consolidated.00.pth").is_file()
