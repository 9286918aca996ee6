"""Cross-entropy of the output projection computed in chunks of tokens, so the (tokens, vocab_size) logits never
exist whole.

Unfused, N tokens make N × vocab fp32 logits (4.2 GB for 8192 tokens of Llama 3's 128k vocabulary), then as much
again for the log-probs and for their gradient. Here each chunk's logits become its loss and, in place, its
gradient (softmax minus one-hot), which is multiplied straight into the gradients of the hidden states and of the
weight; backward only scales those. The matmuls are the unfused loss's three (logits, and the two gradients).
"""

from __future__ import annotations

import torch

# Logit elements per chunk: enough rows (hundreds at a 32k vocabulary) for the output projection's matmuls to run
# near full speed (on CPU, 64 MB of fp32 made a training step ~6 % faster than 16 MB), while the logits never all
# exist at once.
CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}


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
        reusable = None  # the first chunk's logits, when later chunks can be written into their memory
        for start in range(0, n, chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            if reusable is None:
                product = h @ weight.T
                logits = product.to(loss_dtype)  # (chunk, vocab_size)
                # Where the product already is the fp32 logits (not in bf16, nor under autocast, where the fp32
                # copy is a new tensor anyway), the later chunks overwrite it: on CPU a fresh 64 MB chunk costs
                # ~20 ms of page faults, ~2 % of bench.train's step.
                if product.dtype == hidden.dtype == loss_dtype:
                    reusable = logits
            else:
                logits = torch.mm(h, weight.T, out=reusable[: len(h)])
            target_logits = logits.gather(1, t[:, None])  # (chunk, 1)
            top = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(top).exp_()  # in place of the logits
            total = exp.sum(dim=-1, keepdim=True)
            loss += (total.log() + top - target_logits).sum()  # logsumexp - target logit
            if want_grads:
                grad = exp.div_(total * n)  # softmax, of the mean over all n tokens
                grad[torch.arange(len(t), device=t.device), t] -= 1 / n
                grad = grad.to(hidden.dtype)
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
