"""Cross-entropy of the output projection computed in chunks of tokens, so the (tokens, vocab_size) logits never
exist whole.

Unfused, N tokens make N × vocab fp32 logits (4.2 GB for 8192 tokens of Llama 3's 128k vocabulary), then as much
again for the log-probs and for their gradient. Here each chunk's logits become its loss and, in place, its
gradient (softmax minus one-hot), which is multiplied straight into the gradients of the hidden states and of the
weight; backward only scales those. The matmuls are the unfused loss's three (logits, and the two gradients).
"""

from __future__ import annotations

import threading

import torch

from llama import cpu_kernels

# Logit elements per chunk: enough rows (hundreds at a 32k vocabulary) for the output projection's matmuls to run
# near full speed, while the logits never all exist at once. On CPU, bench.train's step took ~6 % longer with 16 MB
# of fp32 than with 64 MB, and ~1 % longer with 64 MB than with 128 MB (its 1024 tokens in one chunk).
CHUNK_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}

_cpu_workspace = threading.local()


def _logits_buffer(rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Memory for one chunk's logits, which every chunk overwrites. On CPU it is kept from call to call (up to
    128 MB of fp32 per thread): a fresh one is mapped anew and page-faulted in on every training step (~13 ms of
    bench.train's ~1 s step); CUDA's caching allocator already reuses memory."""
    if device.type != "cpu":
        return torch.empty(rows, vocab_size, dtype=dtype, device=device)
    buffers = _cpu_workspace.__dict__.setdefault("buffers", {})
    key = dtype, torch.is_inference_mode_enabled()  # an inference tensor cannot be written outside inference mode
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < rows * vocab_size:
        buffer = buffers[key] = torch.empty(rows * vocab_size, dtype=dtype)
    return buffer[: rows * vocab_size].view(rows, vocab_size)


def _softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """Each row's logsumexp - logit[target]; overwrites the logits with their gradient, (softmax - one-hot) * scale."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and cpu_kernels.available():
        # one pass over each row while it sits in cache, instead of five over the whole chunk: ~3x faster
        return torch.ops.llama_one.softmax_cross_entropy_(logits, targets, scale)
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(top).exp_()
    total = exp.sum(dim=-1, keepdim=True)
    exp.div_(total / scale)
    exp[torch.arange(len(targets), device=targets.device), targets] -= scale
    return (total.log() + top).squeeze(1) - target_logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int):
        # hidden (n, dim), weight (vocab_size, dim), targets (n,)
        n = hidden.shape[0]
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits are taken in fp32
        loss = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        grad_weight = torch.empty_like(weight) if want_grads else None
        buffer = _logits_buffer(min(n, chunk_tokens), weight.shape[0], loss_dtype, hidden.device)
        # the product is the logits themselves unless it is in half precision (under autocast it is, whatever the
        # inputs are): then it is taken into the fp32 buffer
        autocast = torch.is_autocast_enabled(hidden.device.type)
        product_is_logits = hidden.dtype == weight.dtype == loss_dtype and not autocast
        for start in range(0, n, chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = buffer[: len(h)]  # (chunk, vocab_size)
            if product_is_logits:
                torch.mm(h, weight.T, out=logits)
            else:
                logits.copy_(h @ weight.T)
            loss += _softmax_cross_entropy_(logits, t, 1 / n).sum()  # 1 / n: the gradient of the mean over n tokens
            if want_grads:
                grad = logits.to(hidden.dtype)
                torch.matmul(grad, weight, out=grad_hidden[start : start + chunk_tokens])
                grad_weight.addmm_(grad.T, h, beta=float(start > 0))  # the first chunk overwrites the empty memory
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place: no second (vocab_size, dim) weight gradient; a second backward through the same graph
        # (retain_graph) is refused by autograd's check of the modified saved tensors
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, in fp32 (fp64 for fp64 inputs).

    hidden: (..., dim); weight: (vocab_size, dim); targets: (...) token ids."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if hidden.shape[0] == 0:
        raise ValueError("linear_cross_entropy: no tokens (the mean over none is undefined)")
    chunk_tokens = max(1, CHUNK_ELEMENTS.get(hidden.device.type, 1 << 28) // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
