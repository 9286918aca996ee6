"""A real server for the serving tests: uvicorn on 127.0.0.1 at a free port, in a thread of the test process, over
a tiny random model (transformers' weights read by our loader) and a byte-level tokenizer."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
import uvicorn
from transformers import LlamaConfig, LlamaForCausalLM

from llama.checkpoint import load_model
from llama.generation import Llama
from llama.serving import create_app


class ByteTokenizer:
    """A complete byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then BOS and EOS (Llama 2's chat format)."""

    vocab_size, bos_id, eos_id, pad_id = 258, 256, 257, None
    stop_ids = frozenset({257})
    special_tokens = {"<s>": 256, "</s>": 257}
    chat_template = None
    add_bos = True
    source = "bytes"

    def encode(self, text, bos=False, eos=False, allow_special=False):
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
MAX_SEQ_LEN = 256


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory):
    """A random 2-layer Llama (GQA) saved by transformers."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_SEQ_LEN, rms_norm_eps=1e-5, initializer_range=0.3,
    )
    folder = tmp_path_factory.mktemp("tiny-hf")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def tiny_llama(folder, **options) -> Llama:
    return Llama(load_model(folder), TOK, max_seq_len=MAX_SEQ_LEN, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(llm: Llama, **options):
    """Serve ``llm`` on 127.0.0.1; yields the base URL (``http://127.0.0.1:PORT``) once the engine is warm."""
    app = create_app(llm, "tiny", **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and app.app.state.server.scheduler.warm.is_set()):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
