"""tiktoken backend: Llama 3 ``tokenizer.model`` (lines of ``base64(token bytes) rank``), with Meta's 256 special
tokens numbered from the number of base tokens, as in Meta's ``llama-models`` tokenizer."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import tiktoken

from tokenizer.base import Tokenizer, TokenizerError, is_rust_panic
from tokenizer.hf import HFTokenizer, bpe_from_ranks

# Meta's split pattern for Llama 3 (also llama.cpp's "llama-bpe" pre-tokenizer).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call awaits its result)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
]


def read_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """The ``base64 rank`` lines of a tiktoken file as {token bytes: rank}: every token and every rank once."""
    ranks, line_of_rank = {}, {}
    try:
        for number, line in enumerate(data.decode("ascii").splitlines(), 1):
            if not line:
                continue
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
            if token in ranks or rank in line_of_rank:
                first = line_of_rank[ranks[token]] if token in ranks else line_of_rank[rank]
                raise ValueError(f"line {number} repeats the token or rank of line {first}")
            ranks[token], line_of_rank[rank] = rank, number
    except (UnicodeDecodeError, binascii.Error, ValueError) as e:
        raise TokenizerError(f"{source} is not a tiktoken BPE file (lines of 'base64-token rank'): {e}") from None
    return ranks


class TiktokenTokenizer(Tokenizer):
    def __init__(self, ranks: dict[bytes, int], source: str, *, chat_template: str | None = None):
        self.source = source
        self.ranks = ranks
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        try:
            self.encoding = tiktoken.Encoding(
                name=Path(source).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                special_tokens=self.special_tokens,
            )
        except BaseException as e:  # tiktoken's Rust core panics on vocabularies it cannot use
            if not (isinstance(e, (ValueError, TypeError)) or is_rust_panic(e)):
                raise
            raise TokenizerError(f"{source}: tiktoken cannot use this vocabulary: {e}") from None
        self.vocab_size = self.encoding.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = self._find_stop_ids()  # end_of_text, eom, eot
        self.add_bos = True
        self.chat_template = chat_template

    @classmethod
    def from_file(cls, path: Path, **kwargs) -> TiktokenTokenizer:
        return cls(read_ranks(path.read_bytes(), str(path)), str(path), **kwargs)

    def _encode_plain(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def token_id(self, text: str) -> int | None:
        return self.special_tokens.get(text, self.ranks.get(text.encode()))

    def with_added_tokens(self, names: list[str]) -> HFTokenizer:
        """The added tokens live in the ``tokenizers`` twin (what ``save_pretrained`` writes anyway)."""
        return self.to_hf().with_added_tokens(names)

    def to_hf(self) -> HFTokenizer:
        """The same vocabulary as a byte-level BPE of the ``tokenizers`` library (what transformers loads)."""
        backend = bpe_from_ranks(self.ranks, LLAMA3_PATTERN, special_tokens=LLAMA3_SPECIAL_TOKENS)
        names = {i: name for name, i in self.special_tokens.items()}
        return HFTokenizer(
            backend,
            self.source,
            bos_token=names[self.bos_id],
            eos_token=names[self.eos_id],
            pad_token=names[self.pad_id],
            add_bos=self.add_bos,
            chat_template=self.chat_template,
        )

    def save_pretrained(self, out_dir: str | Path) -> None:
        # transformers has no tiktoken backend of its own, so write the equivalent tokenizer.json.
        self.to_hf().save_pretrained(out_dir)
