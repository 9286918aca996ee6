"""``load_tokenizer``: pick the backend from a file's content or a checkpoint folder's files."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizer.base import Tokenizer
from tokenizer.gguf_vocab import load_gguf_tokenizer
from tokenizer.hf import HFTokenizer, read_tokenizer_config
from tokenizer.sp import SentencePieceTokenizer
from tokenizer.tiktoken_bpe import TiktokenTokenizer

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")


class TokenizerNotFoundError(FileNotFoundError):
    pass


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in ``path``: a ``tokenizer.json``, a ``tokenizer.model`` (sentencepiece or tiktoken, told
    apart by content), a ``.gguf`` file, or a checkpoint folder holding one of them."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / name for name in ("tokenizer.json", "tokenizer.model")] + sorted(path.glob("*.gguf"))
        found = next((candidate for candidate in candidates if candidate.is_file()), None)
        if found is None:
            looked_for = "tokenizer.json, tokenizer.model, *.gguf"
            raise TokenizerNotFoundError(f"{path} holds no tokenizer: looked for {looked_for}")
        path = found
    if not path.is_file():
        raise TokenizerNotFoundError(f"no tokenizer at {path}: no such file or folder")

    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"GGUF"):
        return load_gguf_tokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    # Meta's folders and ours keep the chat template and BOS convention beside tokenizer.model, if anywhere.
    config = read_tokenizer_config(path.parent)
    if _TIKTOKEN_LINE.match(head):
        return TiktokenTokenizer.from_file(path, chat_template=config["chat_template"])
    return SentencePieceTokenizer.from_file(
        path, add_bos=config.get("add_bos_token", True), chat_template=config["chat_template"]
    )
