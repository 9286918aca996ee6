"""Train a sentencepiece BPE tokenizer the way Llama's was made: byte fallback (no unknown text), digits split one
by one, no normalization beyond a leading space; <unk>=0, <s>=1, </s>=2, no pad.

    python -m tokenizer.train --input data/a.txt,data/b.txt --vocab_size 32000 --output out/tokenizer
"""

from __future__ import annotations

import os
from pathlib import Path

import fire
import sentencepiece as spm


def train(input: str | list[str], vocab_size: int, output: str, max_sentences: int = 2_000_000) -> None:
    """Train on the text ``input`` files (a list, or names separated by commas) and write ``output``.model and
    ``output``.vocab. At most ``max_sentences`` lines, sampled at random, are used (memory grows with them)."""
    names = [input] if isinstance(input, str) else list(input)
    files = [Path(name) for item in names for name in str(item).split(",") if name]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"training text not found: {', '.join(missing) or 'no --input files given'}")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files],
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
    print(f"wrote {output}.model ({vocab_size} pieces)")


if __name__ == "__main__":
    fire.Fire(train)
