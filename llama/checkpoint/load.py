"""Format detection and loading: the model built on the meta device, the weights assigned straight from the
memory-mapped (or, for GGUF, dequantised) tensors, so loading holds one copy of the weights."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from llama.checkpoint.base import CheckpointError, CheckpointNotFoundError
from llama.checkpoint.gguf import gguf_args, open_gguf, read_gguf
from llama.checkpoint.hf import is_hf, read_hf, read_hf_config
from llama.checkpoint.meta import is_meta, read_meta
from llama.model import ModelArgs, Transformer

READERS = {"meta": read_meta, "hf": read_hf, "gguf": read_gguf}
FORMAT_FILES = {"meta": "Meta (params.json + consolidated.*.pth)", "hf": "Hugging Face (config.json + *.safetensors)"}


def detect_format(path: str | os.PathLike, format: str | None = None) -> str:
    """'meta', 'hf' or 'gguf' from what lies at ``path``. A folder holding both a Meta and a Hugging Face
    checkpoint is refused unless ``format`` says which to read."""
    path = Path(path)
    if format is not None and format not in READERS:
        raise ValueError(f"format must be one of {', '.join(READERS)} or None, got {format!r}")
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or folder (expected a checkpoint folder or a .gguf file)")
    if path.is_file():
        if path.suffix == ".gguf" and format in (None, "gguf"):
            return "gguf"
        raise CheckpointError(f"{path}: not a checkpoint (expected a .gguf file or a folder)")
    if format == "gguf":
        raise CheckpointError(f"{path}: a folder, where format 'gguf' reads a .gguf file")
    found = [fmt for fmt, holds in (("meta", is_meta), ("hf", is_hf)) if holds(path)]
    if format is not None:
        if format not in found:
            raise CheckpointError(f"{path}: no {FORMAT_FILES[format]} checkpoint in this folder")
        return format
    if len(found) > 1:
        raise CheckpointError(
            f"{path} holds both a {FORMAT_FILES['meta']} checkpoint and a {FORMAT_FILES['hf']} one; say which to "
            "read: format='meta' or format='hf' (llama.convert: --src_format)"
        )
    if found:
        return found[0]
    raise CheckpointError(
        f"{path}: no checkpoint found; looked for params.json + consolidated.*.pth (Meta), "
        "config.json + *.safetensors / model.safetensors.index.json (Hugging Face), or a .gguf file"
    )


def load_args(path: str | os.PathLike, format: str | None = None) -> ModelArgs:
    """The model's hyper-parameters, read from the checkpoint's metadata (and shapes where the format needs them)."""
    path = Path(path)
    fmt = detect_format(path, format)
    if fmt == "gguf":
        return gguf_args(open_gguf(path), path)  # without dequantising the weights
    if fmt == "hf":
        return read_hf_config(path)[0]
    return read_meta(path)[0]


def build_model(
    args: ModelArgs, tensors: dict, sources: dict, path: Path, *, device="cpu", dtype=None, allow_non_finite=False
) -> Transformer:
    """The model in eval mode holding ``tensors`` (our names), after checking each name and shape, and that every
    value is finite unless ``allow_non_finite``."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{sources[name]}: unexpected tensor {name!r} {tuple(tensor.shape)}")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{sources[name]}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[name].shape)} from the checkpoint's configuration"
            )
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    # pop as we go, so that a dtype or device change never holds two copies of every weight
    state = {name: tensors.pop(name).to(device=device, dtype=dtype) for name in list(tensors)}
    if not allow_non_finite:
        for name, tensor in state.items():
            check_finite(tensor, name, sources[name])
    model.load_state_dict(state, assign=True)
    model.init_rope()
    return model.eval()


def check_finite(tensor: torch.Tensor, name: str, source) -> None:
    """Refuse a tensor holding NaN or infinities: a model with one gives garbage, or nothing, silently."""
    # the sum of all values is finite unless one is not (or, rarely, the sum overflows: then they are counted)
    if torch.isfinite(tensor.sum()) or bool(torch.isfinite(tensor).all()):
        return
    count = int((~torch.isfinite(tensor)).sum())
    raise CheckpointError(
        f"{source}: tensor {name!r} holds {count} non-finite values (NaN or infinity) of {tensor.numel()}; "
        "a model with them cannot give meaningful output (to load it anyway: allow_non_finite=True)"
    )


def load_model(
    path: str | os.PathLike, *, device="cpu", dtype=None, max_seq_len: int | None = None, format: str | None = None,
    allow_non_finite: bool = False,
) -> Transformer:
    """The model in eval mode. ``dtype=None`` keeps the stored dtype (GGUF dequantises to float32);
    ``max_seq_len`` overrides the checkpoint's context length; ``format`` ('meta', 'hf', 'gguf') picks the
    checkpoint in a folder holding two; ``allow_non_finite`` loads weights holding NaN or infinities (refused
    otherwise)."""
    return load_checkpoint(path, device=device, dtype=dtype, max_seq_len=max_seq_len, tokenizer=False, format=format,
                           allow_non_finite=allow_non_finite)[0]


def load_checkpoint(
    path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, *, device="cpu", dtype=None,
    max_seq_len: int | None = None, tokenizer: bool = True, format: str | None = None, allow_non_finite: bool = False,
):
    """(model, tokenizer): the model as ``load_model`` gives it and the tokenizer at ``tokenizer_path`` or beside
    the checkpoint (None when ``tokenizer`` is False). A GGUF file is opened once for both."""
    from tokenizer import load_tokenizer
    from tokenizer.gguf_vocab import tokenizer_from_gguf

    path = Path(path)
    fmt = detect_format(path, format)
    found_tokenizer = None
    if fmt == "gguf":
        reader = open_gguf(path)  # refuses another architecture before its vocabulary is read
        if tokenizer and tokenizer_path is None:
            found_tokenizer = tokenizer_from_gguf(reader, path)
        args, tensors, sources = read_gguf(path, reader)
        del reader
    else:
        args, tensors, sources = READERS[fmt](path)
    if tokenizer and found_tokenizer is None:
        found_tokenizer = load_tokenizer(tokenizer_path or path)
    if max_seq_len is not None:
        args = replace(args, max_seq_len=max_seq_len)
    model = build_model(args, tensors, sources, path, device=device, dtype=dtype, allow_non_finite=allow_non_finite)
    return model, found_tokenizer
