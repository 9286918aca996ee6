"""Tensor parallelism for inference, applied from outside the model (torchtitan-style).

Each block's attention heads and FFN width are split over the ranks of a 1-D device mesh: wq/wk/wv and w1/w3
column-wise (each rank computes its own heads / hidden units), wo and w2 row-wise (partial sums all-reduced).
Embeddings, norms and the output projection stay replicated, so every rank ends with the same logits and
samples the same tokens from the same seed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from llama.model import Transformer


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_tensor_parallel_mesh(device: torch.device) -> DeviceMesh:
    """The process group and 1-D mesh for a ``torchrun --nproc_per_node N`` launch (gloo on CPU, NCCL on CUDA)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def apply_tensor_parallel(model: Transformer, mesh: DeviceMesh) -> Transformer:
    tp = mesh.size()
    args = model.args
    if args.n_kv_heads % tp or args.hidden_dim % tp:
        raise ValueError(
            f"tensor parallelism over {tp} ranks needs n_kv_heads ({args.n_kv_heads}) and the FFN width "
            f"({args.hidden_dim}) to be divisible by {tp}"
        )
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        block.attention.n_heads //= tp  # local head counts: the KV cache holds this rank's heads only
        block.attention.n_kv_heads //= tp
    return model
