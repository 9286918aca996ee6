"""The training run: checks before any process group exists, the model built and parallelized, resume, the
loop over global batches, checkpoints, validation, metrics and the final export.

Each step reads one global batch (``training.global_batch_size`` windows of the shards' training split, in the
seeded global order of ``llama.training.data``); process r takes its contiguous slice and runs it in micro-batches,
accumulating gradients. Checkpoints (``llama.training.resume``) are written every ``checkpoint.interval`` steps;
running the same command again resumes from the newest complete one, on any number of processes. At the end the
model is exported to ``<checkpoint.dir>/final/`` as an HF folder.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from llama.checkpoint import load_args, load_model, save_hf
from llama.files import FolderInUseError, folder_lock
from llama.model import ModelArgs, Transformer
from llama.training import dpo, evaluation, resume
from llama.training.config import Config, ConfigError, DataConfig, TrainingConfig
from llama.training.continued import added_token_ids, continue_from, continued_args
from llama.training.data import GlobalOrder, ShardError, ShardIndex, TokenWindows, rank_slice, read_index
from llama.training.metrics import MetricsLog, flops_per_token, peak_flops, peak_memory_gib
from llama.training.optim import build_optimizer, build_scheduler
from llama.training.packing import open_samples
from llama.training.parallelize import init_distributed, parallelize
from llama.training.step import evaluate, forward_backward
from llama.transforms import lora
from tokenizer import TokenizerNotFoundError, load_tokenizer


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Progress:
    """Where the run stands; a checkpoint records it beside the weights."""

    step: int = 0
    samples: int = 0  # global sample counter: the position in the data order
    skipped_steps: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Checks that run before any process group or model exists


def resolve_model_args(cfg: Config, index: ShardIndex) -> ModelArgs:
    """The architecture to train, after checking that the shards' tokenizer belongs to it."""
    init_from = cfg.model.init_from
    if init_from:
        try:
            model_tokenizer = load_tokenizer(init_from)
        except TokenizerNotFoundError:
            model_tokenizer = None  # a checkpoint without tokenizer files: only the vocabulary size can be checked
        if cfg.model.add_tokens:
            if model_tokenizer is None:
                raise ConfigError(f"model.add_tokens needs the tokenizer of {init_from}, and it has none")
            model_tokenizer = model_tokenizer.with_added_tokens(cfg.model.add_tokens)
        if model_tokenizer is not None and model_tokenizer.fingerprint != index.fingerprint:
            raise ShardError(
                f"shards {index.root} were tokenized with a different tokenizer than {init_from} "
                f"(fingerprint {index.fingerprint[:12]} vs {model_tokenizer.fingerprint[:12]}); "
                f"re-run llama.prepare with --tokenizer {init_from}, and the same --add_tokens as "
                f"--model.add_tokens (now {cfg.model.add_tokens})"
            )
        args = continued_args(cfg.model, load_args(init_from), index)
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


def check_device(training: TrainingConfig):
    if training.device == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"training.device is cuda, but {why}; use --training.device=cpu (or auto)")


def run_identity(cfg: Config, args: ModelArgs, index: ShardIndex) -> dict:
    """What defines the run, recorded by each checkpoint: a resume that changes any of it is refused, unless
    ``checkpoint.allow_changed`` names the change (``resume.check_run``)."""
    return {
        "tokenizer": index.fingerprint,
        "shards": index.identity(),
        "seq_len": cfg.data.seq_len,
        "global_batch_size": cfg.training.global_batch_size,
        "seed": cfg.training.seed,
        "model": asdict(args),
        "lora": asdict(cfg.lora) if cfg.lora.rank else None,
        "dpo": asdict(cfg.dpo) if index.format == "preference" else None,
    }


def check_batch_sizes(training: TrainingConfig, world: int):
    """Each rank's share of the global batch must be whole micro-batches (the accumulation steps)."""
    per_step = training.micro_batch_size * world
    if training.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size {training.global_batch_size} must be a multiple of "
            f"micro_batch_size × processes = {training.micro_batch_size} × {world}"
        )


