"""Generation: the ``Llama`` facade (Meta's API) over the engine (KV-cache slots, prefill and decode steps), per-row
sampling and streaming text."""

from llama.generation.engine import Engine, Request
from llama.generation.llama import Llama
from llama.generation.sampling import SamplingParams

__all__ = ["Engine", "Llama", "Request", "SamplingParams"]
