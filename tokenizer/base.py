"""The one tokenizer interface every backend implements (sentencepiece, tiktoken, HF ``tokenizers``).

A backend fills in the vocabulary attributes in its constructor and implements ``_encode_plain`` (text with no
control tokens), ``decode``, ``token_bytes`` and ``save_pretrained``; BOS/EOS handling, special-token splitting,
stop ids and the fingerprint are shared here.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

# Control tokens that end a turn in the chat formats we know; whichever of them a vocabulary holds stop generation.
END_OF_TURN_TOKENS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)


class TokenizerError(ValueError):
    """A tokenizer file or folder that cannot be used, or a tokenizer that does not fit its model."""


class Tokenizer(ABC):
    vocab_size: int  # one more than the largest id
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    stop_ids: frozenset[int]  # ids that end a generation: eos plus end-of-turn tokens
    special_tokens: dict[str, int]  # control tokens: text -> id
    chat_template: str | None  # the checkpoint's own Jinja chat template, if it has one
    add_bos: bool  # whether this checkpoint's convention prepends BOS to plain text
    source: str  # the file it was loaded from, for error messages

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. With ``allow_special`` False, the text of a control token (say "<|eot_id|>")
        is encoded as ordinary text, never as the control token itself."""
        check_text(text)
        ids: list[int] = []
        for piece in self.split_special(text) if allow_special else [text]:
            ids.extend([piece] if isinstance(piece, int) else self._encode_plain(piece))
        if bos:
            ids = [self._required_id("bos_id")] + ids
        if eos:
            ids = ids + [self._required_id("eos_id")]
        return ids

    def split_special(self, text: str) -> list[str | int]:
        """``text`` cut at the control tokens it spells: plain-text pieces and control token ids, in order."""
        pieces: list[str | int] = []
        start = 0
        for match in self._special_pattern.finditer(text) if self.special_tokens else ():
            if match.start() > start:
                pieces.append(text[start : match.start()])
            pieces.append(self.special_tokens[match.group()])
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    @cached_property
    def _special_pattern(self) -> re.Pattern:
        # Longest first, so "<|eot_id|>" is never cut short by a token that is its prefix.
        names = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names)))

    def _required_id(self, name: str) -> int:
        token_id = getattr(self, name)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.source} has no {name.removesuffix('_id').upper()} token")
        return token_id

    @abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` with every character taken literally (no control tokens)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def encode_infill(self, text: str) -> list[int]:
        """Ids of ``text`` as the continuation of other text: without the space a sentencepiece-style tokenizer
        implicitly puts before a text's first word (Code Llama's ``encode_infilling``)."""
        return self._encode_plain(text)

    def decode_infill(self, ids: list[int]) -> str:
        """The inverse of ``encode_infill``: a leading space is kept, not taken for the implicit one."""
        return self.decode(ids)

    def token_id(self, text: str) -> int | None:
        """The id of the one token spelled ``text`` (a control token or a piece of the vocabulary), or None."""
        return self.special_tokens.get(text)

    @abstractmethod
    def with_added_tokens(self, names: list[str]) -> Tokenizer:
        """A copy of this tokenizer whose vocabulary also holds the control tokens ``names``: those it lacks get
        the next ids in order (from ``vocab_size`` on); text spelling them is encoded as them only with
        ``allow_special``, like every control token."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """What the vocabulary stores for ``token_id``: its bytes (byte-level BPE) or its piece (sentencepiece)."""

    @abstractmethod
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write files that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` and ``load_tokenizer(out_dir)``
        both load with the same ids."""

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary (every id's bytes, then the control tokens), whatever file format held it."""
        digest = hashlib.sha256()
        for token_id in range(self.vocab_size):
            piece = self.token_bytes(token_id)
            digest.update(len(piece).to_bytes(4, "little") + piece)
        digest.update(json.dumps(sorted(self.special_tokens.items(), key=lambda item: item[1])).encode())
        return digest.hexdigest()

    def _find_stop_ids(self, extra: tuple[int, ...] = ()) -> frozenset[int]:
        ends = {self.special_tokens[name] for name in END_OF_TURN_TOKENS if name in self.special_tokens}
        return frozenset(ends | set(extra) | ({self.eos_id} if self.eos_id is not None else set()))

    def token_name(self, token_id: int | None) -> str | None:
        """The text of a control token id (for config files), or None."""
        names = {i: name for name, i in self.special_tokens.items()}
        return None if token_id is None else names.get(token_id, self.token_bytes(token_id).decode("utf-8", "replace"))

    def _write_configs(self, out_dir: Path, tokenizer_class: str, **extra) -> None:
        """``tokenizer_config.json`` and ``special_tokens_map.json``, as transformers reads them."""
        special = {
            f"{kind}_token": self.token_name(getattr(self, f"{kind}_id"))
            for kind in ("bos", "eos", "pad")
            if getattr(self, f"{kind}_id") is not None
        }
        config = {
            "tokenizer_class": tokenizer_class,
            **special,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            **extra,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size})"


def check_text(text: str) -> None:
    """Refuse what is not Unicode text: a non-string, or a string holding a lone surrogate (what decoding bytes
    with ``errors="surrogateescape"`` or a JSON escape like "\\ud800" can give), which no tokenizer can encode."""
    if not isinstance(text, str):
        raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text holds a lone surrogate, U+{ord(text[e.start]):04X} at index {e.start}: not valid Unicode text "
            "(decode bytes with errors='replace')"
        ) from None


def is_rust_panic(error: BaseException) -> bool:
    """A panic in a Rust extension (tokenizers, tiktoken) arrives as pyo3's ``PanicException``, which derives from
    BaseException, not Exception, so ``except Exception`` lets it through."""
    return type(error).__name__ == "PanicException"


def check_fits(tokenizer: Tokenizer, vocab_size: int, source: str = "the model") -> None:
    """Raise if ``tokenizer`` has ids the model's embedding cannot hold. A model may pad its vocabulary beyond the
    tokenizer's (for efficient matmuls), so a smaller tokenizer is fine."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens, model {source} has {vocab_size}: "
            "they do not belong together"
        )
