"""Convert a checkpoint between formats, carrying its tokenizer across.

    python -m llama.convert SRC DST [--format hf|meta] [--dtype bf16|fp16|fp32] [--src_format meta|hf|gguf]

SRC is anything ``llama.checkpoint.load_model`` reads (Meta folder, Hugging Face folder, .gguf file); DST is a new
folder, written atomically.
"""

from __future__ import annotations

import torch

from llama import cli
from llama.checkpoint import load_model, save_hf, save_meta
from tokenizer import TokenizerNotFoundError, check_fits, load_tokenizer

PROG = "python -m llama.convert"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WRITERS = {"hf": save_hf, "meta": save_meta}


def convert(src: str, dst: str, dtype: str | None = None, format: str = "hf", src_format: str | None = None,
            allow_non_finite: bool = False) -> str:
    """Write ``src`` to ``dst`` in ``format``; returns what was written."""
    model = load_model(src, format=src_format, allow_non_finite=allow_non_finite)
    try:
        tokenizer = load_tokenizer(src)
    except TokenizerNotFoundError:
        tokenizer = None
    if tokenizer is not None:
        check_fits(tokenizer, model.args.vocab_size, str(src))  # as Llama.build refuses them
    out = WRITERS[format](model, dst, tokenizer=tokenizer, dtype=DTYPES.get(dtype), progress=True)
    return f"wrote {format} checkpoint to {out}{'' if tokenizer else ' (no tokenizer found in the source)'}"


def main(argv: list[str] | None = None):
    parser = cli.parser(PROG, __doc__)
    parser.add_argument("src", help="Meta folder, Hugging Face folder or .gguf file")
    parser.add_argument("dst", help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--format", choices=sorted(WRITERS), default="hf", help="the format to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="the dtype to write (default: the source's)")
    parser.add_argument("--src_format", choices=["gguf", "hf", "meta"],
                        help="which checkpoint to read from a folder holding both a Meta and an HF one")
    parser.add_argument("--allow_non_finite", action="store_true",
                        help="convert weights holding NaN or infinities (refused otherwise)")
    args = parser.parse_args(argv)
    print(cli.run(PROG, convert, args.src, args.dst, args.dtype, args.format, args.src_format, args.allow_non_finite))


if __name__ == "__main__":
    main()
