"""NF4 (4-bit NormalFloat, the QLoRA paper's data type) on bitsandbytes' codebook and layout, in plain PyTorch, so
it runs on any device: a frozen base for LoRA (QLoRA) where bitsandbytes is not installed.

The weight is cut into blocks of ``blocksize`` consecutive elements (row-major, as bitsandbytes flattens it); each
block keeps its absolute maximum (fp32) and each element the index of the nearest of 16 levels (``NF4_LEVELS``,
quantiles of a normal distribution scaled to [-1, 1]) of ``w / absmax``; two indices per byte, the first in the
high nibble. ``bitsandbytes.functional.dequantize_4bit`` reads our bytes and absmax as its own (tested). Double
quantisation of the absmax values (QLoRA's second trick, 0.37 bits per weight) is not done: they stay fp32.
"""

from __future__ import annotations

import torch

from llama.transforms.quantize import QuantizedLinear

# bitsandbytes' NF4 codebook (functional.get_4bit_type("nf4")), as stored in fp32.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (numel / 2,), absmax float32 (numel / blocksize,)) of ``weight``."""
    if weight.numel() % blocksize or blocksize % 2:
        raise ValueError(f"NF4: {weight.numel()} weights do not divide into blocks of {blocksize}")
    blocks = weight.detach().float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    levels = torch.tensor(NF4_LEVELS, device=weight.device)
    # nearest level: between consecutive levels the boundary is their midpoint
    index = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()
    return index[0::2] << 4 | index[1::2], absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 weight of ``shape`` that ``nf4_quantize`` stored."""
    levels = torch.tensor(NF4_LEVELS, device=packed.device)
    index = torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten().long()
    return (levels[index].reshape(len(absmax), -1) * absmax[:, None]).reshape(shape)


class NF4Linear(QuantizedLinear):
    """A frozen linear layer stored as NF4; the matmul dequantises the weight to the input's dtype first."""

    def __init__(self, weight: torch.Tensor, blocksize: int = 64):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.blocksize = blocksize
        packed, absmax = nf4_quantize(weight, blocksize)
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", absmax)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        return nf4_dequantize(self.weight, self.absmax, (self.out_features, self.in_features))

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantize().to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocksize={self.blocksize}"
