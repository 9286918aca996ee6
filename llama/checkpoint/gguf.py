"""llama.cpp's GGUF files of architecture ``llama``, any tensor type the ``gguf`` package dequantises."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from llama.checkpoint.base import CheckpointError, make_args
from llama.checkpoint.meta import META_ROPE_SCALING
from llama.checkpoint.rotary import interleaved_to_half, permute_qk
from llama.model import ModelArgs, rope_frequencies

GGUF_NAMES = {
    "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
}


def open_gguf(file: Path):
    """The file's ``GGUFReader``, after checking the architecture is ``llama``."""
    import gguf

    try:
        reader = gguf.GGUFReader(file)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on truncated or foreign files
        raise CheckpointError(f"{file}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _value(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{file}: GGUF architecture is {arch!r}, only 'llama' is supported")
    return reader


def _value(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def gguf_args(reader, file: Path) -> ModelArgs:
    def value(key, default=None):
        return _value(reader, f"llama.{key}", default)

    def required(key):
        if (found := value(key)) is None:
            raise CheckpointError(f"{file}: missing GGUF key llama.{key}")
        return found

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{file}: no token_embd.weight tensor")
    dim, n_heads = required("embedding_length"), required("attention.head_count")
    head_dim = value("attention.key_length", dim // n_heads)
    if value("rope.dimension_count", head_dim) != head_dim or value("expert_count"):
        raise CheckpointError(f"{file}: partial rotary or mixture-of-experts llama variants are not supported")
    args = make_args(
        file,
        dim=dim,
        n_layers=required("block_count"),
        n_heads=n_heads,
        n_kv_heads=value("attention.head_count_kv", n_heads),
        vocab_size=value("vocab_size", int(tensors["token_embd.weight"].shape[-1])),  # gguf lists shapes (in, out)
        hidden_dim=required("feed_forward_length"),
        norm_eps=value("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=value("rope.freq_base", 10000.0),
        max_seq_len=value("context_length", ModelArgs.max_seq_len),
        tie_embeddings="output.weight" not in tensors,
        head_dim=head_dim,
    )
    if "rope_freqs.weight" in tensors:  # Llama 3.1
        freqs = tensors["rope_freqs.weight"]
        rope_freqs = _dequantize(freqs.data, freqs.tensor_type)
        return _llama3_scaling(args, rope_freqs, value("rope.scaling.original_context_length"), file)
    return replace(args, rope_scaling=_scaling_keys(value, args.max_seq_len, file))


def _scaling_keys(value, context: int, file: Path) -> dict | None:
    """llama.cpp's ``rope.scaling.*`` keys as transformers' rope scaling: ``linear`` (positions divided by the
    factor) or ``yarn`` (with llama.cpp's defaults, which are transformers': beta 32 and 1, mscale
    0.1 ln(factor) + 1)."""
    kind = value("rope.scaling.type", "none")
    factor = value("rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind not in ("linear", "yarn") or factor is None:
        raise CheckpointError(
            f"{file}: rope scaling {kind!r} with factor {factor} is not supported (supported: none, linear and "
            "yarn, with llama.rope.scaling.factor)"
        )
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    for key in ("attn_factor", "yarn_attn_factor", "yarn_ext_factor", "yarn_log_multiplier"):
        if value(f"rope.scaling.{key}") not in (None, 1.0):
            raise CheckpointError(f"{file}: yarn with llama.rope.scaling.{key} is not supported")
    scaling = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": value("rope.scaling.original_context_length", context)}
    for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
        if value(f"rope.scaling.{theirs}") is not None:
            scaling[ours] = value(f"rope.scaling.{theirs}")
    return scaling


def _llama3_scaling(args: ModelArgs, rope_freqs: torch.Tensor, original_len: int | None, file: Path) -> ModelArgs:
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors; recover the llama3 parameters they came from
    (the largest divisor is the factor, the band edges are Meta's) and check they reproduce every divisor."""
    scaling = {**META_ROPE_SCALING, "factor": float(rope_freqs.max())}
    if original_len:
        scaling["original_max_position_embeddings"] = original_len
    scaled = replace(args, rope_scaling=scaling)
    wanted = rope_frequencies(args) / rope_freqs.float()
    if not torch.allclose(rope_frequencies(scaled), wanted, rtol=1e-4):
        raise CheckpointError(f"{file}: rope_freqs do not follow Llama 3.1 scaling; this variant is not supported")
    return scaled


def _dequantize(data: np.ndarray, tensor_type) -> torch.Tensor:
    """Stored GGUF data as a writable float32 tensor (out, in)."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.require(dequantize(data, tensor_type), np.float32, ["C", "W"]))


def read_gguf(file: Path, reader=None):
    """(args, tensors in our names and rotary layout, the file each came from); ``reader``: the file already
    opened by ``open_gguf``, which this releases before dequantising."""
    reader = reader or open_gguf(file)
    args = gguf_args(reader, file)
    # What each tensor is and where it lies; the reader itself (its parsed metadata is ~1.6x the size of a small
    # model's quantised weights) is then released before anything is dequantised.
    infos = [(t.name, t.tensor_type, t.data.dtype, t.data.shape, t.data_offset, t.n_bytes) for t in reader.tensors]
    del reader
    tensors = {}
    with open(file, "rb") as f:
        for gguf_name, tensor_type, stored_dtype, shape, offset, n_bytes in infos:
            if gguf_name == "rope_freqs.weight":  # already in args.rope_scaling
                continue
            layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
            base = layer[2] if layer else gguf_name.removesuffix(".weight")
            name = f"{GGUF_NAMES.get(base, base)}.weight"
            name = f"layers.{layer[1]}.{name}" if layer else name
            # read (not mmap) one tensor at a time, so the file's pages do not add to the process's memory
            f.seek(offset)
            data = f.read(n_bytes)
            if len(data) != n_bytes:
                raise CheckpointError(f"{file}: truncated: tensor {gguf_name} needs {n_bytes} bytes at offset {offset}")
            stored = np.frombuffer(data, dtype=stored_dtype).reshape(shape)
            try:
                tensors[name] = _dequantize(stored, tensor_type)
            except NotImplementedError as e:
                raise CheckpointError(f"{file}: tensor {gguf_name} has unsupported type {tensor_type.name} ({e})") from None
    permute_qk(tensors, args, interleaved_to_half)  # llama.cpp's converter interleaves q/k rows like Meta
    return args, tensors, {name: file for name in tensors}
