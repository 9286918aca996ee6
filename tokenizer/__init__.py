"""Tokenizers for LLaMA-family checkpoints behind one interface (``Tokenizer``), their chat formats and dialogs,
and the text corpora tokenizers are trained on."""

from tokenizer.base import Tokenizer, TokenizerError, check_fits
from tokenizer.chat_format import Dialog, Message, chat_format, check_dialog, encode_dialog
from tokenizer.load import TokenizerNotFoundError, load_tokenizer

__all__ = [
    "Dialog", "Message", "Tokenizer", "TokenizerError", "TokenizerNotFoundError", "chat_format", "check_dialog",
    "check_fits", "encode_dialog", "load_tokenizer",
]
