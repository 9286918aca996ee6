"""LoRA fine-tuning speed and memory: our training step (``llama.transforms.lora`` on our model, chunked loss)
against transformers + peft, with the same model, batches, LoRA configuration and optimizer, in one run.

    python -m bench.finetune                 # CPU: SmolLM2-135M-Instruct, 1 × 512-token window, fp32, 2 threads
    python -m bench.finetune --quick         # a tiny random model (what the tests run)

Sides: ours eager, ours with each block compiled (``training.compile``, as ``llama.train`` prepares it), and
peft. Each runs in its own process (so its peak resident memory is its own), taking turns ``rounds`` times (the
first step of each process, where compilation happens, is not timed); a process loads the model, adds rank-16
adapters (alpha 32, every linear of the blocks: q, k, v, o, gate, up, down; no dropout), then takes ``warmup`` +
``steps`` steps of forward, fp32 cross-entropy, backward, clipping and AdamW over the adapters, on windows of real
text (the standard library's source, tokenized by the model's tokenizer). Reported per side: the median step time
over all rounds, tokens/s, the process's peak RSS and its peak above the loaded model. All start from the same
weights with B = 0, so their first losses agree: a check that they compute the same thing. Last, the step's frozen linear
matmuls are timed on their own (``linear_matmul_floor_s``: forward and input gradient of every base weight): peft's
step ÷ that floor (``max_x_vs_peft``) bounds what any loop on the same matmul library could gain over peft.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

from bench.common import linear_matmul_floor_s, print_table, real_text, write_result

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR = 16, 32.0, 1e-4


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def text_batches(folder: Path, count: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """``count`` batches of (batch, seq_len + 1) consecutive token windows of stdlib source."""
    from tokenizer import load_tokenizer

    needed = count * batch * (seq_len + 1)
    ids = load_tokenizer(folder).encode(real_text(8 * needed))  # a token holds fewer than 8 characters of code
    return list(torch.tensor(ids[:needed]).view(count, batch, seq_len + 1))


def our_step(folder: Path, compile: bool = False):
    from llama.checkpoint import load_model
    from llama.training.config import OptimizerConfig, TrainingConfig
    from llama.training.optim import build_optimizer
    from llama.training.parallelize import init_distributed, parallelize
    from llama.transforms.lora import apply_lora, target_modules

    device, mesh = init_distributed("cpu")  # a group of one process, as `python -m llama.train` makes
    model = load_model(folder, dtype=torch.float32).train()
    apply_lora(model, target_modules(model, TARGETS), RANK, ALPHA)
    model = parallelize(model, mesh, TrainingConfig(compile=compile), device)
    optimizer = build_optimizer(model, OptimizerConfig(lr=LR, weight_decay=0.0))

    def loss(tokens):
        return model(tokens[:, :-1], targets=tokens[:, 1:])

    return model, optimizer, loss


def peft_step(folder: Path):
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=HF_TARGETS,
                                                      lora_dropout=0.0))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0, fused=True)

    def loss(tokens):
        logits = model(input_ids=tokens[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    return model, optimizer, loss


def worker(side: str, folder: str, batch: int, seq_len: int, warmup: int, steps: int, threads: int):
    """One side's run: prints a JSON line of its step times, losses and memory."""
    torch.set_num_threads(threads)
    folder = Path(folder)
    batches = text_batches(folder, warmup + steps, batch, seq_len)
    model, optimizer, loss_on = SIDES[side](folder)
    loaded_gib = current_rss_gib()
    losses, seconds = [], []
    for tokens in batches:
        start = time.perf_counter()
        loss = loss_on(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    print(json.dumps({"side": side, "step_s": seconds[warmup:], "losses": losses, "peak_rss_gib": rss_gib(),
                      "loaded_rss_gib": loaded_gib}))


SIDES = {"ours": our_step, "ours_compiled": lambda folder: our_step(folder, compile=True), "peft": peft_step}


def quick_checkpoint(folder: Path) -> Path:
    from llama.checkpoint import save_hf
    from llama.checkpoint.embedded import default_checkpoint
    from llama.model import ModelArgs, Transformer
    from tokenizer import load_tokenizer

    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, multiple_of=32,
                                  max_seq_len=256, tie_embeddings=True))
    model.init_weights(seed=0)
    return save_hf(model, folder, tokenizer=load_tokenizer(default_checkpoint()))


