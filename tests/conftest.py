import pytest
import torch

from llama.checkpoint.embedded import smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """The real SmolLM2-135M-Instruct GGUF, downloaded once into the cache and shared by every test."""
    return smollm2_gguf()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
