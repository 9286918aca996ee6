"""The chunked loss on logits far from zero: softmax must subtract each row's maximum, or exp overflows.

CUDA training takes the tensor-op path of ``_softmax_cross_entropy_`` (our C++ kernel serves only fp32 on AVX2
CPUs), so both paths are fed logits in the thousands and compared with PyTorch's ``F.cross_entropy``."""

import pytest
import torch
import torch.nn.functional as F

import llama.loss
from llama.kernels import cpu as cpu_kernels
from llama.loss import linear_cross_entropy


@pytest.mark.parametrize("kernel", [False, True], ids=["tensor_ops", "cpu_kernel"])
@pytest.mark.parametrize("offset", [1000.0, -1000.0])
def test_large_logits_give_pytorchs_loss_and_gradients(monkeypatch, kernel, offset):
    if kernel and not cpu_kernels.available():
        pytest.skip("the kernels need an x86 CPU with AVX2 and a C++ compiler")
    monkeypatch.setattr(cpu_kernels, "available", lambda: kernel)
    monkeypatch.setitem(llama.loss.CHUNK_ELEMENTS, "cpu", 200 * 16)  # chunks of 16 tokens
    generator = torch.Generator().manual_seed(0)
    # A constant column in the hidden states and the weight shifts every logit by `offset` (|logit| ~ 1000:
    # exp overflows fp32 above ~88); the loss itself, a difference of logits, stays ordinary.
    hidden = torch.cat([torch.randn(40, 15, generator=generator), torch.ones(40, 1)], dim=1).requires_grad_()
    weight = torch.cat([torch.randn(200, 15, generator=generator), torch.full((200, 1), offset)], dim=1)
    weight.requires_grad_()
    targets = torch.randint(200, (40,), generator=generator)

    ours = linear_cross_entropy(hidden, weight, targets)
    ours.backward()
    ours_grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.T, targets)
    expected.backward()
    assert torch.isfinite(ours)
    logit_rounding = 1e-4  # fp32 logits near 1000 are 6e-5 apart: two matmul orders may differ by that much
    torch.testing.assert_close(ours, expected, rtol=0, atol=logit_rounding)
    torch.testing.assert_close(ours_grads, (hidden.grad, weight.grad))

    per_token = linear_cross_entropy(hidden.detach(), weight.detach(), targets, reduction="none")
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="none").detach()
    torch.testing.assert_close(per_token, expected, rtol=0, atol=logit_rounding)
