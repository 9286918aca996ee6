"""The vocabulary of a GGUF file (llama.cpp's metadata keys ``tokenizer.ggml.*``) rebuilt into one of our
backends: ``gpt2`` (byte-level BPE) into a ``tokenizers`` BPE, ``llama`` (sentencepiece) into a sentencepiece model.
Either can then be saved as ``tokenizer.json`` / ``tokenizer.model``."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader
from sentencepiece import sentencepiece_model_pb2
from tokenizers import pre_tokenizers

from tokenizer.base import Tokenizer, TokenizerError
from tokenizer.chat_format import compile_template
from tokenizer.hf import HFTokenizer, byte_level_bpe, split_then_bytes
from tokenizer.sp import SentencePieceTokenizer
from tokenizer.tiktoken_bpe import LLAMA3_PATTERN

CONTROL = 3  # token_type, same numbering as sentencepiece's piece types (1 normal, 2 unknown, 6 byte, ...)
BYTE = 6


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# ``tokenizer.ggml.pre`` -> how text is split before BPE (llama.cpp's names; SmolLM2 splits digits one by one).
PRE_TOKENIZERS = {
    "default": _gpt2_pre_tokenizer,
    "gpt2": _gpt2_pre_tokenizer,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre_tokenizer()]),
    "llama-bpe": lambda: split_then_bytes(LLAMA3_PATTERN),
}


def load_gguf_tokenizer(path: Path) -> Tokenizer:
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct and numpy errors on damaged files
        raise TokenizerError(f"{path} is not a readable GGUF file: {e}") from None
    return tokenizer_from_gguf(reader, path)


def tokenizer_from_gguf(reader: GGUFReader, path: Path) -> Tokenizer:
    """The vocabulary of a GGUF file already opened (a checkpoint loader reads its weights from the same reader)."""

    def meta(key: str, default=None):
        field = reader.fields.get(f"tokenizer.{key}")
        return default if field is None else field.contents()

    kind = meta("ggml.model")
    if kind is None:
        raise TokenizerError(f"{path} holds no vocabulary (no tokenizer.ggml.model key)")
    tokens = meta("ggml.tokens")
    token_types = meta("ggml.token_type") or [1] * len(tokens)
    bos_id, eos_id, pad_id = (meta(f"ggml.{name}_token_id") for name in ("bos", "eos", "padding"))
    chat_template = meta("chat_template")
    if chat_template is not None:
        compile_template(chat_template, path)

    if kind == "gpt2":
        pre = meta("ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"{path}: pre-tokenizer {pre!r} is not supported (known: {sorted(PRE_TOKENIZERS)})")
        backend = byte_level_bpe(
            {token: i for i, token in enumerate(tokens)},
            [tuple(merge.split(" ", 1)) for merge in meta("ggml.merges")],
            PRE_TOKENIZERS[pre](),
            special_tokens=[token for token, kind in zip(tokens, token_types) if kind == CONTROL],
            ignore_merges=pre == "llama-bpe",  # Llama 3 takes a piece whole when it is a token, like tiktoken
        )
        name = lambda i: None if i is None else tokens[i]  # noqa: E731
        return HFTokenizer(
            backend,
            str(path),
            bos_token=name(bos_id),
            eos_token=name(eos_id),
            pad_token=name(pad_id),
            add_bos=meta("ggml.add_bos_token", pre == "llama-bpe"),
            chat_template=chat_template,
        )
    if kind == "llama":
        model = sentencepiece_model_pb2.ModelProto()
        for token, score, token_type in zip(tokens, meta("ggml.scores"), token_types):
            model.pieces.add(piece=token, score=score, type=token_type)
        unk_id = meta("ggml.unknown_token_id", 0)
        model.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
        model.trainer_spec.vocab_size = len(tokens)
        model.trainer_spec.byte_fallback = BYTE in token_types
        for field, token_id in (("unk", unk_id), ("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
            setattr(model.trainer_spec, f"{field}_id", -1 if token_id is None else token_id)
            if token_id is not None:
                setattr(model.trainer_spec, f"{field}_piece", tokens[token_id])
        # Llama's normalization: none, besides a leading space and spaces spelled as "▁".
        model.normalizer_spec.name = "identity"
        model.normalizer_spec.add_dummy_prefix = meta("ggml.add_space_prefix", True)
        model.normalizer_spec.remove_extra_whitespaces = False
        model.normalizer_spec.escape_whitespaces = True
        return SentencePieceTokenizer(
            model.SerializeToString(),
            str(path),
            add_bos=meta("ggml.add_bos_token", True),
            chat_template=chat_template,
        )
    raise TokenizerError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (known: 'gpt2', 'llama')")
