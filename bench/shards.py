"""Reading training batches from shards: our reader (``llama.training.data.TokenWindows``, one ``os.pread`` per
window, so that a shard cut short under a run gives a message) against a memory map of the same files (what the
reader was before, and what nanoGPT and torchtitan's examples use), in the same run.

    python -m bench.shards            # a 100M-token uint16 shard, batches of 4 × 256 and 32 × 2048 tokens
    python -m bench.shards --quick    # a 1M-token shard (what the tests run)

The shard holds random ids and is read once before timing, so both readers find it in the page cache, as a
training run does after its first epoch; windows are drawn in the run's shuffled order. A row's ``x_vs_memmap`` is
the memory map's time per batch ÷ ours: above 1, ours is faster.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import fire
import numpy as np
import torch

from bench.common import print_table, timed_in_turns, write_result
from llama.training.data import INDEX, GlobalOrder, TokenWindows, read_index

SHAPES = {"default": ((4, 256), (32, 2048)), "quick": ((4, 256),)}  # (batch, seq_len)


def write_shard(folder: Path, tokens: int) -> Path:
    ids = np.random.default_rng(0).integers(0, 32000, tokens, dtype=np.uint16)
    ids.tofile(folder / "train-00000.bin")
    files = [{"path": "train-00000.bin", "tokens": tokens, "documents": 1}]
    index = {"dtype": "uint16", "vocab_size": 32000, "fingerprint": "random",
             "splits": {"train": {"files": files, "tokens": tokens, "documents": 1}}}
    (folder / INDEX).write_text(json.dumps(index))
    return folder


def memmap_batch(array: np.memmap, seq_len: int, windows) -> torch.Tensor:
    """The previous reader: slices of a memory map of the whole file."""
    rows = [array[w * seq_len : w * seq_len + seq_len + 1] for w in windows]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def main(quick: bool = False, tokens: int | None = None, repeats: int = 20, output: str | None = None):
    tokens = tokens or (1_000_000 if quick else 100_000_000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_shard(Path(tmp), tokens)
        array = np.memmap(folder / "train-00000.bin", dtype=np.uint16, mode="r")
        int(array.sum())  # into the page cache
        for batch, seq_len in SHAPES["quick" if quick else "default"]:
            ours = TokenWindows(read_index(folder), "train", seq_len)
            order = GlobalOrder(len(ours), seed=0)
            step = iter(range(0, 10**9, batch))
            batches = [order.windows(next(step), batch) for _ in range(repeats)]
            assert torch.equal(ours.batch(batches[0]), memmap_batch(array, seq_len, batches[0]))  # the same tokens
            fns = {"pread": lambda: [ours.batch(w) for w in batches],
                   "memmap": lambda: [memmap_batch(array, seq_len, w) for w in batches]}
            seconds = timed_in_turns(fns, rounds=5, device=torch.device("cpu"))
            per_batch = {name: statistics.median(s) / repeats for name, s in seconds.items()}
            rows.append({"batch": batch, "seq_len": seq_len, "ours_ms": per_batch["pread"] * 1e3,
                         "memmap_ms": per_batch["memmap"] * 1e3,
                         "x_vs_memmap": per_batch["memmap"] / per_batch["pread"]})
    print_table(rows, ["batch", "seq_len", "ours_ms", "memmap_ms", "x_vs_memmap"])
    print(f"wrote {write_result('shards', torch.device('cpu'), rows, output, shard_tokens=tokens)}")


if __name__ == "__main__":
    fire.Fire(main)