def open_splits(index: ShardIndex, data: DataConfig, training: TrainingConfig):
    """The training windows, and the validation windows when validation is on and the split holds one: token
    windows of a text corpus, packed samples of chat data, pairs of preference data (``llama.training.packing``)."""
    val_tokens = index.splits.get("val", {}).get("tokens", 0)
    if index.format == "tokens":
        train_windows = TokenWindows(index, "train", data.seq_len)
        has_val = val_tokens > data.seq_len
        open_val = lambda: TokenWindows(index, "val", data.seq_len)  # noqa: E731
    else:
        train_windows = open_samples(index, "train", data.seq_len, data.overlong)
        has_val = index.splits.get("val", {}).get("documents", 0) > 0
        open_val = lambda: open_samples(index, "val", data.seq_len, data.overlong)  # noqa: E731
    val_windows = open_val() if training.eval_interval > 0 and has_val else None
    return train_windows, val_windows


def check_fine_tuning(cfg: Config, index: ShardIndex):
    """LoRA needs a model to adapt; a quantised base is LoRA's (QLoRA)."""
    if cfg.lora.rank and not cfg.model.init_from:
        raise ConfigError("lora.rank > 0 adapts a trained model: set model.init_from")
    if cfg.lora.rank and cfg.model.add_tokens:
        raise ConfigError("model.add_tokens with lora.rank > 0: the new embedding rows would stay frozen at their "
                          "initial value under LoRA; grow the vocabulary in a full fine-tune first")
    if cfg.lora.base_quantization != "none" and not cfg.lora.rank:
        raise ConfigError(f"lora.base_quantization={cfg.lora.base_quantization} freezes a quantised base under "
                          "LoRA adapters: set lora.rank too")


# ---------------------------------------------------------------------------------------------------------------
# The run


def build_model(cfg: Config, args: ModelArgs, index: ShardIndex) -> Transformer:
    """The model to train, in fp32: the checkpoint's weights (with the run's changes, ``llama.training.continued``),
    or a seeded from-scratch init; under LoRA its frozen base (quantised for QLoRA) with adapters."""
    if not cfg.model.init_from:
        model = Transformer(args)
        model.init_weights(seed=cfg.training.seed)
        return model
    model = load_model(cfg.model.init_from, dtype=torch.float32)
    model = continue_from(model, args, added_token_ids(index)).train()
    if cfg.lora.rank:
        add_adapters(model, cfg)
    return model


def add_adapters(model: Transformer, cfg: Config) -> Transformer:
    c = cfg.lora
    lora.quantize_base(model, c.base_quantization)
    return lora.apply_lora(model, lora.target_modules(model, c.targets), c.rank, c.alpha, c.dropout, c.rslora, c.dora)


def export(model, cfg: Config, args: ModelArgs, index: ShardIndex, run_dir: Path):
    """Gathers the full weights on rank 0 and writes ``<run_dir>/final/`` with the shards' tokenizer, replacing
    an earlier export atomically; under LoRA also ``<run_dir>/adapter/`` (``export_lora``)."""
    if cfg.lora.rank:
        return export_lora(model, cfg, index, run_dir)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        with torch.device("meta"):
            plain = Transformer(args)
        plain.load_state_dict(state, assign=True)
        plain.init_rope()
        save_hf(plain, run_dir / "final", tokenizer=load_tokenizer(index.tokenizer_path), replace=True)
    dist.barrier()


