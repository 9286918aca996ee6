"""Chat samples (``llama.training.chat_data``'s shards) as training windows: packed, with their boundaries kept.

A sample of n tokens takes n - 1 positions of a window (inputs ``ids[:-1]``, targets ``ids[1:]``, a target
``IGNORE_INDEX`` wherever its token is not trained). Samples are packed into windows of ``seq_len`` positions by
best-fit decreasing (each sample, longest first, goes to the fullest window it still fits in): deterministic, and
little padding. Inside a window each sample's rotary positions restart at 0 and attention is block-diagonal causal,
so no sample sees another: a packed window gives each sample the losses it gives alone. Padding is its own block
(a query attending to nothing would make SDPA's softmax NaN) and trains nothing.

The block mask goes to the model's SDPA path (on CPU our causal kernel takes plain causal windows only); a batch
whose windows each hold one sample needs no mask and keeps the fast causal kernels. Flex attention's block masks
or flash-attn's variable-length kernel would skip the masked blocks' work on GPU: not done yet.

Samples longer than ``seq_len + 1`` tokens are truncated to it or dropped (``data.overlong``), and counted; a
sample left with no trained target is dropped too. Preference pairs are not packed: each window is one pair, its
chosen and rejected samples each padded to ``seq_len`` (a batch of k pairs is 2k rows: the chosen, then the
rejected).
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import numpy as np
import torch

from llama.loss import IGNORE_INDEX
from llama.training.data import INDEX, Batch, ShardError, ShardIndex, open_split

OVERLONG = ("truncate", "drop")


class ChatSamples:
    """A split's samples: token ids and loss mask of each, read with ``pread`` (as ``TokenWindows``)."""

    def __init__(self, index: ShardIndex, split: str):
        self.dtype, self.index_file = index.dtype, index.root / INDEX
        self.shards = open_split(index, split)
        self.masks, starts = [], []
        for shard, entry in zip(self.shards, index.splits[split]["files"]):
            mask_path, offsets_path = (index.root / entry.get(key, "") for key in ("mask", "samples"))
            for path, what in ((mask_path, "mask"), (offsets_path, "samples")):
                if not entry.get(what) or not path.is_file():
                    raise ShardError(f"{self.index_file}: {shard.path.name} has no {what} file; not chat shards "
                                     "written by `llama.prepare --format chat`")
            offsets = np.fromfile(offsets_path, dtype=np.int64)
            if mask_path.stat().st_size != shard.tokens or len(offsets) != entry["documents"] + 1 or (
                    len(offsets) and (offsets[0] != 0 or offsets[-1] != shard.tokens or np.any(np.diff(offsets) < 2))):
                raise ShardError(f"{mask_path} or {offsets_path} does not fit {shard.path} ({shard.tokens} tokens, "
                                 f"{entry['documents']} samples in {self.index_file}): truncated or corrupt")
            self.masks.append(open(mask_path, "rb"))
            starts.append(offsets)
        self.file_of = np.concatenate([np.full(len(o) - 1, f) for f, o in enumerate(starts)]).astype(np.int64)
        self.start = np.concatenate([o[:-1] for o in starts]).astype(np.int64)
        self.lengths = np.concatenate([np.diff(o) for o in starts]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, trained bool) of sample ``i``."""
        f, start, n = int(self.file_of[i]), int(self.start[i]), int(self.lengths[i])
        itemsize = self.dtype.itemsize
        data = os.pread(self.shards[f].file.fileno(), n * itemsize, start * itemsize)
        mask = os.pread(self.masks[f].fileno(), n, start)
        if len(data) < n * itemsize or len(mask) < n:
            raise ShardError(f"shard {self.shards[f].path} or its mask was cut short while training read it")
        return np.frombuffer(data, dtype=self.dtype).astype(np.int64), np.frombuffer(mask, dtype=np.uint8) > 0


@dataclass
class Dropped:
    """What did not fit: samples truncated or dropped for their length, and dropped for training nothing."""

    truncated: int = 0
    too_long: int = 0
    untrained: int = 0


def usable_samples(samples: ChatSamples, seq_len: int, overlong: str) -> tuple[list[int], np.ndarray, Dropped]:
    """(sample numbers kept, their token counts after truncation, what was left out)."""
    if overlong not in OVERLONG:
        raise ValueError(f"data.overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    dropped, kept = Dropped(), []
    lengths = np.minimum(samples.lengths, seq_len + 1)
    for i, n in enumerate(samples.lengths):
        if n > seq_len + 1:
            if overlong == "drop":
                dropped.too_long += 1
                continue
            dropped.truncated += 1
        kept.append(i)
    return kept, lengths, dropped


def trains_something(samples: ChatSamples, i: int, length: int) -> bool:
    return bool(samples[i][1][1:length].any())


def pack(lengths: dict[int, int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: windows (lists of sample numbers) of at most ``seq_len`` positions, a sample of n tokens
    taking n - 1."""
    order = sorted(lengths, key=lambda i: (-lengths[i], i))
    windows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (positions left, window number), sorted
    for i in order:
        need = lengths[i] - 1
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            windows.append([i])
            left, w = seq_len - need, len(windows) - 1
        else:
            left, w = free.pop(at)
            windows[w].append(i)
            left -= need
        if left > 0:
            bisect.insort(free, (left, w))
    return windows


