from llama.generation import Llama
from llama.model import ModelArgs, Transformer

__all__ = ["Llama", "ModelArgs", "Transformer"]
