"""sentencepiece backend: Llama 1/2 ``tokenizer.model`` files, models made by ``tokenizer.train``, and GGUF
``llama`` vocabularies (rebuilt into a sentencepiece model by ``tokenizer.gguf_vocab``)."""

from __future__ import annotations

from pathlib import Path

from functools import cached_property

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

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

    def _proto(self) -> sentencepiece_model_pb2.ModelProto:
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(self.model_proto)
        return model

    @cached_property
    def _continuation(self) -> spm.SentencePieceProcessor:
        """The same model without the dummy prefix: it neither adds a leading "▁" nor strips one when decoding
        (the same ids as Code Llama's ``encode("☺" + s)[2:]``)."""
        model = self._proto()
        model.normalizer_spec.add_dummy_prefix = False
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(model.SerializeToString())
        return processor

    def encode_infill(self, text: str) -> list[int]:
        return self._continuation.encode(text)

    def decode_infill(self, ids: list[int]) -> str:
        return self._continuation.decode(list(ids))

    def token_id(self, text: str) -> int | None:
        token_id = self.processor.piece_to_id(text)
        unknown = self.processor.is_unknown(token_id) and text != self.processor.id_to_piece(token_id)
        return None if unknown else token_id

    def with_added_tokens(self, names: list[str]) -> SentencePieceTokenizer:
        model = self._proto()
        for name in dict.fromkeys(names):
            if self.token_id(name) is None:
                model.pieces.add(piece=name, score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL)
        return SentencePieceTokenizer(
            model.SerializeToString(), self.source, add_bos=self.add_bos, chat_template=self.chat_template
        )

    def token_bytes(self, token_id: int) -> bytes:
        return self.processor.id_to_piece(token_id).encode()

    def save_pretrained(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tokenizer.model").write_bytes(self.model_proto)
        # legacy=False: text after a control token gets no extra dummy-prefix space, as sentencepiece itself does.
        self._write_configs(out_dir, "LlamaTokenizer", legacy=False)
