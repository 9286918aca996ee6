from llama.model import ModelArgs, Transformer

__all__ = ["ModelArgs", "Transformer"]
