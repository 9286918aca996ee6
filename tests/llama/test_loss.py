import pytest
import torch
import torch.nn.functional as F

import llama.loss
from llama.kernels import cpu as cpu_kernels
from llama.loss import linear_cross_entropy
from llama.model import ModelArgs, Transformer


def unfused(hidden, weight, targets):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.reshape(-1))


@pytest.mark.parametrize("chunk_elements", [1 << 30, 300 * 50])  # one chunk; uneven chunks of 50 tokens
def test_loss_and_gradients_equal_the_unfused_cross_entropy(monkeypatch, chunk_elements):
    monkeypatch.setitem(llama.loss.CHUNK_ELEMENTS, "cpu", chunk_elements)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 70, 32, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 32, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(300, (3, 70), generator=generator)
    (2 * linear_cross_entropy(hidden, weight, targets)).backward()  # the upstream gradient is applied
    ours = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    (2 * unfused(hidden, weight, targets)).backward()
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), unfused(hidden, weight, targets))
    torch.testing.assert_close(ours[0], hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", [True, False])  # our CPU softmax cross-entropy, or PyTorch's tensor ops
def test_fp32_loss_and_gradients_equal_the_unfused_cross_entropy(monkeypatch, kernel):
    if kernel and not cpu_kernels.available():
        pytest.skip("the kernels need an x86 CPU with AVX2 and a C++ compiler")
    monkeypatch.setattr(cpu_kernels, "available", lambda: kernel)
    monkeypatch.setitem(llama.loss.CHUNK_ELEMENTS, "cpu", 300 * 50)  # chunks of 50 tokens
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 32, generator=generator, requires_grad=True)
    for tokens in (30, 140):  # the second call needs a larger buffer for its chunks' logits than the first
        hidden = torch.randn(tokens, 32, generator=generator, requires_grad=True)
        targets = torch.randint(300, (tokens,), generator=generator)
        ours = linear_cross_entropy(hidden, weight, targets)
        ours.backward()
        ours_grads = hidden.grad, weight.grad
        hidden.grad = weight.grad = None
        expected = unfused(hidden, weight, targets)
        expected.backward()
        torch.testing.assert_close(ours, expected)
        torch.testing.assert_close(ours_grads, (hidden.grad, weight.grad))
        weight.grad = None


def test_a_loss_under_inference_mode_leaves_later_training_losses_working():
    weight = torch.randn(100, 8, requires_grad=True)
    hidden, targets = torch.randn(20, 8, requires_grad=True), torch.randint(100, (20,))
    with torch.inference_mode():
        evaluated = linear_cross_entropy(hidden, weight, targets)
    trained = linear_cross_entropy(hidden, weight, targets)
    trained.backward()  # the CPU logits buffer made under inference mode is not the one written here
    torch.testing.assert_close(trained.detach(), evaluated)
    assert weight.grad is not None


def test_bf16_stays_within_bf16_rounding_of_the_fp32_loss():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(256, 64, generator=generator), torch.randn(1000, 64, generator=generator) / 8
    targets = torch.randint(1000, (256,), generator=generator)
    reference = unfused(hidden, weight, targets)
    assert abs(linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets) - reference) < 2e-2


