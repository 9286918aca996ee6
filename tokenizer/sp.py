"""sentencepiece backend: Llama 1/2 ``tokenizer.model`` files, models made by ``tokenizer.train``, and GGUF
``llama`` vocabularies (rebuilt into a sentencepiece model by ``tokenizer.gguf_vocab``)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from tokenizer.base import Tokenizer, TokenizerError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_proto: bytes, source: str, *, add_bos: bool = True, chat_template: str | None = None):
        self.source = source
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(model_proto)
        except (RuntimeError, TypeError) as e:
            raise TokenizerError(f"{source} is not a valid sentencepiece model: {e}") from None
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (self.processor.bos_id(), self.processor.eos_id(), self.processor.pad_id())
        )
        self.special_tokens = {
            self.processor.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.processor.is_control(i) or self.processor.is_unknown(i)
        }
        self.stop_ids = self._find_stop_ids()
        self.add_bos = add_bos
        self.chat_template = chat_template

    @classmethod
    def from_file(cls, path: Path, **kwargs) -> SentencePieceTokenizer:
        return cls(path.read_bytes(), str(path), **kwargs)

    def _encode_plain(self, text: str) -> list[int]:
        # sentencepiece never matches control pieces in text, so plain text is all it encodes.
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.processor.id_to_piece(token_id).encode()

    def save_pretrained(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tokenizer.model").write_bytes(self.model_proto)
        # legacy=False: text after a control token gets no extra dummy-prefix space, as sentencepiece itself does.
        self._write_configs(out_dir, "LlamaTokenizer", legacy=False)
