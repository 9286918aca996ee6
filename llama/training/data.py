"""Token shards on disk (written by ``llama.prepare``) and the order in which training reads them.

A shard folder holds ``index.json`` and flat ``.bin`` files of token ids (uint16 or uint32), read a window at a
time (``os.pread``), each file checked against the token count ``index.json`` records.
A training sample is a window of ``seq_len + 1`` consecutive tokens (inputs and shifted targets); window ``i`` of
a file starts at token ``i * seq_len``, so windows never overlap except for the one shared boundary token.

The order is global: sample ``s`` of the run is window ``perm[s % n]`` of epoch ``s // n``, where ``perm`` is a
permutation of the ``n`` windows drawn from ``(seed, epoch)``. A checkpoint stores only ``s``, the number of samples
consumed by the whole run, so a run resumed on another number of processes continues the same sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

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
    format: str = "tokens"  # tokens (a stream), chat or preference (samples with loss masks: llama.training.packing)

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_DIR

    def identity(self) -> dict:
        """What tells these shards from others, for a checkpoint to record: a digest of every split's files and
        token counts (the folder may move), and for messages the folder and its training tokens."""
        digest = hashlib.sha256(json.dumps(self.splits, sort_keys=True).encode()).hexdigest()[:16]
        train_tokens = sum(entry["tokens"] for entry in self.splits.get("train", {}).get("files", []))
        return {"digest": digest, "train_tokens": train_tokens, "path": str(self.root)}


def read_index(root: str | Path) -> ShardIndex:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {root} does not exist; write it with `python -m llama.prepare`")
    file = root / INDEX
    if not file.is_file():
        raise ShardError(f"{root} has no {INDEX}: not a complete shard folder (an interrupted `llama.prepare`?)")
    try:
        meta = json.loads(file.read_text())
        index = ShardIndex(root, np.dtype(meta["dtype"]), meta["vocab_size"], meta["fingerprint"], meta["splits"],
                           meta.get("format", "tokens"))
        _check_index(index)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON errors are ValueErrors
        raise ShardError(f"{file} is not a shard index written by `llama.prepare`: {type(e).__name__}: {e}") from None
    return index


def _check_index(index: ShardIndex):
    """The shape ``llama.prepare`` writes: a token dtype, a vocabulary, and per split its files (names inside the
    folder) with their token counts."""
    if index.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"dtype {index.dtype} is not uint16 or uint32")
    if not (isinstance(index.vocab_size, int) and index.vocab_size > 0 and isinstance(index.fingerprint, str)):
        raise ValueError("expected a positive integer vocab_size and a string fingerprint")
    if index.format not in ("tokens", "chat", "preference"):
        raise ValueError(f"format {index.format!r} is not tokens, chat or preference")
    for name, split in index.splits.items():
        for entry in split["files"]:
            path, tokens = entry["path"], entry["tokens"]
            if not (isinstance(path, str) and Path(path).name == path and isinstance(tokens, int) and tokens >= 0):
                raise ValueError(f"split {name!r} lists {entry!r}; expected a file name in the folder and its tokens")


@dataclass
class Shard:
    """One token file, read window by window with ``os.pread``: a file truncated while training reads it gives a
    short read and a message, where a memory map would kill the process with SIGBUS."""

    path: Path
    tokens: int
    file: BinaryIO


def open_split(index: ShardIndex, split: str) -> list[Shard]:
    """The split's files opened, after checking each against the token count the index records."""
    if split not in index.splits:
        raise ShardError(f"{index.root / INDEX} has no {split!r} split (splits: {', '.join(index.splits)})")
    shards = []
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
        shards.append(Shard(path, entry["tokens"], open(path, "rb")))
    return shards


class TokenWindows:
    """The ``seq_len + 1``-token windows of one split, numbered across its files."""

    def __init__(self, index: ShardIndex, split: str, seq_len: int):
        self.seq_len, self.dtype, self.index_file = seq_len, index.dtype, index.root / INDEX
        self.shards = open_split(index, split)
        counts = [(shard.tokens - 1) // seq_len for shard in self.shards]
        self.starts = np.cumsum([0] + counts)  # first window number of each file
        if self.starts[-1] == 0:
            raise ShardError(
                f"the {split!r} split of {index.root} ({sum(s.tokens for s in self.shards)} tokens) is too short for "
                f"one window of seq_len + 1 = {seq_len + 1} tokens"
            )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: int) -> np.ndarray:
        f = int(np.searchsorted(self.starts, window, side="right")) - 1
        shard, itemsize = self.shards[f], self.dtype.itemsize
        start = (window - int(self.starts[f])) * self.seq_len
        wanted = (self.seq_len + 1) * itemsize
        data = os.pread(shard.file.fileno(), wanted, start * itemsize)
        if len(data) < wanted:
            raise ShardError(
                f"shard {shard.path} is {os.fstat(shard.file.fileno()).st_size} bytes now, where {self.index_file} "
                f"says {shard.tokens} tokens ({shard.tokens * itemsize} bytes): it was cut short while training read it"
            )
        return np.frombuffer(data, dtype=self.dtype)

    def batch(self, windows) -> torch.Tensor:
        """(len(windows), seq_len + 1) int64 tokens."""
        return torch.from_numpy(np.stack([self[int(w)] for w in windows]).astype(np.int64))

    def training_batch(self, windows) -> Batch:
        tokens = self.batch(windows)
        return Batch(tokens[:, :-1], tokens[:, 1:])


@dataclass
class Batch:
    """What one forward takes: input ids and target ids (``llama.loss.IGNORE_INDEX`` where nothing is trained),
    (bs, seq_len) each; for packed samples also their rotary positions and their attention mask (see
    ``llama.model.Transformer.forward``), None for plain causal windows."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.inputs), move(self.targets), move(self.positions), move(self.mask))


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