def test_autocast_chunks_take_the_same_bf16_logits_as_the_unfused_loss(monkeypatch):
    monkeypatch.setitem(llama.loss.CHUNK_ELEMENTS, "cpu", 300 * 50)  # chunks of 50 tokens: later ones after the first
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 70, 32, generator=generator, requires_grad=True)
    weight = torch.randn(300, 32, generator=generator, requires_grad=True)
    targets = torch.randint(300, (2, 70), generator=generator)
    with torch.autocast("cpu", torch.bfloat16):
        ours, expected = linear_cross_entropy(hidden, weight, targets), unfused(hidden, weight, targets)
    # bf16 logits in every chunk, as autocast gives the unfused loss (fp32 ones would be off by ~1e-3 here)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_second_backward_through_the_loss_is_refused():
    hidden = torch.randn(5, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(11, 8), torch.randint(11, (5,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_tokens_is_refused():
    with pytest.raises(ValueError, match="no tokens"):
        linear_cross_entropy(torch.zeros(2, 0, 8), torch.zeros(16, 8), torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_model_with_targets_trains_like_logits_then_cross_entropy(tie_embeddings):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=200, multiple_of=32, max_seq_len=32,
                     tie_embeddings=tie_embeddings)
    model = Transformer(args)
    model.init_weights(seed=0)
    tokens = torch.randint(200, (2, 17), generator=torch.Generator().manual_seed(1))
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    fused = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------- ignored targets and reductions
#
# The reference is F.cross_entropy on the whole logits with ignore_index=-100. 3 x 70 tokens of which about a third
# are ignored, in chunks of 50 counted tokens (vocabulary 300): several chunks, the last one short.


def masked_case(seed=0, ignored=0.3):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 70, 32, generator=generator, requires_grad=True)
    weight = torch.randn(300, 32, generator=generator, requires_grad=True)
    targets = torch.randint(300, (3, 70), generator=generator)
    targets[torch.rand(3, 70, generator=generator) < ignored] = llama.loss.IGNORE_INDEX
    return hidden, weight, targets


def reference(hidden, weight, targets, reduction):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=llama.loss.IGNORE_INDEX, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def loss_and_grads(loss_fn, hidden, weight, targets, reduction, grad_output=None):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, targets, reduction)
    loss.backward(grad_output)
    return loss.detach(), hidden.grad, weight.grad


@pytest.fixture(params=[True, False], ids=["our-kernel", "tensor-ops"])
def kernels_and_chunks(request, monkeypatch):
    """Our CPU softmax cross-entropy or PyTorch's tensor ops; chunks of 50 tokens."""
    if request.param and not cpu_kernels.available():
        pytest.skip("the kernels need an x86 CPU with AVX2 and a C++ compiler")
    monkeypatch.setattr(cpu_kernels, "available", lambda: request.param)
    monkeypatch.setitem(llama.loss.CHUNK_ELEMENTS, "cpu", 300 * 50)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_masked_loss_and_gradients_equal_cross_entropy_with_ignore_index(kernels_and_chunks, reduction):
    hidden, weight, targets = masked_case()
    assert (targets == llama.loss.IGNORE_INDEX).sum() > 40 and (targets != llama.loss.IGNORE_INDEX).sum() > 100
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, reduction)
    expected = loss_and_grads(reference, hidden, weight, targets, reduction)
    torch.testing.assert_close(ours, expected)
    ignored = targets == llama.loss.IGNORE_INDEX
    assert not ours[1][ignored].any()  # ignored positions get no gradient at all


def test_per_token_losses_and_their_backward_equal_the_unreduced_cross_entropy(kernels_and_chunks):
    hidden, weight, targets = masked_case()
    # each token's loss weighs its own gradient: a random weight per token, as a loss built on them would give
    grad_output = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, "none", grad_output)
    expected = loss_and_grads(reference, hidden, weight, targets, "none", grad_output)
    assert ours[0].shape == targets.shape
    assert not ours[0][targets == llama.loss.IGNORE_INDEX].any()  # 0 where ignored
    torch.testing.assert_close(ours, expected)


def test_per_token_losses_sum_and_average_to_the_reduced_losses():
    hidden, weight, targets = masked_case(seed=2)
    with torch.no_grad():
        per_token = linear_cross_entropy(hidden, weight, targets, "none")
        counted = (targets != llama.loss.IGNORE_INDEX).sum()
        torch.testing.assert_close(per_token.sum(), linear_cross_entropy(hidden, weight, targets, "sum"))
        torch.testing.assert_close(per_token.sum() / counted, linear_cross_entropy(hidden, weight, targets, "mean"))


def test_all_targets_ignored_mean_is_refused_sum_is_zero_with_zero_gradients(kernels_and_chunks):
    hidden, weight, _ = masked_case()
    targets = torch.full((3, 70), llama.loss.IGNORE_INDEX)
    with pytest.raises(ValueError, match="no tokens"):
        linear_cross_entropy(hidden, weight, targets, "mean")
    loss, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, targets, "sum")
    assert loss.item() == 0.0
    assert grad_hidden.shape == hidden.shape and not grad_hidden.any()
    assert grad_weight.shape == weight.shape and not grad_weight.any()
    losses, grad_hidden, grad_weight = loss_and_grads(
        linear_cross_entropy, hidden, weight, targets, "none", torch.ones(3, 70)
    )
    assert losses.shape == (3, 70) and not losses.any() and not grad_hidden.any() and not grad_weight.any()


def test_an_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(torch.zeros(2, 8), torch.zeros(16, 8), torch.zeros(2, dtype=torch.long), "max")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_frozen_weight_gets_no_gradient_and_the_hidden_states_theirs(kernels_and_chunks, reduction):
    """LoRA freezes the output projection: its gradient (a vocabulary-sized matmul) is not computed at all."""
    hidden, weight, targets = masked_case()
    weight.requires_grad_(False)
    grad_output = torch.randn(targets.shape) if reduction == "none" else None
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, reduction, grad_output)
    expected = loss_and_grads(reference, hidden, weight, targets, reduction, grad_output)
    assert ours[2] is None
    torch.testing.assert_close(ours[:2], expected[:2])
