"""Train a sentencepiece BPE tokenizer the way Llama's was made: byte fallback (no unknown text), digits split one
by one, no normalization beyond a leading space; <unk>=0, <s>=1, </s>=2, no pad.

    python -m tokenizer.train --input data/ more/*.jsonl a.txt,b.txt --vocab_size 32000 --output out/tokenizer

Inputs take the forms ``python -m llama.prepare`` takes (``tokenizer.corpus``): files, folders, globs, comma lists;
text files, ``.jsonl(.gz)`` with a ``text`` field, ``.parquet``. Writes ``OUTPUT.model`` and ``OUTPUT.vocab``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from tokenizer.corpus import expand_inputs, read_documents

PROG = "python -m tokenizer.train"


def lines(files: list[Path]) -> Iterator[str]:
    """Every line of every document: sentencepiece's sentences."""
    for path in files:
        for document in read_documents(path):
            yield from document.splitlines()


def train(input: str | list[str], vocab_size: int, output: str, max_sentences: int = 2_000_000,
          exclude: list[str] = ()) -> Path:
    """Train on the ``input`` corpus and write ``output``.model and ``output``.vocab. At most ``max_sentences``
    lines, sampled at random, are used (memory grows with them)."""
    if vocab_size < 1 or max_sentences < 1:
        raise ValueError(f"--vocab_size and --max_sentences must be >= 1, got {vocab_size} and {max_sentences}")
    files = expand_inputs(input, exclude)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(files),
        model_prefix=output,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=0.99995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return Path(f"{output}.model")


def main(argv: list[str] | None = None):
    # the same conventions as llama's commands (llama.cli), which this package does not import
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files, folders, glob patterns or comma lists")
    parser.add_argument("--vocab_size", type=int, required=True, help="pieces in the vocabulary")
    parser.add_argument("--output", required=True, help="path prefix of the .model and .vocab files")
    parser.add_argument("--max_sentences", type=int, default=2_000_000, help="lines sampled for training at most")
    parser.add_argument("--exclude", nargs="*", default=[], help="skip folder/file names matching these patterns")
    args = parser.parse_args(argv)
    try:
        model = train(args.input, args.vocab_size, args.output, args.max_sentences, args.exclude)
    except (ValueError, OSError, RuntimeError) as error:  # sentencepiece reports bad settings as RuntimeError
        sys.exit(f"{PROG}: error: {error}")
    print(f"wrote {model} ({args.vocab_size} pieces)")


if __name__ == "__main__":
    main()
