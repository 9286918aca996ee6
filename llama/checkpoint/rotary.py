"""The one place that knows the two rotary layouts of q/k weight rows (see ``llama.model``).

We keep HF's rotate-half order, where head row c·(d/2)+i (c ∈ {0, 1}) is the i-th member of rotated pair c. Meta and
GGUF store the same rows interleaved, pairs at rows 2i and 2i+1. Reading Meta/GGUF we view each head's rows as
(d/2, 2) and transpose to (2, d/2) (``interleaved_to_half``); writing Meta we do the reverse
(``half_to_interleaved``). The same permutation applied to both q and k leaves q·k and so the whole model
unchanged; v, o and the FFN are never touched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llama.model import ModelArgs


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta/GGUF q or k rows (pairs at 2i, 2i+1) -> HF rotate-half rows (pairs at i, i + d/2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_half``."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(tensors: dict[str, torch.Tensor], args: ModelArgs, permute: Callable) -> None:
    """Apply ``permute`` to every wq (n_heads) and wk (n_kv_heads) in ``tensors`` (our names), in place."""
    for name, w in tensors.items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            n_heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads
            if w.shape[0] % (2 * n_heads) == 0:  # a shape that does not fit is reported by load_model
                tensors[name] = permute(w, n_heads)