class PackedWindows:
    """Packed windows of a chat split, numbered for ``GlobalOrder``; ``training_batch`` makes their ``Batch``."""

    def __init__(self, index: ShardIndex, split: str, seq_len: int, overlong: str = "truncate"):
        self.samples, self.seq_len = ChatSamples(index, split), seq_len
        kept, lengths, self.dropped = usable_samples(self.samples, seq_len, overlong)
        self.lengths = {}
        for i in kept:
            if trains_something(self.samples, i, int(lengths[i])):
                self.lengths[i] = int(lengths[i])
            else:
                self.dropped.untrained += 1
        if not self.lengths:
            raise ShardError(f"the {split!r} split of {index.root} has no sample with a trained token that fits "
                             f"seq_len {seq_len}")
        self.windows = pack(self.lengths, seq_len)

    def __len__(self) -> int:
        return len(self.windows)

    def training_batch(self, windows) -> Batch:
        rows = [self.window(int(w)) for w in windows]
        inputs, targets, positions, segments = (torch.from_numpy(np.stack(parts)) for parts in zip(*rows))
        if all(len(self.windows[int(w)]) == 1 for w in windows):  # one sample from 0 each: plain causal suffices
            return Batch(inputs, targets)
        return Batch(inputs, targets, positions, block_causal_mask(segments))

    def window(self, w: int) -> tuple[np.ndarray, ...]:
        """inputs, targets, positions and segment (sample number in the window; padding -1) of window ``w``."""
        inputs = np.zeros(self.seq_len, dtype=np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(self.seq_len, dtype=np.int64)
        segments = np.full(self.seq_len, -1, dtype=np.int64)
        at = 0
        for k, i in enumerate(self.windows[w]):
            ids, trained = self.samples[i]
            n = self.lengths[i]
            ids, trained = ids[:n], trained[:n]
            inputs[at : at + n - 1] = ids[:-1]
            targets[at : at + n - 1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
            positions[at : at + n - 1] = np.arange(n - 1)
            segments[at : at + n - 1] = k
            at += n - 1
        positions[at:] = np.arange(self.seq_len - at)
        return inputs, targets, positions, segments


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(bs, 1, seq_len, seq_len) bool from (bs, seq_len) segment numbers: a position attends to the earlier
    positions of its own segment."""
    seq_len = segments.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


class PreferencePairs:
    """A preference split's pairs (samples 2k and 2k + 1: chosen, rejected) as windows of one pair each."""

    def __init__(self, index: ShardIndex, split: str, seq_len: int, overlong: str = "truncate"):
        self.samples, self.seq_len = ChatSamples(index, split), seq_len
        if len(self.samples) % 2:
            raise ShardError(f"the {split!r} split of {index.root} holds {len(self.samples)} samples, not pairs")
        kept, self.lengths, self.dropped = usable_samples(self.samples, seq_len, overlong)
        kept = set(kept)
        self.pairs = []
        for pair in range(len(self.samples) // 2):
            chosen, rejected = 2 * pair, 2 * pair + 1
            if chosen in kept and rejected in kept:
                if all(trains_something(self.samples, i, int(self.lengths[i])) for i in (chosen, rejected)):
                    self.pairs.append(pair)
                else:
                    self.dropped.untrained += 1
        if not self.pairs:
            raise ShardError(f"the {split!r} split of {index.root} has no preference pair that fits seq_len {seq_len}")

    def __len__(self) -> int:
        return len(self.pairs)

    def training_batch(self, windows) -> Batch:
        """2k rows for k pairs: the chosen samples, then the rejected ones, each right-padded."""
        pairs = [self.pairs[int(w)] for w in windows]
        rows = [self.row(2 * p) for p in pairs] + [self.row(2 * p + 1) for p in pairs]
        inputs, targets = (torch.from_numpy(np.stack(parts)) for parts in zip(*rows))
        return Batch(inputs, targets)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids, trained = self.samples[i]
        n = int(self.lengths[i])
        inputs = np.zeros(self.seq_len, dtype=np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        inputs[: n - 1] = ids[: n - 1]
        targets[: n - 1] = np.where(trained[1:n], ids[1:n], IGNORE_INDEX)
        return inputs, targets


def open_samples(index: ShardIndex, split: str, seq_len: int, overlong: str):
    """The split's windows: ``PackedWindows`` for chat shards, ``PreferencePairs`` for preference shards."""
    kind = PreferencePairs if index.format == "preference" else PackedWindows
    return kind(index, split, seq_len, overlong)
