import os
import subprocess
import sys

import pytest

# A fresh process: whether the kernels are available is decided once per process.
PROBE = """
import torch
from llama import cpu_kernels
from llama.quantize import Int4Linear
linear = Int4Linear(torch.randn(48, 64))
print(cpu_kernels.available(), linear.ours, tuple(linear(torch.randn(2, 64)).shape))
"""


def probe(tmp_path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "build"), **env}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)


def test_a_failed_build_falls_back_to_pytorchs_kernels_with_a_warning(tmp_path):
    result = probe(tmp_path, CXX="/bin/false")  # a compiler that always fails
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "(2,", "48)"]
    assert "could not build" in result.stderr and "cpu_kernels.cpp" in result.stderr


def test_kernels_can_be_switched_off(tmp_path):
    result = probe(tmp_path, LLAMA_ONE_CPU_KERNELS="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "(2,", "48)"]
    assert not (tmp_path / "build").exists()  # nothing was built


def test_the_kernels_build_from_source(tmp_path):
    import torch

    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("the kernels need an x86 CPU with AVX2")
    result = probe(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "(2,", "48)"]


@pytest.mark.parametrize(
    "bs, heads, kv_heads, length, head_dim, q_scale, mask_rows",
    [
        (1, 9, 3, 100, 64, 1, 1),
        (3, 8, 8, 37, 128, 1, 3),
        (2, 4, 1, 5, 64, 1, 2),
        (2, 6, 2, 300, 128, 1, 2),
        (2, 4, 2, 19, 64, 100, 2),  # scores in the hundreds: exp overflows unless the row's max is taken out first
        (3, 4, 2, 50, 64, 1, 1),  # one mask row for the whole batch (expanded, batch stride 0)
    ],
)
def test_decode_attention_equals_sdpa(bs, heads, kv_heads, length, head_dim, q_scale, mask_rows):
    import torch
    import torch.nn.functional as F

    from llama import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the kernels need an x86 CPU with AVX2 and a C++ compiler")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(bs, heads, 1, head_dim, generator=gen) * q_scale
    cache = torch.randn(2, bs, kv_heads, length + 7, head_dim, generator=gen)
    k, v = cache[0, :, :, :length], cache[1, :, :, :length]  # the first slots of a longer cache, as decode reads it
    mask = torch.rand(mask_rows, 1, 1, length, generator=gen) > 0.4
    mask[..., 0] = True  # every row attends to some slot...
    mask[..., -3:] = False  # ...but not to the last ones (a static cache's future slots)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ours = torch.ops.llama_one.decode_attention(q, k, v, mask.expand(bs, 1, 1, length))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_of_a_row_with_no_allowed_slot_is_zero():
    import torch

    from llama import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the kernels need an x86 CPU with AVX2 and a C++ compiler")
    q, k, v = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1] = False
    out = torch.ops.llama_one.decode_attention(q, k, v, mask)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0
