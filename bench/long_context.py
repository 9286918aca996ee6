"""Peak memory of one training step at long sequence lengths (Code Llama's long-context fine-tuning: RoPE base 10^6,
16,384-token sequences): ours against transformers' ``LlamaForCausalLM`` with SDPA and with eager attention, on the
same weights, fp32, one sequence per step.

    python -m bench.long_context                     # 2k, 4k, 8k, 16k tokens; eager attention up to 8k
    python -m bench.long_context --quick             # a tiny model at 128 and 256 tokens (what the tests run)

Each (variant, length) runs in a fresh process: build the model, AdamW and the batch, warm up with a 64-token step
(kernels loaded, optimizer state allocated), then one step (forward, loss, backward, optimizer step). The figure is
that step's peak memory above what the process held before it: on CPU the growth of the peak resident size
(``ru_maxrss``), on GPU ``torch.cuda.max_memory_allocated``. Variants:

* ``ours``: our training step (``Transformer(tokens, targets=...)``): causal attention through our CPU kernel
  (flash-attn or SDPA on GPU), the loss chunked with the output projection, never holding all the logits;
* ``ours_sdpa``: the same with our kernels off (``LLAMA_ONE_CPU_KERNELS=0``): SDPA's own causal kernel;
* ``hf_sdpa``, ``hf_eager``: transformers, ``attn_implementation="sdpa"`` or ``"eager"`` (which holds the
  (heads, length, length) attention weights of every layer for the backward pass).

Attention that is linear in memory shows as a peak that doubles when the length doubles; eager attention's
quadruples.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import fire
import torch

from bench.common import print_table, write_result
from llama.model import ModelArgs, Transformer

SHAPES = {  # (model, lengths)
    "full": (ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=256,
                       max_seq_len=16384, rope_theta=1e6), (2048, 4096, 8192, 16384)),
    "quick": (ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                        max_seq_len=256, rope_theta=1e6), (128, 256)),
}
VARIANTS = ("ours", "ours_sdpa", "hf_sdpa", "hf_eager")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def hf_model(args: ModelArgs, attention: str, state: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama.checkpoint.hf import OURS_TO_HF, hf_config, rename

    config = LlamaConfig(**hf_config(args, torch.float32), attn_implementation=attention)
    model = LlamaForCausalLM(config)
    model.load_state_dict({rename(name, OURS_TO_HF): t for name, t in state.items()}, strict=False)
    model.tie_weights()
    return model


def measure(variant: str, shape: str, length: int, device: str) -> dict:
    """One step of ``variant`` at ``length`` tokens, in this process: its peak memory and time."""
    device = torch.device(device)
    args = SHAPES[shape][0]
    ours = Transformer(args)
    ours.init_weights(seed=0)
    model = ours if variant.startswith("ours") else hf_model(args, variant.removeprefix("hf_"), ours.state_dict())
    model = model.to(device).train()
    # lr 0: AdamW does all its work and holds its state, and the weights stay the same after the warm-up, so every
    # variant's measured loss is the same number (a check that they compute the same thing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        if variant.startswith("ours"):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        else:  # transformers' own loss (labels=...) would skip the last position's target: the same loss as ours
            logits = model(tokens[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    generator = torch.Generator().manual_seed(0)
    step(torch.randint(args.vocab_size, (1, 65), generator=generator).to(device))  # warm-up
    tokens = torch.randint(args.vocab_size, (1, length + 1), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mib()
    start = time.perf_counter()
    loss = step(tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib()
    return {"peak_mib": peak - before, "step_s": time.perf_counter() - start, "loss": loss.item()}


def run_in_fresh_process(variant: str, shape: str, length: int, device: str, threads: int) -> dict:
    env = {**os.environ, **({"LLAMA_ONE_CPU_KERNELS": "0"} if variant == "ours_sdpa" else {})}
    cmd = [sys.executable, "-m", "bench.long_context", "--worker", variant, "--shape", shape, "--length",
           str(length), "--device", device, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} at {length} tokens failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(
    quick: bool = False,
    variants: str | tuple = ",".join(VARIANTS),
    lengths: str | tuple | None = None,
    eager_max: int = 8192,
    threads: int = 2,
    device: str | None = None,
    output: str | None = None,
    worker: str | None = None,
    shape: str = "full",
    length: int = 0,
):
    """Measure every variant at every length and write ``long_context-<device>-<time>.json`` into ``output``
    (default bench/results/); eager attention only up to ``eager_max`` tokens."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(threads)
    if worker:  # one measurement, in this fresh process
        print(json.dumps(measure(worker, shape, length, device)))
        return
    variants = variants.split(",") if isinstance(variants, str) else list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--variants {unknown}: expected some of {list(VARIANTS)}")
    shape = "quick" if quick else "full"
    args, default_lengths = SHAPES[shape]
    if lengths is None:
        lengths = default_lengths
    lengths = [int(n) for n in (lengths.split(",") if isinstance(lengths, str) else lengths)]
    rows = []
    for n in lengths:
        for variant in variants:
            if variant == "hf_eager" and n > eager_max:
                skipped = f"> --eager_max {eager_max}"
                rows.append({"variant": variant, "tokens": n, "peak_mib": None, "skipped": skipped})
                continue
            row = {"variant": variant, "tokens": n, **run_in_fresh_process(variant, shape, n, device, threads)}
            row["mib_per_1k_tokens"] = row["peak_mib"] / n * 1024
            rows.append(row)
            print_table([row], ["variant", "tokens", "peak_mib", "mib_per_1k_tokens", "step_s", "loss"])
    path = write_result("long_context", torch.device(device), rows, output, model=vars(args),
                        note="peak memory of one step above the process's memory before it")
    print()
    print_table(rows, ["variant", "tokens", "peak_mib", "mib_per_1k_tokens", "step_s", "loss"])
    print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(main)
