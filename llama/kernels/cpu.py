"""Our kernels for AVX2 CPUs (``cpu_kernels.cpp``): int4/int8 matmuls, one-token decode attention, causal attention
with its backward and the training loss's softmax cross-entropy, built on first use by ``torch.utils.cpp_extension``
with the system's C++ compiler (~15 s once; cached under ``~/.cache/torch_extensions``). They register
``torch.ops.llama_one.int4_linear``, ``int8_linear``, ``int4_dequantize``, ``decode_attention``,
``causal_attention`` (differentiable) and ``softmax_cross_entropy_``; where they cannot be built (no AVX2, no
compiler) or ``LLAMA_ONE_CPU_KERNELS=0`` is set, ``available()`` is False and PyTorch's kernels serve instead:
packed quantised linears, SDPA, tensor ops for the loss."""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
GROUP_SIZE = 32  # the activations' int16 groups, and the int4 weights' groups (kGroup in the source)
# From this many activation rows on (prefill), dequantising the weight and running sgemm beats the kernels: the
# crossover measured on SmolLM2's int4 shapes with 2 AVX2 threads lies between 16 and 32 rows.
SGEMM_FROM_ROWS = 32


@functools.cache
def available() -> bool:
    if os.environ.get("LLAMA_ONE_CPU_KERNELS") == "0":
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):  # "AVX2" or "AVX512"
        return False
    from torch.utils import cpp_extension

    try:
        if shutil.which("ninja") is None:  # the ninja package's binary, when this environment's bin/ is not on PATH
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        cpp_extension.load(
            name="llama_one_cpu_kernels",
            sources=[str(SOURCE)],
            # -fopenmp for at::parallel_for's pragmas; the OpenMP runtime is the one PyTorch has already loaded
            # CPU_CAPABILITY: ATen's AVX2 vector types (at::vec; the exp is Sleef's, exported by libtorch_cpu since at
            # least 2.7), as PyTorch's own kernels use
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure (no compiler, no ninja) means: use PyTorch's kernels
        warnings.warn(
            f"could not build {SOURCE} ({error}); PyTorch's kernels serve instead (int4/int8 linears, attention, loss)",
            stacklevel=2,
        )
        return False
    # shapes for torch.compile, which treats the kernels as opaque calls
    for name in ("int4_linear", "int8_linear"):
        torch.library.register_fake(f"llama_one::{name}")(lambda x, weight, scales: x.new_empty(x.shape[0], weight.shape[0]))
    torch.library.register_fake("llama_one::decode_attention")(lambda q, k, v, mask: q.new_empty(q.shape))
    torch.library.register_fake("llama_one::int4_dequantize")(
        lambda weight, scales_and_zeros: weight.new_empty(weight.shape[0], weight.shape[1] * 2, dtype=torch.float32)
    )
    torch.library.register_fake("llama_one::softmax_cross_entropy_")(
        lambda logits, targets, scale: logits.new_empty(logits.shape[0])
    )
    torch.library.register_fake("llama_one::causal_attention")(
        lambda q, k, v: (q.new_empty(q.shape), q.new_empty(q.shape[0], q.shape[2], q.shape[1]))
    )
    torch.library.register_fake("llama_one::causal_attention_backward")(
        lambda grad_out, q, k, v, out, lse: (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
    )
    torch.library.register_autograd(
        "llama_one::causal_attention", _causal_attention_backward, setup_context=_save_for_causal_attention_backward
    )
    return True


@torch.compiler.assume_constant_result  # compiled blocks ask it while tracing: answered (and built) eagerly
def causal_attention_available() -> bool:
    """Whether ``causal_attention`` can run: the kernels built and PyTorch has a BLAS (its x86 wheels: MKL)."""
    return available() and torch.ops.llama_one.blas_available()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of float32 CPU tensors q (bs, seqlen, n_heads, head_dim) and k, v (bs, seqlen,
    n_kv_heads, head_dim), differentiable; returns (bs, seqlen, n_heads, head_dim)."""
    return torch.ops.llama_one.causal_attention(q, k, v)[0]


def _save_for_causal_attention_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)  # q, k, v, out, logsumexp
    ctx.mark_non_differentiable(output[1])


def _causal_attention_backward(ctx, grad_out, grad_logsumexp):
    return torch.ops.llama_one.causal_attention_backward(grad_out, *ctx.saved_tensors)
