"""Training speed: tokens/s and MFU of our training step (``llama.train``'s model preparation, optimizer and loss;
eager and compiled per block) against a plain transformers ``LlamaForCausalLM`` + AdamW loop, on the same
weights, batch × sequence, optimizer settings and precision, in the same run.

    python -m bench.train            # CPU: ~35M-parameter Llama, 4 × 256 tokens, fp32, 2 threads; GPU: 1B, 2048, bf16
    python -m bench.train --quick    # a tiny model, a few steps (what the tests run)

Both sides start from the same HF folder of random weights, so their first losses agree: a check that the two
loops compute the same thing. Every step is forward, fp32 cross-entropy, backward, gradient clipping, AdamW.
MFU = flops per token × tokens/s ÷ the device's dense bf16 peak (``llama.metrics``); none on CPU.

Every run also times the step's linear-layer matmuls alone (forward, gradient of the input, gradient of the weight,
at the run's shapes and dtype, best of 3 in isolation): an estimate of the least time a step built on the same
matmul library takes, so transformers' step ÷ that floor estimates the most any such loop could gain over it
here (``max_x_vs_hf``).
"""

from __future__ import annotations

import copy
import gc
import statistics
import tempfile
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import fire
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.common import linear_matmul_floor_s, print_table, timed, timed_in_turns, write_result
from llama.checkpoint import load_model, save_hf
from llama.model import ModelArgs, Transformer
from llama.training.config import Config
from llama.training.metrics import flops_per_token, peak_flops
from llama.training.optim import build_optimizer
from llama.training.parallelize import init_distributed, parallelize
from llama.training.step import loss_on

SHAPES = {
    "cpu": (ModelArgs(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, vocab_size=32000, multiple_of=256,
                      max_seq_len=256), 4, 256),  # (model, batch, seq_len)
    "cuda": (ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                       rope_theta=500000.0, max_seq_len=2048, tie_embeddings=True), 4, 2048),  # Llama 3.2 1B
    "quick": (ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                        max_seq_len=64), 2, 64),
}
VARIANTS = {"eager": False, "compiled": True}  # name: torch.compile per block


