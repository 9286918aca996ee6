"""One training step: gradient accumulation over micro-batches gives the gradient of the whole batch's mean loss
(computed here the plain way, by F.cross_entropy on the full logits), not a multiple of it."""

import copy
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama.model import ModelArgs, Transformer
from llama.training.data import TokenWindows, read_index
from llama.training.parallelize import init_distributed
from llama.training.shards import prepare
from llama.training.step import forward_backward
from tokenizer.train import train as train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def windows(tmp_path_factory) -> TokenWindows:
    root = tmp_path_factory.mktemp("step")
    files = [str(f) for f in sorted((STDLIB / "json").glob("*.py"))]
    train_tokenizer(files, vocab_size=512, output=str(root / "tok"))
    shards = prepare(files, str(root / "tok.model"), root / "shards", val_fraction=0)
    return TokenWindows(read_index(shards), "train", 16)


@pytest.fixture(scope="module")
def group():
    """forward_backward averages over the process group: here a group of one."""
    device, _ = init_distributed("cpu")
    yield device
    dist.destroy_process_group()


def plain_step(model, tokens: torch.Tensor):
    """The mean cross-entropy of the whole batch from full logits, and its gradients."""
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("micro_batch", [1, 2, 8])
def test_accumulated_gradient_is_the_whole_batchs(windows, group, micro_batch):
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, multiple_of=16, vocab_size=512, max_seq_len=16))
    model.init_weights(seed=0)
    reference = copy.deepcopy(model)
    batch = list(range(3, 11))  # 8 windows
    loss, grad_norm = forward_backward(model, windows, batch, micro_batch, group, max_norm=math.inf)
    expected_loss, expected_grads = plain_step(reference, windows.batch(batch))
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected_grads.values()])).item()
    assert grad_norm == pytest.approx(expected_norm, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-5, atol=1e-8, msg=name)


def test_clipping_scales_the_gradient_to_max_norm(windows, group):
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, multiple_of=16, vocab_size=512, max_seq_len=16))
    model.init_weights(seed=0)
    reference = copy.deepcopy(model)
    _, grad_norm = forward_backward(model, windows, list(range(4)), 2, group, max_norm=0.01)
    _, expected_grads = plain_step(reference, windows.batch(list(range(4))))
    assert grad_norm > 0.01  # so the clip acts
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name] * 0.01 / grad_norm, rtol=1e-4, atol=1e-9, msg=name)
