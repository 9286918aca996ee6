import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# A fresh process: whether the kernels are available is decided once per process.
PROBE = """
import torch
from llama.kernels import cpu as cpu_kernels
from llama.transforms.quantize import Int4Linear
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
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("the kernels need an x86 CPU with AVX2")
    result = probe(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "(2,", "48)"]


@pytest.fixture
def built():
    from llama.kernels import cpu as cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the kernels need an x86 CPU with AVX2 and a C++ compiler")


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
def test_decode_attention_equals_sdpa(built, bs, heads, kv_heads, length, head_dim, q_scale, mask_rows):
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


def test_decode_attention_of_a_row_with_no_allowed_slot_is_zero(built):
    q, k, v = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1] = False
    out = torch.ops.llama_one.decode_attention(q, k, v, mask)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0


@pytest.mark.parametrize(
    "bs, seq, heads, kv_heads, head_dim, q_scale",
    [
        (4, 256, 6, 2, 64, 1),  # a bench.train layer: eight blocks of 32 positions
        (1, 70, 4, 4, 32, 1),  # MHA; a last block of 6
        (2, 130, 8, 1, 128, 1),  # MQA
        (2, 1, 2, 1, 16, 1),  # one position
        (1, 65, 4, 2, 8, 30),  # scores up to ~100: exp overflows unless each row's max is taken out first
    ],
)
def test_causal_attention_and_its_gradients_equal_sdpas(built, bs, seq, heads, kv_heads, head_dim, q_scale):
    from llama.kernels import cpu as cpu_kernels

    gen = torch.Generator().manual_seed(0)
    # q, k and v as slices of one (bs, seq, heads + 2 kv_heads, head_dim) projection: strided, not contiguous
    qkv = torch.randn(bs, seq, heads + 2 * kv_heads, head_dim, generator=gen, dtype=torch.float64)
    qkv[:, :, :heads] *= q_scale
    grad = torch.randn(bs, seq, heads, head_dim, generator=gen, dtype=torch.float64)
    split = [heads, kv_heads, kv_heads]

    reference = qkv.clone().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in reference.split(split, dim=2))  # SDPA's (bs, heads, seq, head_dim)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    expected.backward(grad)

    ours_qkv = qkv.float().requires_grad_()
    ours = cpu_kernels.causal_attention(*ours_qkv.split(split, dim=2))
    ours.backward(grad.float())
    torch.testing.assert_close(ours, expected.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_qkv.grad, reference.grad.float(), rtol=1e-4, atol=1e-5 * q_scale)


def test_causal_attention_takes_keys_whose_positions_share_memory(built):
    from llama.kernels import cpu as cpu_kernels

    q, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 1, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 40, 1, 16)  # every position the same key: stride 0, rows overlap
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(cpu_kernels.causal_attention(q, k, v), expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_causal_attention_is_an_op_that_autograd_and_compile_can_take(built):
    q, k, v = (torch.randn(2, 40, heads, 16, requires_grad=True) for heads in (4, 2, 2))
    torch.library.opcheck(torch.ops.llama_one.causal_attention.default, (q, k, v))


@pytest.mark.parametrize("vocab, scale", [(1000, 1), (37, 100)])  # 37: no multiple of 8; logits in the hundreds
def test_softmax_cross_entropy_gives_the_losses_and_writes_the_gradient_over_the_logits(built, vocab, scale):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, vocab, generator=gen, dtype=torch.float64) * scale
    targets = torch.randint(vocab, (50,), generator=gen)
    expected_grad = (logits.softmax(-1) - F.one_hot(targets, vocab)) * 0.25
    ours = logits.float()
    losses = torch.ops.llama_one.softmax_cross_entropy_(ours, targets, 0.25)
    torch.testing.assert_close(losses, F.cross_entropy(logits, targets, reduction="none").float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, expected_grad.float(), rtol=1e-4, atol=1e-7)
    torch.library.opcheck(torch.ops.llama_one.softmax_cross_entropy_.default, (logits.float(), targets, 0.25))


def test_softmax_cross_entropy_refuses_a_target_outside_the_vocabulary(built):
    with pytest.raises(RuntimeError, match="target 12 is not a token id of a 10-token vocabulary"):
        torch.ops.llama_one.softmax_cross_entropy_(torch.zeros(3, 10), torch.tensor([1, 12, 0]), 1.0)
