"""Checkpoint formats: Meta (``params.json`` + ``consolidated.NN.pth``), Hugging Face (``config.json`` +
safetensors, single or sharded) and GGUF (llama.cpp, any quantisation ``gguf`` can dequantise), one module each;
``rotary`` holds the q/k row permutation between their layouts, ``load`` the format detection, ``embedded`` the
default model.

``load_model(path)`` detects the format and loads the model; ``load_checkpoint(path)`` gives the tokenizer beside
it too. ``save_hf`` and ``save_meta`` write atomically (``llama.files``).
"""

from llama.checkpoint.base import CheckpointError, CheckpointNotFoundError
from llama.checkpoint.hf import hf_config, save_hf
from llama.checkpoint.load import detect_format, load_args, load_checkpoint, load_model
from llama.checkpoint.meta import meta_params, save_meta

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "detect_format", "load_args", "load_checkpoint", "load_model",
    "save_hf", "save_meta", "hf_config", "meta_params",
]
