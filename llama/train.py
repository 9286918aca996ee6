"""Pretraining with FSDP2, exact resume and a Hugging Face export.

    torchrun --nproc_per_node 8 -m llama.train --config examples/configs/tiny.toml [--section.key=value ...]
    python -m llama.train --config ...          # one process

Each step reads one global batch (``training.global_batch_size`` windows of the shard's training split, in the
seeded global order of ``llama.data``); process r takes its contiguous slice and runs it in micro-batches,
accumulating gradients. The model is sharded with ``fully_shard`` per transformer block and at the root (gloo on
CPU, NCCL on GPU, bf16 compute with fp32 gradient reduction on GPU). Checkpoints (``llama.checkpointing``) are
written every ``checkpoint.interval`` steps; running the same command again resumes from the newest complete
one, on any number of processes. At the end the model is exported to ``<checkpoint.dir>/final/`` as an HF folder.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from tqdm import tqdm

from llama import checkpointing
from llama.checkpoint import CheckpointError, load_args, load_model, save_hf
from llama.config import Config, ConfigError, load_config
from llama.data import GlobalOrder, ShardError, ShardIndex, TokenWindows, rank_slice, read_index
from llama.metrics import MetricsLog, flops_per_token, peak_flops, peak_memory_gib
from llama.model import ModelArgs, Transformer
from tokenizer import TokenizerError, TokenizerNotFoundError, load_tokenizer


class TrainingDiverged(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Checks that run before any process group or model exists


def resolve_model_args(cfg: Config, index: ShardIndex) -> ModelArgs:
    """The architecture to train, after checking that the shards' tokenizer belongs to it."""
    if cfg.model.init_from:
        args = load_args(cfg.model.init_from)
        try:
            model_tokenizer = load_tokenizer(cfg.model.init_from)
        except TokenizerNotFoundError:
            model_tokenizer = None  # a checkpoint without tokenizer files: only the vocabulary size can be checked
        if model_tokenizer is not None and model_tokenizer.fingerprint != index.fingerprint:
            raise ShardError(
                f"shards {index.root} were tokenized with a different tokenizer than {cfg.model.init_from} "
                f"(fingerprint {index.fingerprint[:12]} vs {model_tokenizer.fingerprint[:12]}); "
                f"re-run llama.prepare with --tokenizer {cfg.model.init_from}"
            )
    else:
        args = cfg.model.model_args(index.vocab_size)
    if index.vocab_size > args.vocab_size:
        raise ShardError(
            f"shards {index.root} use a vocabulary of {index.vocab_size} tokens, the model has only "
            f"{args.vocab_size}"
        )
    if cfg.data.seq_len > args.max_seq_len:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's context of {args.max_seq_len}")
    return args


def check_batch_sizes(cfg: Config, world: int):
    """Each rank's share of the global batch must be whole micro-batches (the accumulation steps)."""
    per_step = cfg.training.micro_batch_size * world
    if cfg.training.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size {cfg.training.global_batch_size} must be a multiple of "
            f"micro_batch_size × processes = {cfg.training.micro_batch_size} × {world}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Distributed set-up and model parallelisation


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
    # our CPU attention (llama/cpu_kernels.py) too, by name: the op exists only once the kernels are built
    saved = op in SAVED_OPS or op.name() == "llama_one::causal_attention"
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def parallelize(model: Transformer, mesh, cfg: Config, device: torch.device) -> Transformer:
    """Activation checkpointing and compilation per block, then FSDP2 per block and at the root (not for a single
    CPU process)."""
    train = cfg.training
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


def build_optimizer(model, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "tok_embeddings" not in name else no_decay).append(p)
    opt = cfg.optimizer
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, fused=True
    )


