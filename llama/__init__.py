"""llama-one: the LLaMA model (``llama.model``), its checkpoints, generation, training and kernels.

``from llama import Llama, ModelArgs, Transformer`` as in Meta's reference; the names are imported on first use,
so that ``import llama.model`` (or a command's ``--help``) does not load every wing.
"""

__all__ = ["Llama", "ModelArgs", "Transformer"]


def __getattr__(name: str):
    if name == "Llama":
        from llama.generation import Llama

        return Llama
    if name in ("ModelArgs", "Transformer"):
        import llama.model

        return getattr(llama.model, name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")
