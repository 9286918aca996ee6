"""``python -m llama.convert`` as a user runs it: HF -> Meta -> HF, ending where it started."""

import json
import subprocess
import sys

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