def hf_step(folder: Path, cfg: Config, device: torch.device):
    """A transformers training step: the same loss, clipping and AdamW parameter groups as ours."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, fused=True,  # as transformers' Trainer defaults to
    )
    # bf16 compute over fp32 weights on GPU, as FSDP's mixed precision gives ours
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=tokens[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    return training_step(loss, model, optimizer, cfg, autocast)


def our_step(folder: Path, cfg: Config, device: torch.device, mesh):
    """Our training step, prepared by ``llama.train`` (compile per block; FSDP on GPU, none for one CPU process)."""
    model = parallelize(load_model(folder, dtype=torch.float32).to(device).train(), mesh, cfg.training, device)
    return training_step(partial(loss_on, model), model, build_optimizer(model, cfg.optimizer), cfg)


def training_step(loss_on_tokens, model, optimizer, cfg: Config, autocast=nullcontext()):
    """One step as ``llama.train`` takes it: fp32 cross-entropy, backward, clipping, AdamW; returns the loss."""

    def step(tokens: torch.Tensor) -> float:
        with autocast:
            loss = loss_on_tokens(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def make_step(variant: str, folder: Path, cfg: Config, device: torch.device, mesh):
    if variant == "transformers":
        return hf_step(folder, cfg, device)
    cfg = copy.deepcopy(cfg)
    cfg.training.compile = VARIANTS[variant]
    return our_step(folder, cfg, device, mesh)


def measure(steps: dict, batches: list[torch.Tensor], warmup: int, device) -> dict[str, dict]:
    """Per variant: ``warmup`` steps (compilation happens here), then the median time of the remaining steps,
    the variants taking turns step by step so that load from other processes falls on all alike."""
    losses = {name: [] for name in steps}
    warmup_s = {name: timed(lambda: [losses[name].append(step(b)) for b in batches[:warmup]], device)
                for name, step in steps.items()}
    # each call trains on the variant's next batch
    runs = {name: (lambda name=name: losses[name].append(steps[name](batches[len(losses[name])]))) for name in steps}
    seconds = timed_in_turns(runs, len(batches) - warmup, device)
    return {name: {"warmup_s": warmup_s[name], "step_s": statistics.median(seconds[name]),
                   "first_loss": losses[name][0], "last_loss": losses[name][-1]} for name in steps}


def main(
    quick: bool = False,
    variants: str | tuple = ",".join(VARIANTS),
    steps: int | None = None,
    warmup: int = 2,
    threads: int = 2,
    device: str | None = None,
    output: str | None = None,
):
    """Benchmark and write ``train-<device>-<time>.json`` into ``output`` (default bench/results/)."""
    variants = variants.split(",") if isinstance(variants, str) else list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--variants {unknown}: expected some of {list(VARIANTS)}")
    device, mesh = init_distributed(device or "auto")  # a group of one process, as `python -m llama.train` makes
    try:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        args, batch, seq_len = SHAPES["quick" if quick else device.type]
        steps = steps or (4 if quick else 6)
        cfg = Config()
        cfg.data.seq_len, cfg.training.micro_batch_size = seq_len, batch
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(args.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
                   for _ in range(warmup + steps)]
        model = Transformer(args)
        model.init_weights(seed=0)
        n_params = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(args, n_params, seq_len)
        peak = peak_flops(device)
        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        floor_s = linear_matmul_floor_s(model, batch * seq_len, compute_dtype, device)

        hf_runs, rows = [], []
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_hf(model, Path(tmp) / "model")
            del model
            # On CPU each of ours is timed in turns with a transformers loop of its own: held in one process with
            # two of ours, transformers' step (~160k page faults) ran up to 15 % slower, which flattered the ratios.
            # On GPU one (large) model at a time.
            if device.type == "cpu":
                groups = [["transformers", v] for v in variants]
            else:
                groups = [["transformers"], *([v] for v in variants)]
            for group in groups:
                trainers = {name: make_step(name, folder, cfg, device, mesh) for name in group}
                for name, measured in measure(trainers, batches, warmup, device).items():
                    row = {"variant": name, "params": n_params, "batch": batch, "seq_len": seq_len, **measured,
                           "tokens_per_s": batch * seq_len / measured["step_s"]}
                    if name == "transformers":
                        hf_runs.append(row)
                    else:  # against the transformers loop timed with it (on GPU, the one)
                        rows.append({**row, "x_vs_hf": hf_runs[-1]["step_s"] / row["step_s"],
                                     "hf_step_s": hf_runs[-1]["step_s"]})
                del trainers
                gc.collect()  # FSDP's modules sit in reference cycles: free them before the next variant loads
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        hf = min(hf_runs, key=lambda run: run["step_s"])  # the fastest transformers run, shown as its row
        rows.insert(0, {**hf, "x_vs_hf": 1.0, "hf_step_s": hf["step_s"]})
        for row in rows:
            row["mfu"] = flops * row["tokens_per_s"] / peak if peak else None
        max_x_vs_hf = hf["step_s"] / floor_s

        print_table(rows, ["variant", "batch", "seq_len", "warmup_s", "step_s", "hf_step_s", "tokens_per_s", "x_vs_hf",
                           "mfu", "first_loss", "last_loss"])
        print(f"the step's linear matmuls alone take {floor_s:.3g} s here: a loop on the same matmuls could reach "
              f"~{max_x_vs_hf:.2f}× transformers at most")
        path = write_result("train", device, rows, out_dir=output, model_args=vars(args), flops_per_token=flops,
                            peak_flops=peak, linear_matmul_floor_s=floor_s, max_x_vs_hf=max_x_vs_hf)
        print(f"wrote {path}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    fire.Fire(main)