def lr_factor(completed: int, cfg: Config) -> float:
    """Learning rate of update number ``completed + 1``, as a fraction of the peak."""
    step, total, lr = completed + 1, cfg.training.steps, cfg.lr
    if step <= lr.warmup_steps:
        return step / lr.warmup_steps
    floor = lr.min_lr_ratio
    if lr.schedule == "cosine":
        progress = (step - lr.warmup_steps) / max(1, total - lr.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if lr.schedule == "wsd":
        decay_steps = max(1, round(lr.decay_fraction * total))
        into_decay = step - (total - decay_steps)
        return 1.0 if into_decay <= 0 else 1 - (1 - floor) * min(into_decay / decay_steps, 1.0)
    return 1.0


# ---------------------------------------------------------------------------------------------------------------
# Steps


def loss_on(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 of (bs, seq_len + 1) token windows."""
    return model(tokens[:, :-1], targets=tokens[:, 1:])


def forward_backward(model, data: TokenWindows, windows, micro_batch: int, device, max_norm: float):
    """Accumulates the gradient of this rank's windows in micro-batches and clips it; returns the global mean
    loss and the gradient norm before clipping (both over all ranks)."""
    micro_batches = [windows[i : i + micro_batch] for i in range(0, len(windows), micro_batch)]
    loss_sum = torch.zeros((), device=device)
    for chunk in micro_batches:
        loss = loss_on(model, data.batch(chunk).to(device)) / len(micro_batches)
        loss.backward()  # FSDP averages the gradients over ranks
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor: all shards
    return loss_sum.item(), grad_norm.item()


@torch.no_grad()
def evaluate(model, val: TokenWindows, cfg: Config, device) -> float:
    """Mean loss over the first ``eval_batches`` global batches of the validation split (or all of it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    count = min(cfg.training.eval_batches * cfg.training.global_batch_size, len(val))
    per_rank = math.ceil(count / world)  # every rank runs the same number of forwards (FSDP's gathers are collective)
    windows = list(range(rank * per_rank, (rank + 1) * per_rank))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, windows)
    for i in range(0, per_rank, cfg.training.micro_batch_size):
        chunk = windows[i : i + cfg.training.micro_batch_size]
        tokens = val.batch([w % len(val) for w in chunk]).to(device)  # (bs, seq_len + 1)
        logits = model(tokens[:, :-1])
        per_token = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        per_window = per_token.view(len(chunk), -1).mean(-1)  # (bs,)
        # windows past `count` only pad the last ranks' work: they weigh nothing, so the mean does not depend
        # on the number of processes
        counted = torch.tensor([w < count for w in chunk], dtype=torch.float64, device=device)
        total += torch.stack([(per_window.double() * counted).sum(), counted.sum()])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def export(model, args: ModelArgs, index: ShardIndex, run_dir: Path):
    """Gathers the full weights on rank 0 and writes ``<run_dir>/final/`` with the shards' tokenizer."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        with torch.device("meta"):
            plain = Transformer(args)
        plain.load_state_dict(state, assign=True)
        plain.init_rope()
        # written beside the previous export and swapped in, so a crash mid-export keeps the old one
        fresh, final, stale = run_dir / "final.new", run_dir / "final", run_dir / "final.old"
        shutil.rmtree(fresh, ignore_errors=True)
        save_hf(plain, fresh, tokenizer=load_tokenizer(index.tokenizer_path))
        if final.exists():
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
        fresh.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()


def train(cfg: Config):
    if cfg.model.init_from:
        cfg.model.init_from = os.path.expanduser(cfg.model.init_from)
    index = read_index(os.path.expanduser(cfg.data.path))
    train_windows = TokenWindows(index, "train", cfg.data.seq_len)
    val_windows = None
    if cfg.training.eval_interval > 0 and index.splits.get("val", {}).get("tokens", 0) > cfg.data.seq_len:
        val_windows = TokenWindows(index, "val", cfg.data.seq_len)
    args = resolve_model_args(cfg, index)
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_batch_sizes(cfg, world)
    run_dir = Path(cfg.checkpoint.dir).expanduser()

    device, mesh = init_distributed(cfg.training.device)
    try:
        rank = dist.get_rank()
        torch.manual_seed(cfg.training.seed)
        if cfg.model.init_from:
            model = load_model(cfg.model.init_from, dtype=torch.float32).train()
        else:
            model = Transformer(args)
            model.init_weights(seed=cfg.training.seed)
        n_params = sum(p.numel() for p in model.parameters())
        model = parallelize(model, mesh, cfg, device)
        optimizer = build_optimizer(model, cfg, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))

        step, samples, skipped = 0, 0, 0
        checkpoints = checkpointing.complete_checkpoints(run_dir)
        if checkpoints:
            state = checkpointing.load(checkpoints[-1], model, optimizer)
            scheduler.load_state_dict(state["scheduler"])
            step, samples, skipped = state["step"], state["samples"], state["skipped_steps"]
            if rank == 0:
                print(f"resuming from {checkpoints[-1]} (step {step}, {samples} samples)", file=sys.stderr)
        elif cfg.checkpoint.export_only:
            raise FileNotFoundError(f"checkpoint.export_only: no complete checkpoint in {run_dir} to export")
        if cfg.checkpoint.export_only:
            export(model, args, index, run_dir)
            return

        log = MetricsLog(run_dir, step, cfg.metrics.tensorboard) if rank == 0 else None
        if step == 0 and val_windows is not None:
            val_loss = evaluate(model, val_windows, cfg, device)
            if log:
                log.log({"step": 0, "val_loss": val_loss, "val_perplexity": math.exp(val_loss)})

        order = GlobalOrder(len(train_windows), cfg.training.seed)
        global_batch, micro = cfg.training.global_batch_size, cfg.training.micro_batch_size
        tokens_per_step = global_batch * cfg.data.seq_len
        flops = flops_per_token(args, n_params, cfg.data.seq_len)
        peak = peak_flops(device)
        max_norm = cfg.training.max_grad_norm if cfg.training.max_grad_norm > 0 else float("inf")
        bad_in_a_row = 0
        bar = tqdm(total=cfg.training.steps, initial=step, disable=rank != 0 or not cfg.metrics.progress_bar)
        while step < cfg.training.steps:
            start = time.perf_counter()
            first, count = rank_slice(samples, global_batch, rank, world)
            windows = order.windows(first, count)
            loss_value, norm_value = forward_backward(model, train_windows, windows, micro, device, max_norm)
            finite = math.isfinite(loss_value) and math.isfinite(norm_value)
            if finite:
                optimizer.step()
                bad_in_a_row = 0
            else:  # no update: the weights stay as they were
                skipped += 1
                bad_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            samples += global_batch
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start

            record = {
                "step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                "tokens_per_s": tokens_per_step / elapsed,
                "tokens_per_s_per_device": tokens_per_step / elapsed / world,
                "mfu": flops * tokens_per_step / elapsed / world / peak if peak else None,
                "peak_memory_gib": peak_memory_gib(device), "skipped": not finite, "skipped_steps": skipped,
            }
            if cfg.metrics.log_samples:  # the windows each rank really read, in rank order
                gathered = [None] * world
                dist.all_gather_object(gathered, windows.tolist())
                record["windows"] = [w for part in gathered for w in part]
            if val_windows is not None and (step % cfg.training.eval_interval == 0 or step == cfg.training.steps):
                record["val_loss"] = evaluate(model, val_windows, cfg, device)
                record["val_perplexity"] = math.exp(record["val_loss"])
            if log:
                log.log(record)
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")

            if bad_in_a_row >= cfg.training.max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                    f"stopping. The newest checkpoint in {run_dir} is the last good state: lower optimizer.lr "
                    "or training.max_grad_norm and resume"
                )
            interval = cfg.checkpoint.interval
            if interval and (step % interval == 0 or step == cfg.training.steps):
                train_state = {"step": step, "samples": samples, "skipped_steps": skipped,
                               "scheduler": scheduler.state_dict()}
                checkpointing.save(run_dir, step, model, optimizer, train_state, cfg.checkpoint.keep)
        bar.close()
        if log:
            log.close()
        if cfg.checkpoint.export:
            export(model, args, index, run_dir)
        dist.barrier()  # all ranks finished before the group goes away (avoids a SIGABRT at exit seen with gloo)
    finally:
        dist.destroy_process_group()


USER_ERRORS = (ConfigError, ShardError, CheckpointError, checkpointing.CheckpointMismatch, TokenizerError,
               FileNotFoundError, TrainingDiverged)


def main(argv: list[str] | None = None):
    try:
        train(load_config(argv))
    except USER_ERRORS as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"llama.train: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
