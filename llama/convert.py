"""Convert a checkpoint between formats, carrying its tokenizer across.

    python -m llama.convert SRC DST [--format hf|meta] [--dtype bf16|fp16|fp32]

SRC is anything ``load_model`` reads (Meta folder, Hugging Face folder, .gguf file); DST is a new folder.
"""

from __future__ import annotations

import sys

import fire
import torch

from llama.checkpoint import CheckpointError, load_model, save_hf, save_meta

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WRITERS = {"hf": save_hf, "meta": save_meta}


def _tokenizer(src: str):
    """The checkpoint's tokenizer, or None when the source carries none."""
    from tokenizer import TokenizerNotFoundError, load_tokenizer

    try:
        return load_tokenizer(src)
    except TokenizerNotFoundError:
        return None


def convert(src: str, dst: str, dtype: str | None = None, format: str = "hf") -> None:
    if format not in WRITERS:
        raise ValueError(f"--format {format!r}: expected one of {sorted(WRITERS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    model = load_model(src)
    tokenizer = _tokenizer(src)
    out = WRITERS[format](model, dst, tokenizer=tokenizer, dtype=DTYPES.get(dtype), progress=True)
    print(f"wrote {format} checkpoint to {out}{'' if tokenizer else ' (no tokenizer found in the source)'}")


def main():
    try:
        fire.Fire(convert)
    except (CheckpointError, ValueError) as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
