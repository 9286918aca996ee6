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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``real`` (long runs on the real model) run only when asked for: ``pytest -m real``."""
    if "real" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="a long run on the real model: opt in with pytest -m real")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)
