"""Our kernels for AVX2 CPUs (``cpu_kernels.cpp``): int4/int8 matmuls and one-token decode attention, built on first
use by ``torch.utils.cpp_extension`` with the system's C++ compiler (~10 s once; cached under
``~/.cache/torch_extensions``). They register ``torch.ops.llama_one.int4_linear``, ``int8_linear``,
``int4_dequantize`` and ``decode_attention``; where they cannot be built (no AVX2, no compiler) or
``LLAMA_ONE_CPU_KERNELS=0`` is set, ``available()`` is False: the quantised linears use PyTorch's packed kernels
instead, and decode attention SDPA."""

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
            f"could not build {SOURCE} ({error}); int4/int8 linears use PyTorch's kernels, decode attention SDPA",
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
    return True
