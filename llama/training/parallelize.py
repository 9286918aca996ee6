"""The process group, and the model made ready to train from outside it: activation checkpointing and compilation
per block, then FSDP2 per block and at the root."""

from __future__ import annotations

import os
import socket
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from llama.model import Transformer
from llama.training.config import TrainingConfig


def init_distributed(device_choice: str):
    """Process group and 1-D device mesh; a plain ``python -m llama.train`` is a group of one."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_flush_denormal(True)  # tiny weights late in training otherwise slow the CPU backward down
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group(backend)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return device, mesh


# Selective activation checkpointing keeps the outputs of matmuls and attention, recomputing the cheap rest.
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    # our CPU attention (llama/kernels/cpu.py) too, by name: the op exists only once the kernels are built
    saved = op in SAVED_OPS or op.name() == "llama_one::causal_attention"
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def parallelize(model: Transformer, mesh, train: TrainingConfig, device: torch.device) -> Transformer:
    """Activation checkpointing and compilation per block, then FSDP2 per block and at the root (not for a single
    CPU process)."""
    for i, block in enumerate(model.layers):
        if train.activation_checkpointing == "full":
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        elif train.activation_checkpointing == "selective":
            context = partial(create_selective_checkpoint_contexts, _selective_policy)
            block = checkpoint_wrapper(block, context_fn=context, preserve_rng_state=False)
        if train.compile:
            block.compile(fullgraph=True)
        model.layers[i] = block
    if mesh.size() == 1 and device.type == "cpu":
        return model  # nothing to shard over; FSDP's hooks would cost ~15% of a CPU step (measured by bench.train)
    if device.type == "cuda" and train.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
