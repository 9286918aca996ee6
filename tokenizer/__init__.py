"""Tokenizers for LLaMA-family checkpoints behind one interface (``Tokenizer``), and their chat formats."""

from tokenizer.base import Tokenizer, TokenizerError, check_fits
from tokenizer.chat import encode_dialog
from tokenizer.load import TokenizerNotFoundError, load_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "TokenizerNotFoundError", "check_fits", "encode_dialog", "load_tokenizer"]
