"""Run by test_fine_tuning.py under torchrun: one training step's loss and full gradients over a global batch of 8
packed chat windows, this process taking its share in micro-batches, saved by rank 0."""

import sys

import torch
import torch.distributed as dist

from llama.model import ModelArgs, Transformer
from llama.training.config import TrainingConfig
from llama.training.data import rank_slice, read_index
from llama.training.packing import PackedWindows
from llama.training.parallelize import init_distributed, parallelize
from llama.training.step import forward_backward

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, multiple_of=16, max_seq_len=64)
SEQ_LEN = 48


def step(shards: str, micro_batch: int, device, mesh):
    """(loss, {name: full gradient}) of global windows 0..7."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(std=0.2, seed=0)
    model = parallelize(model, mesh, TrainingConfig(), device)
    data = PackedWindows(read_index(shards), "train", SEQ_LEN)
    first, count = rank_slice(0, 8, dist.get_rank(), dist.get_world_size())
    loss, _ = forward_backward(model, data, list(range(first, first + count)), micro_batch, device, float("inf"))
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = grad.detach().clone()
    return loss, grads


if __name__ == "__main__":
    shards, micro_batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    device, mesh = init_distributed("cpu")
    loss, grads = step(shards, micro_batch, device, mesh)
    if dist.get_rank() == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()