def export_lora(model, cfg: Config, index: ShardIndex, run_dir: Path):
    """``<run_dir>/adapter/`` in peft's layout, and ``<run_dir>/final/``: the adapters merged into the float base
    of ``model.init_from`` (for QLoRA too: the quantised base was a training-time stand-in for it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = resume.trainable_state(model, get_model_state_dict(model, options=options))  # the adapters only
    if dist.get_rank() == 0:
        base = load_model(cfg.model.init_from, dtype=torch.float32)
        c = cfg.lora
        lora.apply_lora(base, lora.target_modules(base, c.targets), c.rank, c.alpha, c.dropout, c.rslora, c.dora)
        missing, unexpected = base.load_state_dict(state, strict=False)
        if unexpected or any(".lora_" in name or name.endswith(".magnitude") for name in missing):
            raise RuntimeError(f"export: adapter state does not fit the model ({unexpected[:3]}, {missing[:3]})")
        lora.save_adapter(base, run_dir / "adapter", base_model=cfg.model.init_from, replace=True)
        save_hf(lora.merge_lora(base), run_dir / "final", tokenizer=load_tokenizer(index.tokenizer_path),
                replace=True)
    dist.barrier()


def train(cfg: Config):
    check_device(cfg.training)
    if cfg.model.init_from:
        cfg.model.init_from = os.path.expanduser(cfg.model.init_from)
    index = read_index(os.path.expanduser(cfg.data.path))
    train_windows, val_windows = open_splits(index, cfg.data, cfg.training)
    args = resolve_model_args(cfg, index)
    check_fine_tuning(cfg, index)
    evaluate_extra = evaluation.prepare(cfg.eval, load_tokenizer(index.tokenizer_path), args.max_seq_len)
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_batch_sizes(cfg.training, world)
    run_dir = Path(cfg.checkpoint.dir).expanduser()
    run = run_identity(cfg, args, index)

    device, mesh = init_distributed(cfg.training.device)
    report_dropped(train_windows, cfg.data)
    try:
        with hold_run_dir(run_dir):
            checkpoints = resume.complete_checkpoints(run_dir)
            if checkpoints:
                resume.check_run(checkpoints[-1], run, cfg.checkpoint.allow_changed)
            torch.manual_seed(cfg.training.seed)
            model = build_model(cfg, args, index)
            n_params = sum(p.numel() for p in model.parameters())
            reference = None
            if index.format == "preference" and not cfg.lora.rank:  # DPO's reference: a frozen copy
                reference = parallelize(copy.deepcopy(model).requires_grad_(False).eval(), mesh, cfg.training, device)
            model = parallelize(model, mesh, cfg.training, device)
            optimizer = build_optimizer(model, cfg.optimizer)
            scheduler = build_scheduler(optimizer, cfg.lr, cfg.training.steps)
            progress = restore(checkpoints[-1], model, optimizer, scheduler) if checkpoints else Progress()
            if cfg.checkpoint.export_only:
                if progress.step == 0:
                    raise FileNotFoundError(f"checkpoint.export_only: no complete checkpoint in {run_dir} to export")
                export(model, cfg, args, index, run_dir)
                return
            run_steps(cfg, model, optimizer, scheduler, progress, train_windows, val_windows, device,
                      flops_per_token(args, n_params, cfg.data.seq_len), run, reference, evaluate_extra)
            if cfg.checkpoint.export:
                export(model, cfg, args, index, run_dir)
            dist.barrier()  # all ranks finished before the group goes away (avoids a SIGABRT at exit seen with gloo)
    finally:
        dist.destroy_process_group()


def report_dropped(windows, data: DataConfig):
    """Chat samples truncated or left out for their length (``data.overlong``), or for training nothing."""
    dropped = getattr(windows, "dropped", None)
    if dist.get_rank() == 0 and dropped and (dropped.truncated or dropped.too_long or dropped.untrained):
        print(f"chat data at seq_len {data.seq_len}: {dropped.truncated} samples truncated, {dropped.too_long} "
              f"dropped as too long, {dropped.untrained} dropped with no trained token left", file=sys.stderr)


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Collective: rank 0 holds the run folder's lock (``llama.files.folder_lock``) for the block; while another
    run holds it, every rank raises the same error, naming that run's process."""
    with ExitStack() as stack:
        refused = [None]
        if dist.get_rank() == 0:
            try:
                stack.enter_context(folder_lock(run_dir))
            except FolderInUseError as e:
                refused = [f"checkpoint.dir {e}; or choose another checkpoint.dir"]
        dist.broadcast_object_list(refused, src=0)
        if refused[0]:
            raise FolderInUseError(refused[0])
        yield


