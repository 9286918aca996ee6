"""Weight-only int8 quantisation: per-output-channel symmetric scales, activations stay in float.

Batch-1 decode reads every weight once per token, so halving (vs bf16) or quartering (vs fp32) the bytes read
speeds it up about as much. On CPU the matmul is PyTorch's ``_weight_int8pack_mm``, fed bf16 activations: its
bf16 kernel is vectorised while its fp32 one is ~10x slower (measured on AVX2). Elsewhere the weight is
dequantised inside the matmul expression, which ``torch.compile`` fuses (as gpt-fast does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama.model import Transformer


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()  # (out_features, in_features)
        # Scales are stored in the dtype the matmul takes them in (bf16 for the CPU kernel: casting a buffer
        # inside a compiled graph trips Inductor's lowering of it), and the weight is rounded against the
        # stored scale, so each element is off by at most half a step.
        scale_dtype = torch.bfloat16 if weight.device.type == "cpu" else weight.dtype
        scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127).to(scale_dtype)
        quantised = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantised)
        self.register_buffer("scales", scales)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # the kernel takes 2-D input
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@torch.no_grad()
def quantize_int8(model: Transformer) -> Transformer:
    """Replace every linear layer of the blocks and the output projection with ``Int8Linear``, in place.
    The input embedding stays in float: it is a lookup, read one row per token. A tied output projection gets
    its own int8 copy of the embedding matrix, since it is the largest matmul of small-vocabulary-heavy models."""
    if isinstance(model.output, Int8Linear):  # already quantised: its int8 weights must not be quantised again
        return model
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child.weight))
    model.output = Int8Linear(model.output.weight if model.output is not None else model.tok_embeddings.weight)
    return model
