"""Checkpoints that must not load, or not silently: configs of the wrong shape or with impossible numbers, files
that cannot be read, a folder holding two checkpoints, weights that are not finite, a GGUF of another
architecture. Each is refused with a message naming the file and what was expected."""

import ctypes
import json
import os
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llama.checkpoint import CheckpointError, load_model, save_meta
from llama.generation import Llama

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=64)
TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def hf_folder(folder, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(folder)
    return model


@torch.no_grad()
def logits(model) -> torch.Tensor:
    out = model(TOKENS)
    return getattr(out, "logits", out)


# ------------------------------------------------------------------------------------------------- configs


def edit_json(file, change):
    """``change`` edits the parsed JSON in place, or returns what replaces it."""
    data = json.loads(file.read_text())
    replaced = change(data)
    file.write_text(json.dumps(data if replaced is None else replaced))


@pytest.mark.parametrize("change, message", [
    (lambda c: [c], "expected a JSON object {...}, got a list"),
    (lambda c: c.update(hidden_size="64"), "hidden_size must be an integer > 0, got '64'"),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be an integer > 0, got 0"),
    (lambda c: c.update(num_hidden_layers=2.5), "num_hidden_layers must be an integer > 0, got 2.5"),
    (lambda c: c.update(rms_norm_eps=float("nan")), "rms_norm_eps must be a number > 0, got nan"),
    (lambda c: c.update(rope_parameters=[1]), "rope_parameters and rope_scaling must be JSON objects or null"),
    (lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": -1}),
     r"inconsistent model configuration \(rope_theta must be a finite number > 0, got -1\)"),
], ids=["list", "string_size", "zero_heads", "float_layers", "nan_eps", "rope_list", "negative_theta"])
def test_config_json_of_the_wrong_shape(tmp_path, change, message):
    hf_folder(tmp_path)
    edit_json(tmp_path / "config.json", change)
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        load_model(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda p: [p], "expected a JSON object {...}, got a list"),
    (lambda p: p.update(n_heads=0), r"inconsistent model configuration \(n_heads must be an integer >= 1, got 0\)"),
    (lambda p: p.update(norm_eps="1e-5"),
     r"inconsistent model configuration \(norm_eps must be a finite number > 0, got '1e-5'\)"),
], ids=["list", "zero_heads", "string_eps"])
def test_params_json_of_the_wrong_shape(tmp_path, change, message):
    hf_folder(tmp_path / "hf")
    save_meta(load_model(tmp_path / "hf"), tmp_path / "meta")
    edit_json(tmp_path / "meta" / "params.json", change)
    with pytest.raises(CheckpointError, match=f"params.json: {message}"):
        load_model(tmp_path / "meta")


# ------------------------------------------------------------------------------------------------- unreadable files

READ_AS_A_USER = """
import sys
from llama.checkpoint import load_checkpoint
try:
    load_checkpoint(sys.argv[1], tokenizer=False)
except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


def without_root_override():
    """In the child, before it runs Python: drop the capabilities that let root read any file (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) from its bounding set, so that the exec'd process reads files as other users do."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(99)


def load_unprivileged(path) -> str:
    out = subprocess.run([sys.executable, "-c", READ_AS_A_USER, str(path)], capture_output=True, text=True, timeout=120,
                         preexec_fn=without_root_override if os.geteuid() == 0 else None)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "params.json", "consolidated.00.pth",
                                  "model.gguf"])
def test_an_unreadable_file_is_named_and_said_unreadable(tmp_path, name):
    hf = hf_folder(tmp_path / "hf")
    if name in ("params.json", "consolidated.00.pth"):
        folder = save_meta(load_model(tmp_path / "hf"), tmp_path / "meta")
    elif name == "model.gguf":
        folder = tmp_path
        writer = gguf.GGUFWriter(tmp_path / name, "llama")
        writer.add_tensor("token_embd.weight", hf.model.embed_tokens.weight.detach().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    else:
        folder = tmp_path / "hf"
    os.chmod(folder / name, 0)
    message = load_unprivileged(folder / name if name.endswith(".gguf") else folder)
    assert str(folder / name) in message and "Permission denied" in message, message
    assert "No such file" not in message


# ------------------------------------------------------------------------------------------------- two checkpoints


def test_a_folder_holding_meta_and_hf_checkpoints_is_refused_unless_told_which(tmp_path):
    hf = hf_folder(tmp_path / "both", seed=0)
    other = hf_folder(tmp_path / "other", seed=1)
    save_meta(load_model(tmp_path / "other"), tmp_path / "meta")
    for file in (tmp_path / "meta").iterdir():
        shutil.copy(file, tmp_path / "both")
    with pytest.raises(CheckpointError, match=r"both holds both a Meta \(params.json \+ consolidated.\*.pth\) "
                                              r"checkpoint and a Hugging Face .* format='meta' or format='hf'"):
        load_model(tmp_path / "both")
    assert (logits(load_model(tmp_path / "both", format="hf")) - logits(hf)).abs().max() < 1e-4
    assert (logits(load_model(tmp_path / "both", format="meta")) - logits(other)).abs().max() < 1e-4
    with pytest.raises(CheckpointError, match=r"other: no Meta .* checkpoint in this folder"):
        load_model(tmp_path / "other", format="meta")


# ------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    hf_folder(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, :2] = bad
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'layers.1.feed_forward.w2.weight' holds 2 "
                                              r"non-finite values \(NaN or infinity\) of 6144.*allow_non_finite=True"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, allow_non_finite=True)  # for inspection: the values are kept as they are
    assert (~torch.isfinite(loaded.layers[1].feed_forward.w2.weight)).sum() == 2
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # what transformers makes of it: no finite logits
    assert not torch.isfinite(logits(theirs)).all()


def test_a_gguf_of_another_architecture_names_it_through_llama_build(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"gpt2.gguf: GGUF architecture is 'gpt2', only 'llama' is supported"):
        Llama.build(tmp_path / "gpt2.gguf", device="cpu")
    out = subprocess.run([sys.executable, "-m", "llama.chat", str(tmp_path / "gpt2.gguf")], capture_output=True,
                         text=True, timeout=120, input="")
    assert out.returncode == 1
    assert out.stderr.endswith("gpt2.gguf: GGUF architecture is 'gpt2', only 'llama' is supported\n"), out.stderr