def restore(checkpoint: Path, model, optimizer, scheduler) -> Progress:
    """The checkpoint's state, loaded into the model, optimizer and scheduler."""
    state = resume.load(checkpoint, model, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    progress = Progress(state["step"], state["samples"], state["skipped_steps"])
    if dist.get_rank() == 0:
        print(f"resuming from {checkpoint} (step {progress.step}, {progress.samples} samples)", file=sys.stderr)
    return progress


def run_steps(cfg: Config, model, optimizer, scheduler, progress: Progress, train_windows, val_windows, device,
              flops: float, run: dict, reference=None, evaluate_extra: evaluation.Evaluation | None = None):
    """The loop: from ``progress`` to ``training.steps``, logging, validating, evaluating (``evaluate_extra``, the
    ``[eval]`` section's) and checkpointing (with ``run``, what defines the run) as configured. Preference data
    trains by DPO against ``reference`` (None under LoRA: the model without its adapters)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    training, run_dir = cfg.training, Path(cfg.checkpoint.dir).expanduser()
    eval_windows = training.eval_batches * training.global_batch_size

    preference = run["dpo"] is not None

    def validate() -> dict:
        with evaluation.evaluating(model):
            if preference:
                return dpo.evaluate(model, val_windows, eval_windows, training.micro_batch_size, device,
                                    cfg.dpo.beta, reference)
            val_loss = evaluate(model, val_windows, eval_windows, training.micro_batch_size, device)
        return {"val_loss": val_loss, "val_perplexity": math.exp(val_loss)}

    def evaluations(step: int) -> dict:
        """The step's validation loss and ``[eval]`` metrics, when they are due (collective)."""
        record = {}
        if val_windows is not None and (step % max(training.eval_interval, 1) == 0 or step == training.steps):
            record.update(validate())
        if evaluate_extra is not None and evaluate_extra.due(step, training.steps):
            record.update(evaluate_extra(model, device))
        return record

    def step(windows) -> tuple[float, float, dict]:
        if preference:
            return dpo.forward_backward(model, train_windows, windows, training.micro_batch_size, device, max_norm,
                                        cfg.dpo.beta, reference)
        return *forward_backward(model, train_windows, windows, training.micro_batch_size, device, max_norm), {}

    log = MetricsLog(run_dir, progress.step, cfg.metrics.tensorboard) if rank == 0 else None
    if progress.step == 0 and (before := evaluations(0)):  # a resumed run logged these already
        if log:
            log.log({"step": 0, **before})
    order = GlobalOrder(len(train_windows), training.seed)
    tokens_per_step = training.global_batch_size * cfg.data.seq_len
    peak = peak_flops(device)
    max_norm = training.max_grad_norm if training.max_grad_norm > 0 else float("inf")
    bad_in_a_row = 0
    bar = tqdm(total=training.steps, initial=progress.step, disable=rank != 0 or not cfg.metrics.progress_bar)
    while progress.step < training.steps:
        start = time.perf_counter()
        first, count = rank_slice(progress.samples, training.global_batch_size, rank, world)
        windows = order.windows(first, count)
        loss, grad_norm, extra = step(windows)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            bad_in_a_row = 0
        else:  # no update: the weights stay as they were
            progress.skipped_steps += 1
            bad_in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        progress.step += 1
        progress.samples += training.global_batch_size
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start

        record = {
            "step": progress.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_step / elapsed,
            "tokens_per_s_per_device": tokens_per_step / elapsed / world,
            "mfu": flops * tokens_per_step / elapsed / world / peak if peak else None,
            "peak_memory_gib": peak_memory_gib(device), "skipped": not finite,
            "skipped_steps": progress.skipped_steps, **extra,
        }
        if cfg.metrics.log_samples:  # the windows each rank really read, in rank order
            gathered = [None] * world
            dist.all_gather_object(gathered, windows.tolist())
            record["windows"] = [w for part in gathered for w in part]
        record.update(evaluations(progress.step))
        if log:
            log.log(record)
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

        if bad_in_a_row >= training.max_bad_steps:
            raise TrainingDiverged(
                f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step {progress.step}); "
                f"stopping. The newest checkpoint in {run_dir} is the last good state: lower optimizer.lr "
                "or training.max_grad_norm and resume"
            )
        interval = cfg.checkpoint.interval
        if interval and (progress.step % interval == 0 or progress.step == training.steps):
            state = {**asdict(progress), "scheduler": scheduler.state_dict(), "run": run}
            resume.save(run_dir, progress.step, model, optimizer, state, cfg.checkpoint.keep)
    bar.close()
    if log:
        log.close()
