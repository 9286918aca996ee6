"""The LLaMA decoder: RMSNorm, rotary position embedding, grouped-query attention, SwiGLU.

One forward serves both jobs:
  * training: ``model(tokens)`` runs a full causal sequence, no cache (``input_pos`` may restart the rotary
    positions, and ``mask`` replace the causal one, for packed samples);
  * inference: after ``model.setup_caches(...)``, ``model(tokens, input_pos=..., mask=...)`` writes each row's new
    keys/values into its own row of a static KV cache (a sequence slot) at that row's positions, and attends over
    the slot. Rows at different positions run in one step.

Parallelism, compilation and activation checkpointing are applied from outside (see ``llama.training``); the
modules here are plain ``nn.Linear`` / ``nn.Embedding``.

Rotary layout: q/k weights are kept in the Hugging Face "rotate-half" layout, where the two halves of each head
(x[i], x[i + d/2]) form the rotated pairs. Meta's checkpoints pair adjacent dims (x[2i], x[2i+1]) and GGUF keeps
Meta's order, so their wq/wk rows are permuted when read and written (``llama.checkpoint``). We pick the HF
layout because it is the format we write and the most common one we read (no permutation on that path), and
because rotate-half works on real tensors only, which keeps bf16 and ``torch.compile`` simple.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llama.kernels import cpu as cpu_kernels
from llama.loss import linear_cross_entropy

try:  # optional, CUDA only: pip install flash-attn
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@dataclass
class ModelArgs:
    dim: int = 4096  # width of the residual stream
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: same as n_heads
    vocab_size: int = -1  # rows of the embedding and output projection
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this (Meta's rule)
    ffn_dim_multiplier: float | None = None  # scales Meta's FFN width before rounding (Llama 3: 1.3)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base (Llama 3: 500000)
    rope_scaling: dict | None = None  # {"rope_type": linear, dynamic, llama3 or yarn, ...} (transformers' keys)
    max_seq_len: int = 2048  # context length: the rotary tables and the longest KV cache
    tie_embeddings: bool = False  # output projection shares the input embedding matrix
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int | None = None  # FFN width; None: derived from dim, ffn_dim_multiplier and multiple_of

    def __post_init__(self):
        self.check()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        check_rope_scaling(self.rope_scaling)

    def check(self) -> None:
        """Refuse sizes no model can have (the message names the field), before anything is derived from them."""
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len", *OPTIONAL_SIZES):
            value = getattr(self, name)
            if not (value is None and name in OPTIONAL_SIZES) and not (_is_int(value) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.vocab_size):  # -1 until the tokenizer gives it (Meta's params.json)
            raise ValueError(f"vocab_size must be an integer, got {self.vocab_size!r}")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if not (value is None and name == "ffn_dim_multiplier") and not (_is_number(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


OPTIONAL_SIZES = ("n_kv_heads", "head_dim", "hidden_dim")  # None: derived in __post_init__


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite real number (NaN and infinities are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as transformers does, so bf16 logits match.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


# The rope scaling types of ModelArgs.rope_scaling (transformers' rope_type names and keys): required keys, optional.
ROPE_SCALING_KEYS = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor", "original_max_position_embeddings"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": (
        {"factor", "original_max_position_embeddings"},
        {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    ),
}


def check_rope_scaling(scaling: dict | None) -> None:
    """Raise ValueError unless ``scaling`` is None or a ``{"rope_type": ..., ...}`` of a known type and its keys."""
    if scaling is None:
        return
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling needs a rope_type among {', '.join(ROPE_SCALING_KEYS)}, got {scaling!r}")
    required, optional = ROPE_SCALING_KEYS[kind]
    keys = scaling.keys() - {"rope_type"}
    if required - keys or keys - required - optional:
        raise ValueError(
            f"rope_scaling of type {kind} takes {sorted(required)} (and optionally {sorted(optional)}), "
            f"got {sorted(keys)}"
        )


def rope_frequencies(args: ModelArgs, seq_len: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32, scaled as ``args.rope_scaling`` says; the formulas are
    transformers' (``modeling_rope_utils``). Dynamic NTK scaling depends on the sequence length: with ``seq_len``
    (n,), one row of frequencies per length, (n, head_dim // 2)."""
    d = args.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    s = args.rope_scaling or {}
    kind = s.get("rope_type")
    if kind == "dynamic" and seq_len is not None:
        # Past the original context the base grows with the length, so the longest wavelength still spans it.
        original, factor = s["original_max_position_embeddings"], s["factor"]
        seq_len = seq_len.clamp(min=original)
        base = args.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (d / (d - 2))
        return 1.0 / (base[:, None] ** exponents.to(base.device))
    inv_freq = 1.0 / (args.rope_theta**exponents)
    if kind == "linear":  # position interpolation: every position divided by the factor
        return inv_freq / s["factor"]
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, s)
    if kind == "yarn":
        return _yarn_frequencies(args, s)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_frequencies(args: ModelArgs, s: dict) -> torch.Tensor:
    """YaRN: dimensions that turn fewer than ``beta_slow`` times over the original context are interpolated
    (divided by the factor), those turning more than ``beta_fast`` times kept, a linear ramp between."""
    d, base, factor = args.head_dim, args.rope_theta, s["factor"]
    original = s["original_max_position_embeddings"]

    def dimension_of(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_of(s.get("beta_fast") or 32), dimension_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    return (1 / (factor * pos_freqs)) * ramp + (1 / pos_freqs) * (1 - ramp)


def rope_attention_scaling(args: ModelArgs) -> float:
    """What cos and sin are multiplied by: YaRN's temperature, sqrt(1/t) = 0.1 ln(factor) + 1 by default; 1 else."""
    s = args.rope_scaling or {}
    if s.get("rope_type") != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return s["attention_factor"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(s["factor"], s["mscale"]) / mscale(s["factor"], s["mscale_all_dim"])
    return mscale(s["factor"])


def rope_cos_sin(args: ModelArgs, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, head_dim), fp32, in rotate-half layout."""
    inv_freq = rope_frequencies(args).to(device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    scale = rope_attention_scaling(args)
    return angles.cos() * scale, angles.sin() * scale


def dynamic_rope_cos_sin(args: ModelArgs, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (bs, seqlen, head_dim) of dynamic NTK scaling at ``input_pos`` (bs, seqlen): each row's
    frequencies follow its own length, the last position + 1, as transformers' do for a batch of one (a right-padded
    row counts its padding). Keys already in a KV cache keep the rotation they were written with, as in
    transformers."""
    inv_freq = rope_frequencies(args, input_pos.max(dim=-1).values + 1)  # (bs, head_dim // 2)
    angles = input_pos[..., None].float() * inv_freq[:, None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (bs, seqlen, n_heads, head_dim); cos/sin: (bs, seqlen, 1, head_dim), already in x's dtype
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_attention_kernel(q: torch.Tensor):
    """The kernel for the cache-free causal pass (training, evaluation) that takes (bs, seqlen, heads, head_dim) and
    GQA as they are, or None for SDPA: flash-attn on CUDA in half precision when it is installed; ours on an fp32
    CPU model (half SDPA's time there, forward and backward). SDPA serves everything else, including the
    masked, left-padded cache of generation."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return partial(flash_attn_func, causal=True)
    if q.device.type == "cpu" and q.dtype == torch.float32 and cpu_kernels.causal_attention_available():
        return cpu_kernels.causal_attention
    return None


def causal_mask(input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(bs, 1, seqlen, kv_len) bool: a query at position p of a row attends to the row's cache slots 0..p."""
    slots = torch.arange(kv_len, device=input_pos.device)
    return (slots <= input_pos[..., None])[:, None]


class KVCache(nn.Module):
    """Static key/value cache for one layer. Row r is sequence slot r; ``update`` writes each row at its own
    positions and returns the rows' first ``kv_len`` slots."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(batch_size, device=device)[:, None], persistent=False)
        # One-token steps over an fp32 CPU cache attend through our kernel: SDPA's spends ~25 us a call setting up
        # (~10 % of a SmolLM2 decode step on 2 cores), ours ~5 (llama/kernels/cpu_kernels.cpp).
        self.decode_kernel = (
            self.k.device.type == "cpu" and dtype == torch.float32 and head_dim in (64, 128) and cpu_kernels.available()
        )

    def update(self, input_pos, k, v, kv_len: int, cache_rows=None):
        # input_pos: (bs, seqlen) slots; k, v: (bs, seqlen, n_kv_heads, head_dim); cache_rows: (bs,) or None for
        # rows 0..bs-1. Returns k, v: (bs, n_kv_heads, kv_len, head_dim)
        bs = k.shape[0]
        # written into the buffers themselves, not through a view of their first rows: Inductor scatters into a
        # buffer in place, but through a view it copied the rows' whole cache twice a layer (~2 ms a layer, a
        # compiled SmolLM2 step 10x slower, with 640 slots)
        rows = self.rows[:bs] if cache_rows is None else cache_rows[:, None]
        self.k[rows, :, input_pos] = k
        self.v[rows, :, input_pos] = v
        if cache_rows is None:  # views of the first bs rows: no copy
            return self.k[:bs, :, :kv_len], self.v[:bs, :, :kv_len]
        return self.k[cache_rows, :, :kv_len], self.v[cache_rows, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos=None, mask=None, cache_rows=None):
        bs, seqlen, _ = x.shape
        q = self.wq(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_heads, head_dim)
        k = self.wk(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_kv_heads, head_dim)
        v = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is None:  # cache-free: the sequence attends to itself, causally unless a mask says otherwise
            if mask is None and (attend := causal_attention_kernel(q)) is not None:
                out = attend(q, k, v)  # (bs, seqlen, n_heads, head_dim)
                return self.wo(out.reshape(bs, seqlen, -1))
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (bs, heads, seqlen, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))

        kv_len = mask.shape[-1]  # attend over the first kv_len slots of each row only
        k, v = self.kv_cache.update(input_pos, k, v, kv_len, cache_rows)  # (bs, n_kv_heads, kv_len, head_dim)
        q = q.transpose(1, 2)  # (bs, n_heads, seqlen, head_dim)
        if (
            seqlen == 1 and self.kv_cache.decode_kernel and not torch.is_grad_enabled()  # the kernel has no backward
            and q.device.type == "cpu" and q.dtype == torch.float32 and mask.dtype == torch.bool
        ):
            out = torch.ops.llama_one.decode_attention(q, k, v, mask.expand(bs, 1, 1, kv_len))
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None, mask=None, cache_rows=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, cache_rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(f"vocab_size must be set (got {args.vocab_size}); take it from the tokenizer")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied models reuse tok_embeddings.weight in forward rather than sharing a Parameter, so the tie survives
        # meta-device construction, to_empty() and FSDP sharding.
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)compute the rotary tables; call after materialising a meta-device model with ``to_empty``."""
        device = device or self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = rope_cos_sin(self.args, self.args.max_seq_len, device)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """From-scratch init (GPT-2 / nanoGPT style): truncated normal(0, std) for embeddings and linears, the
        residual projections (wo, w2) scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not
        grow with depth; norm weights one. Also recomputes the rotary tables."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        residual_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = residual_std if name.endswith(("wo.weight", "w2.weight")) else std
                nn.init.trunc_normal_(p, std=s, a=-3 * s, b=3 * s, generator=gen)
        self.init_rope()

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype=None, device=None):
        """Allocate a static KV cache of ``max_seq_len`` slots per layer for up to ``max_batch_size`` rows."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of {self.args.max_seq_len}")
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            # the attention's own head count: under tensor parallelism it holds only this rank's heads
            layer.attention.kv_cache = KVCache(
                max_batch_size, layer.attention.n_kv_heads, max_seq_len, self.args.head_dim,
                dtype or weight.dtype, device or weight.device,
            )

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache_rows: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (bs, seqlen, vocab_size) in the model's dtype; with ``logits_at`` (bs,) one position per row, or
        (bs, k) k per row, (bs, 1 or k, vocab_size) of those positions only: a prefill skips the output projection
        of the positions it does not sample from, an evaluation of the positions it does not score. With ``targets``
        (bs, seqlen) next-token ids (``llama.loss.IGNORE_INDEX`` where no loss is wanted): their cross-entropy in
        fp32 instead, ``reduction`` "mean" over the counted tokens, "sum", or "none" (bs, seqlen), computed chunk
        by chunk without ever holding all the logits (``llama.loss``).

        tokens:     (bs, seqlen) token ids.
        input_pos:  (bs, seqlen) or (seqlen,) positions of the tokens. With a KV cache (``setup_caches``) they are
                    also the cache slots each row writes; without a cache or when None, the pass is cache-free and
                    they only place the rotary embedding (default 0..seqlen-1).
        mask:       with a cache: (bs or 1, 1, seqlen, kv_len) bool, True where a query may attend to a slot of its
                    row; its last dimension says how many slots are attended. Default: each query attends to the
                    slots up to its own position. Cache-free: (bs or 1, 1, seqlen, seqlen) bool, default causal.
        cache_rows: (bs,) the cache rows (sequence slots) the batch's rows use; default rows 0..bs-1.
        """
        bs, seqlen = tokens.shape
        cached = input_pos is not None and self.layers[0].attention.kv_cache is not None
        if input_pos is None:
            input_pos = torch.arange(seqlen, device=tokens.device)
        input_pos = input_pos.expand(bs, seqlen)
        if cached and mask is None:
            mask = causal_mask(input_pos, int(input_pos.max()) + 1)

        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        if (self.args.rope_scaling or {}).get("rope_type") == "dynamic":
            cos, sin = dynamic_rope_cos_sin(self.args, input_pos)
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        cos, sin = cos.unsqueeze(2).to(h.dtype), sin.unsqueeze(2).to(h.dtype)  # (bs, seqlen, 1, head_dim)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos if cached else None, mask, cache_rows)
        if logits_at is not None:
            h = h[torch.arange(bs, device=h.device)[:, None], logits_at.view(bs, -1)]  # (bs, 1 or k, dim)
        h = self.norm(h)
        if targets is not None:
            if self.output is None:
                weight = self.tok_embeddings.weight
            else:  # an int8 output projection (llama.transforms.quantize) enters the chunked loss dequantised
                weight = self.output.weight if isinstance(self.output, nn.Linear) else self.output.dequantize()
            return linear_cross_entropy(h, weight, targets, reduction)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)
