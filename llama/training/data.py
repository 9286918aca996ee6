"""Token shards on disk (written by ``llama.prepare``) and the order in which training reads them.

A shard folder holds ``index.json`` and flat ``.bin`` files of token ids (uint16 or uint32), read memory-mapped.
A training sample is a window of ``seq_len + 1`` consecutive tokens (inputs and shifted targets); window ``i`` of
a file starts at token ``i * seq_len``, so windows never overlap except for the one shared boundary token.

The order is global: sample ``s`` of the run is window ``perm[s % n]`` of epoch ``s // n``, where ``perm`` is a
permutation of the ``n`` windows drawn from ``(seed, epoch)``. A checkpoint stores only ``s``, the number of samples
consumed by the whole run, so a run resumed on another number of processes continues the same sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

INDEX = "index.json"
TOKENIZER_DIR = "tokenizer"  # the tokenizer saved next to the shards, so they carry their own vocabulary


class ShardError(ValueError):
    pass


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class ShardIndex:
    root: Path
    dtype: np.dtype
    vocab_size: int
    fingerprint: str
    splits: dict  # name -> {"files": [{"path", "tokens", "documents"}], "tokens", "documents"}

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_DIR


def read_index(root: str | Path) -> ShardIndex:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {root} does not exist; write it with `python -m llama.prepare`")
    if not (root / INDEX).is_file():
        raise ShardError(f"{root} has no {INDEX}: not a complete shard folder (an interrupted `llama.prepare`?)")
    meta = json.loads((root / INDEX).read_text())
    return ShardIndex(root, np.dtype(meta["dtype"]), meta["vocab_size"], meta["fingerprint"], meta["splits"])


def open_split(index: ShardIndex, split: str) -> list[np.memmap]:
    """The split's files memory-mapped, after checking each against the token count the index records."""
    if split not in index.splits:
        raise ShardError(f"{index.root / INDEX} has no {split!r} split (splits: {', '.join(index.splits)})")
    arrays = []
    for entry in index.splits[split]["files"]:
        path = index.root / entry["path"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in {index.root / INDEX} is missing")
        size, itemsize = path.stat().st_size, index.dtype.itemsize
        if size == 0:
            raise ShardError(f"shard {path} is empty; expected {entry['tokens']} {index.dtype} tokens")
        if size % itemsize or size // itemsize != entry["tokens"]:
            raise ShardError(
                f"shard {path} is truncated or corrupt: {size} bytes, expected {entry['tokens']} tokens of "
                f"{index.dtype} ({entry['tokens'] * itemsize} bytes)"
            )
        arrays.append(np.memmap(path, dtype=index.dtype, mode="r"))
    return arrays


class TokenWindows:
    """The ``seq_len + 1``-token windows of one split, numbered across its files."""

    def __init__(self, index: ShardIndex, split: str, seq_len: int):
        self.seq_len = seq_len
        self.arrays = open_split(index, split)
        counts = [(len(a) - 1) // seq_len for a in self.arrays]
        self.starts = np.cumsum([0] + counts)  # first window number of each file
        if self.starts[-1] == 0:
            raise ShardError(
                f"the {split!r} split of {index.root} ({sum(map(len, self.arrays))} tokens) is too short for one "
                f"window of seq_len + 1 = {seq_len + 1} tokens"
            )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: int) -> np.ndarray:
        f = int(np.searchsorted(self.starts, window, side="right")) - 1
        start = (window - int(self.starts[f])) * self.seq_len
        return self.arrays[f][start : start + self.seq_len + 1]

    def batch(self, windows) -> torch.Tensor:
        """(len(windows), seq_len + 1) int64 tokens."""
        return torch.from_numpy(np.stack([self[int(w)] for w in windows]).astype(np.int64))


@lru_cache(maxsize=2)  # a global batch spans at most two epochs
def epoch_permutation(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


class GlobalOrder:
    """Maps a global sample number to a window: a seeded shuffle without replacement per epoch."""

    def __init__(self, n_windows: int, seed: int):
        self.n, self.seed = n_windows, seed

    def windows(self, first_sample: int, count: int) -> np.ndarray:
        samples = np.arange(first_sample, first_sample + count)
        epochs, positions = np.divmod(samples, self.n)
        return np.array([epoch_permutation(self.n, self.seed, int(e))[p] for e, p in zip(epochs, positions)])


def rank_slice(first_sample: int, global_batch: int, rank: int, world: int) -> tuple[int, int]:
    """(first sample, count) of rank's contiguous share of the global batch starting at ``first_sample``."""
    per_rank = global_batch // world
    return first_sample + rank * per_rank, per_rank
