"""Weight-only quantisation: int8 with per-output-channel scales, int4 with per-group scales and zero points.

Batch-1 decode reads every weight once per token, so halving (vs bf16) or quartering (vs fp32) the bytes read
speeds it up about as much, provided the matmul unpacks weights as fast as memory delivers them. The matmuls:
- CPU with AVX2: our kernels (``llama/cpu_kernels.cpp``), which round the activations to int16 per group of 32
  and take integer dot products: up to ~4x PyTorch's packed kernels on batch-1 decode. From 32 activation rows on
  (prefill) the weight is dequantised and the matmul is sgemm's.
- other CPUs, or where the kernels cannot be built: PyTorch's ``_weight_int8pack_mm`` and
  ``_weight_int4pack_mm_for_cpu``, on bf16 activations.
- CUDA: int8 dequantised inside the matmul expression, which ``torch.compile`` fuses (as gpt-fast does); int4
  through the tinygemm kernel ``_weight_int4pack_mm`` on bf16 activations.

int4 uses groups of 32 with an asymmetric (min/max) grid, the layout of GGUF's Q4_1, so a Q4_1 checkpoint (the
embedded SmolLM2) re-quantises to the same 16 levels per group, off only by bf16 rounding of scale and zero point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama.kernels import cpu as cpu_kernels
from llama.model import Transformer

QUANTIZATIONS = ("int8", "int4")


def _on_our_cpu_kernels(weight: torch.Tensor, group_size: int = cpu_kernels.GROUP_SIZE) -> bool:
    return (
        weight.device.type == "cpu"
        and group_size == cpu_kernels.GROUP_SIZE
        and weight.shape[1] % cpu_kernels.GROUP_SIZE == 0
        and cpu_kernels.available()
    )


def _tokens_by_features(x: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, in_features).to(dtype).contiguous()  # the kernels take 2-D input


def _run_our_kernels(x: torch.Tensor, in_features: int, kernel, dequantize) -> torch.Tensor:
    """``kernel(flat)`` for decode-sized inputs; from SGEMM_FROM_ROWS rows on (prefill), sgemm on the weight
    ``dequantize()`` gives. Returns (tokens, out_features) float32."""
    flat = _tokens_by_features(x, in_features, torch.float32)
    if flat.shape[0] >= cpu_kernels.SGEMM_FROM_ROWS:
        return F.linear(flat, dequantize())
    return kernel(flat)


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()  # (out_features, in_features)
        self.ours = _on_our_cpu_kernels(weight)
        # Scales are stored in the dtype the matmul takes them in (bf16 for PyTorch's CPU kernel: casting a buffer
        # inside a compiled graph trips Inductor's lowering of it), and the weight is rounded against the stored
        # scale, so each element is off by at most half a step.
        if weight.device.type == "cpu":
            scale_dtype = torch.float32 if self.ours else torch.bfloat16
        else:
            scale_dtype = weight.dtype
        scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127).to(scale_dtype)
        quantised = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantised)
        self.register_buffer("scales", scales)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ours:
            out = _run_our_kernels(
                x, self.in_features,
                kernel=lambda flat: torch.ops.llama_one.int8_linear(flat, self.weight, self.scales),
                dequantize=self.dequantize,
            )
        elif x.device.type == "cpu":
            flat = _tokens_by_features(x, self.in_features, torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        else:
            return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The (out_features, in_features) weight in fp32, as the matmuls use it."""
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(nn.Module):
    """Each group of ``group_size`` consecutive input weights of an output row is stored as q in 0..15 with a
    bf16 scale s and zero point z: w = (q - 8) * s + z, the kernels' convention. s spans the group's min..max."""

    CUDA_INNER_K_TILES = 8  # tinygemm's widest tiling: K must be a multiple of 8 * 16

    def __init__(self, weight: torch.Tensor, group_size: int = 32):
        super().__init__()
        if not self.supports(weight, group_size):
            raise ValueError(f"int4 kernels cannot take a {tuple(weight.shape)} weight with groups of {group_size}")
        w = weight.detach().float()  # (out_features, in_features)
        n, k = w.shape
        groups = w.reshape(n, k // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (n, k // group_size)
        scales = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16)
        zeros = (low + 8 * scales.float()).to(torch.bfloat16)
        # Rounded against the stored bf16 scale and zero point, so each element is off by at most half a step.
        offsets = (groups - zeros.float()[..., None]) / scales.float()[..., None]
        q = (torch.round(offsets) + 8).clamp(0, 15).to(torch.int32)  # (n, k // group_size, group_size)
        scales_and_zeros = torch.stack([scales, zeros], dim=-1)  # (n, k // group_size, 2)
        self.ours = _on_our_cpu_kernels(weight, group_size)
        if self.ours:  # byte j of a group: q[j] in the low nibble, q[j + 16] in the high one (GGUF's order)
            packed = (q[..., :16] | q[..., 16:] << 4).to(torch.uint8).reshape(n, k // 2)
        elif w.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 1)
        else:
            q = q.reshape(n, k)
            nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (n, k // 2)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, self.CUDA_INNER_K_TILES)
        if not self.ours:
            scales_and_zeros = scales_and_zeros.transpose(0, 1)  # PyTorch's kernels take (groups, n, 2)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        self.in_features, self.out_features, self.group_size = k, n, group_size

    @classmethod
    def supports(cls, weight: torch.Tensor, group_size: int) -> bool:
        n, k = weight.shape
        if group_size not in (32, 64, 128, 256) or k % group_size:
            return False
        if weight.device.type == "cpu":
            return _on_our_cpu_kernels(weight, group_size) or n % 16 == 0
        return weight.device.type == "cuda" and n % 8 == 0 and k % (cls.CUDA_INNER_K_TILES * 16) == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ours:
            out = _run_our_kernels(
                x, self.in_features,
                kernel=lambda flat: torch.ops.llama_one.int4_linear(flat, self.weight, self.scales_and_zeros),
                dequantize=lambda: torch.ops.llama_one.int4_dequantize(self.weight, self.scales_and_zeros),
            )
        else:
            flat = _tokens_by_features(x, self.in_features, torch.bfloat16)
            if x.device.type == "cpu":
                mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            else:
                mm = torch.ops.aten._weight_int4pack_mm
            out = mm(flat, self.weight, self.group_size, self.scales_and_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


@torch.no_grad()
def quantize_weights(model: Transformer, method: str = "int8", group_size: int = 32) -> Transformer:
    """Replace every linear layer of the blocks with ``Int8Linear`` or ``Int4Linear`` (``method``), in place; a
    layer whose shape the int4 kernels cannot take gets int8. The output projection always gets int8: it decides
    the next token directly, and GGUF's 4-bit formats keep it at 8 bits for that reason. A tied output projection
    gets its own int8 copy of the embedding matrix. The input embedding stays in float: it is a lookup, read one
    row per token. Quantising an already quantised model changes nothing."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {method!r}")
    if isinstance(model.output, Int8Linear):
        return model
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    if method == "int4" and Int4Linear.supports(child.weight, group_size):
                        setattr(parent, name, Int4Linear(child.weight, group_size))
                    else:
                        setattr(parent, name, Int8Linear(child.weight))
    model.output = Int8Linear(model.output.weight if model.output is not None else model.tok_embeddings.weight)
    return model
