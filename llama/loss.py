"""Cross-entropy of the output projection computed in chunks of tokens, so the (tokens, vocab_size) logits never
exist whole.

Unfused, N tokens make N × vocab fp32 logits (4.2 GB for 8192 tokens of Llama 3's 128k vocabulary), then as much
again for the log-probs and for their gradient. Here each chunk's logits become its loss and, in place, its
gradient (softmax minus one-hot), which is multiplied straight into the gradients of the hidden states and of the
weight; backward only scales those. The matmuls are the unfused loss's three (logits, and the two gradients).

Targets equal to ``IGNORE_INDEX`` (-100, as ``F.cross_entropy``'s default) count for nothing: their rows are left
out before the output projection. Per-token losses (``reduction="none"``) are for evaluation and for losses built
on them (DPO): their backward takes each token's own weight, so it recomputes each chunk's logits instead.
"""

from __future__ import annotations

import threading

import torch

from llama.kernels import cpu as cpu_kernels

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")

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
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, scale: float | None):
        # hidden (n, dim), weight (vocab_size, dim), targets (n,). scale: the output is the sum of the token losses
        # times scale, and its gradients are computed here; None: the output is the (n,) token losses.
        n = hidden.shape[0]
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits are taken in fp32
        per_token = scale is None
        losses = torch.empty(n, dtype=loss_dtype, device=hidden.device) if per_token else None
        loss = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        # a frozen weight (LoRA) or frozen inputs need no gradient: its matmul is skipped
        want_hidden, want_weight = (not per_token and ctx.needs_input_grad[i] for i in (0, 1))
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = _weight_gradient(weight, n) if want_weight else None
        for start, h, t, logits in _chunks(hidden, weight, targets, chunk_tokens, loss_dtype):
            token_losses = _softmax_cross_entropy_(logits, t, scale or 1.0)
            if per_token:
                losses[start : start + len(t)] = token_losses
            else:
                loss += token_losses.sum()
            if want_hidden or want_weight:
                grad = logits.to(hidden.dtype)
            if want_hidden:
                torch.matmul(grad, weight, out=grad_hidden[start : start + len(t)])
            if want_weight:
                grad_weight.addmm_(grad.T, h, beta=float(start > 0))  # the first chunk overwrites the empty memory
        if per_token:
            ctx.save_for_backward(hidden, weight, targets)
            ctx.chunk_tokens = chunk_tokens
            return losses
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss.dim() == 0:
            # scaled in place: no second (vocab_size, dim) weight gradient; a second backward through the same graph
            # (retain_graph) is refused by autograd's check of the modified saved tensors
            grad_hidden, grad_weight = ctx.saved_tensors
            scaled = [None if g is None else g.mul_(grad_loss) for g in (grad_hidden, grad_weight)]
            return *scaled, None, None, None
        hidden, weight, targets = ctx.saved_tensors  # per-token losses: each row's gradient weighs its own loss
        loss_dtype = grad_loss.dtype
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = _weight_gradient(weight, len(targets)) if want_weight else None
        for start, h, t, logits in _chunks(hidden, weight, targets, ctx.chunk_tokens, loss_dtype):
            _softmax_cross_entropy_(logits, t, 1.0)
            grad = logits.mul_(grad_loss[start : start + len(t), None]).to(hidden.dtype)
            if want_hidden:
                torch.matmul(grad, weight, out=grad_hidden[start : start + len(t)])
            if want_weight:
                grad_weight.addmm_(grad.T, h, beta=float(start > 0))
        return grad_hidden, grad_weight, None, None, None


def _weight_gradient(weight: torch.Tensor, n: int) -> torch.Tensor:
    """Memory for the weight's gradient: left empty for the first chunk to overwrite (a zero fill of a
    vocabulary-sized matrix costs a few ms a step), zeros when there are no tokens."""
    return torch.empty_like(weight) if n else torch.zeros_like(weight)


def _chunks(hidden, weight, targets, chunk_tokens: int, loss_dtype):
    """(start, hidden rows, targets, their logits) per chunk; every chunk's logits overwrite the same buffer."""
    n = hidden.shape[0]
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
        yield start, h, t, logits


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, in fp32 (fp64 for fp64 inputs):
    the mean over the counted tokens (those whose target is not ``IGNORE_INDEX``), their sum, or with
    ``reduction="none"`` each token's loss (0 where ignored), shaped like ``targets``.

    hidden: (..., dim); weight: (vocab_size, dim); targets: (...) token ids."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    counted = targets != IGNORE_INDEX
    all_counted = bool(counted.all())
    if not all_counted:
        hidden, targets = hidden[counted], targets[counted]
    n = hidden.shape[0]
    if n == 0 and reduction == "mean":
        raise ValueError("linear_cross_entropy: no tokens to average over (none, or every target is IGNORE_INDEX)")
    chunk_tokens = max(1, CHUNK_ELEMENTS.get(hidden.device.type, 1 << 28) // weight.shape[0])
    scale = {"mean": 1 / max(n, 1), "sum": 1.0, "none": None}[reduction]
    loss = _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, scale)
    if reduction != "none":
        return loss
    if not all_counted:
        loss = loss.new_zeros(counted.shape).masked_scatter(counted, loss)
    return loss.view(shape)