def main(quick: bool = False, batch: int = 1, seq_len: int = 512, warmup: int = 1, steps: int = 3, rounds: int = 3,
         threads: int = 2, sides: str | tuple = ",".join(SIDES), output: str | None = None,
         worker_side: str | None = None, folder: str | None = None):
    """Benchmark and write ``finetune-cpu-<time>.json`` into ``output`` (default bench/results/)."""
    if worker_side:
        return worker(worker_side, folder, batch, seq_len, warmup, steps, threads)
    sides = sides.split(",") if isinstance(sides, str) else list(sides)
    if not set(sides) <= set(SIDES) or sides[-1] != "peft":
        raise ValueError(f"--sides {sides}: expected some of {list(SIDES)}, ending with peft (the reference)")
    from llama.checkpoint import load_model

    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            folder, seq_len, steps, rounds = quick_checkpoint(Path(tmp) / "tiny"), 64, 2, 1
        else:
            from llama.checkpoint.embedded import default_checkpoint

            folder = default_checkpoint()
        runs = {side: [] for side in sides}
        for _ in range(rounds):
            for side in runs:  # in turns, so that load from other processes falls on both alike
                command = [sys.executable, "-m", "bench.finetune", f"--worker_side={side}", f"--folder={folder}",
                           f"--batch={batch}", f"--seq_len={seq_len}", f"--warmup={warmup}", f"--steps={steps}",
                           f"--threads={threads}"]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                runs[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
        torch.set_num_threads(threads)
        base = load_model(folder, dtype=torch.float32)
        floor_s = linear_matmul_floor_s(base, batch * seq_len, torch.float32, torch.device("cpu"), frozen=True)
    rows = []
    for side, results in runs.items():
        step_s = statistics.median(s for r in results for s in r["step_s"])
        rows.append({
            "side": side, "batch": batch, "seq_len": seq_len, "step_s": step_s,
            "tokens_per_s": batch * seq_len / step_s,
            "peak_rss_gib": max(r["peak_rss_gib"] for r in results),
            "peak_above_model_gib": max(r["peak_rss_gib"] - r["loaded_rss_gib"] for r in results),
            "first_loss": results[0]["losses"][0], "last_loss": results[0]["losses"][-1],
        })
    theirs = rows[-1]
    for row in rows:
        row["tokens_per_s_x_peft"] = row["tokens_per_s"] / theirs["tokens_per_s"]
        row["peak_rss_x_peft"] = row["peak_rss_gib"] / theirs["peak_rss_gib"]
        row["peak_above_model_x_peft"] = row["peak_above_model_gib"] / theirs["peak_above_model_gib"]
    print_table(rows, ["side", "batch", "seq_len", "step_s", "tokens_per_s", "tokens_per_s_x_peft", "peak_rss_gib",
                       "peak_rss_x_peft", "peak_above_model_gib", "peak_above_model_x_peft", "first_loss", "last_loss"])
    path = write_result("finetune", torch.device("cpu"), rows, out_dir=output, model=str(folder), lora_rank=RANK,
                        lora_alpha=ALPHA, lora_targets=list(TARGETS), rounds=rounds, steps_per_round=steps,
                        threads=threads, linear_matmul_floor_s=floor_s,
                        max_x_vs_peft=theirs["step_s"] / floor_s)
    print(f"the step's frozen linear matmuls alone take {floor_s:.3g} s here: a loop on the same matmuls could reach "
          f"at most {theirs['step_s'] / floor_s:.2f}x peft's tokens/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(main)
