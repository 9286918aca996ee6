"""Fill-in-the-middle training documents (Code Llama, paper section 2.3; Bavarian et al. 2022).

With probability ``rate`` a document is cut at two character positions drawn uniformly from 0..len(text) into a
prefix, a middle and a suffix, and written as the infilling prompt followed by its middle and the end of the middle
(``tokenizer.fim``): suffix-prefix-middle with probability ``spm_rate``, else prefix-suffix-middle. The other
documents are encoded whole. Each document draws from its own random stream, seeded by ``(seed, document
number)``, so the shards do not depend on the order of work or the number of workers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tokenizer import Tokenizer
from tokenizer.fim import fim_document, fim_tokens


@dataclass(frozen=True)
class FimOptions:
    rate: float = 0.0  # share of documents transformed
    spm_rate: float = 0.5  # share of the transformed ones laid out suffix first
    seed: int = 0

    def check(self, tokenizer: Tokenizer) -> None:
        """Refuse rates outside [0, 1], and a transform for a vocabulary without FIM tokens."""
        for name, rate in (("fim_rate", self.rate), ("fim_spm_rate", self.spm_rate)):
            if not 0 <= rate <= 1:
                raise ValueError(f"--{name} must be in [0, 1], got {rate}")
        if self.rate > 0:
            fim_tokens(tokenizer)

    def record(self, tokenizer: Tokenizer) -> dict:
        """What ``index.json`` says of the transform: the options and the token ids it wrote."""
        return {**asdict(self), "token_ids": asdict(fim_tokens(tokenizer))}


@dataclass(frozen=True)
class FimSplit:
    prefix: str
    middle: str
    suffix: str
    suffix_first: bool


def fim_split(text: str, doc_number: int, options: FimOptions) -> FimSplit | None:
    """Where document ``doc_number`` is cut, or None when it stays whole."""
    rng = np.random.default_rng([options.seed, doc_number])
    if rng.random() >= options.rate:
        return None
    start, end = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    return FimSplit(text[:start], text[start:end], text[end:], bool(rng.random() < options.spm_rate))


def encode_document(tokenizer: Tokenizer, text: str, doc_number: int, options: FimOptions
                    ) -> tuple[list[int], FimSplit | None]:
    """The document's token ids (BOS when the tokenizer adds one, EOS last) and its split, if it was cut."""
    split = fim_split(text, doc_number, options) if options.rate > 0 else None
    if split is None:
        return tokenizer.encode(text, bos=tokenizer.add_bos, eos=True), None
    return fim_document(tokenizer, split.prefix, split.middle, split.suffix, split.suffix_first), split
