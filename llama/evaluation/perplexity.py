"""Perplexity: the negative log-likelihood of held-out tokens, with a sliding window for texts longer than the
context.

Hugging Face's scheme for fixed-length models: every token after the first is scored exactly once, by a window of
at most ``max_length`` input tokens that advances ``stride`` tokens at a time, so each scored token sees at least
``max_length - stride + 1`` tokens of context (all that came before it, near the start). ``stride = max_length``
gives back-to-back windows (lm-eval's rolling log-likelihood); a smaller stride costs ``max_length / stride`` times
the compute and gives the model more context. The losses are per-token chunked cross-entropy (``llama.loss``):
positions that are context only carry ``IGNORE_INDEX`` and never reach the output projection.

Bits per byte divide the summed NLL, in bits, by the UTF-8 bytes of the scored text, which compares models whose
tokenizers differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llama.loss import IGNORE_INDEX
from llama.model import Transformer
from llama.training.data import ShardError, open_split, read_index
from tokenizer.corpus import expand_inputs, read_documents


@dataclass(frozen=True)
class Window:
    """Tokens scored in one forward: the model reads ``tokens[:-1]`` and the last ``scored`` of ``tokens`` are the
    targets, each predicted from the window's tokens before it."""

    tokens: Sequence[int]
    scored: int


@dataclass
class Perplexity:
    nll: float  # summed negative log-likelihood of the scored tokens, in nats
    tokens: int  # scored tokens
    bytes: int | None = None  # UTF-8 bytes of the scored text, when known
    windows: int = 0
    documents: int = 0

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.bytes else self.nll / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return {
            "documents": self.documents, "windows": self.windows, "tokens": self.tokens, "bytes": self.bytes,
            "nll": self.nll, "nll_per_token": self.nll_per_token, "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def sliding_windows(tokens: Sequence[int], max_length: int, stride: int | None = None) -> Iterator[Window]:
    """Windows over ``tokens`` that score every token but the first exactly once (the first is context only),
    each reading at most ``max_length`` tokens; ``stride`` (default ``max_length``) new tokens per window."""
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    scored_until = 1  # tokens[:scored_until] are scored or context only
    end = min(max_length + 1, len(tokens))
    while scored_until < len(tokens):
        yield Window(tokens[max(0, end - max_length - 1) : end], end - scored_until)
        scored_until, end = end, min(end + stride, len(tokens))


def document_tokens(tokenizer, text: str) -> list[int]:
    """A document's tokens with a first token that is context only, so that all of the text is scored: BOS when
    the vocabulary has one, else EOS (as lm-eval's rolling log-likelihood does)."""
    first = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if first is None:
        raise ValueError(f"tokenizer {tokenizer.source} has neither BOS nor EOS to start a document with")
    return [first] + tokenizer.encode(text)


def text_windows(tokenizer, inputs: str | Iterable[str], max_length: int, stride: int | None = None):
    """(windows, scored bytes, documents) of text inputs (files, folders, globs, comma lists: ``tokenizer.corpus``),
    each document scored whole."""
    windows, n_bytes, documents = [], 0, 0
    for path in expand_inputs(inputs):
        for text in read_documents(path):
            if text:
                windows += sliding_windows(document_tokens(tokenizer, text), max_length, stride)
                n_bytes += len(text.encode("utf-8"))
                documents += 1
    return windows, n_bytes, documents


def shard_windows(tokenizer, root: str | Path, split: str, max_length: int, stride: int | None = None):
    """(windows, scored bytes, documents) of a split of ``llama.prepare``'s shards, each file one token stream
    (its documents separated by EOS); the shards must have been made with ``tokenizer``."""
    index = read_index(root)
    if index.fingerprint != tokenizer.fingerprint:
        raise ShardError(
            f"{index.root} was tokenized with another vocabulary than the model's tokenizer {tokenizer.source} "
            "(fingerprints differ); prepare the data with the model's tokenizer"
        )
    windows, n_bytes = [], 0
    for shard in open_split(index, split):
        with shard.file:  # read whole: windows are slices of it
            stream = np.fromfile(shard.file, dtype=index.dtype, count=shard.tokens)
        windows += sliding_windows(stream, max_length, stride)
        n_bytes += text_bytes(tokenizer, stream[1:])
    return windows, n_bytes, index.splits[split]["documents"]


def text_bytes(tokenizer, ids: np.ndarray) -> int:
    """UTF-8 bytes of the text that ``ids`` spell, control tokens (BOS, EOS) left out; decoded one document (up to
    an EOS) at a time, so no character is split."""
    control = np.array(sorted(tokenizer.special_tokens.values()), dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    ends = np.flatnonzero(ids == tokenizer.eos_id) + 1 if tokenizer.eos_id is not None else []
    total = 0
    for document in np.split(ids, ends):
        text_ids = document[~np.isin(document, control)]
        total += len(tokenizer.decode(text_ids.tolist()).encode("utf-8"))
    return total


@torch.inference_mode()
def window_nlls(
    model: Transformer, windows: Sequence[Window], batch_size: int = 8, progress: bool = False
) -> list[float]:
    """Summed NLL (nats) of each window's scored tokens, in the order given. Windows are batched longest first
    (little padding); the loss is the model's chunked per-token cross-entropy, in fp32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.tok_embeddings.weight.device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
    nlls = [0.0] * len(windows)
    bar = tqdm(total=sum(w.scored for w in windows), unit="tok", desc="scoring", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = [windows[i] for i in order[start : start + batch_size]]
        width = max(len(w.tokens) for w in batch) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, window in enumerate(batch):
            tokens = torch.as_tensor(np.asarray(window.tokens, dtype=np.int64))
            n = len(tokens) - 1
            inputs[row, :n] = tokens[:-1]
            targets[row, n - window.scored : n] = tokens[n + 1 - window.scored :]
        losses = model(inputs.to(device), targets=targets.to(device), reduction="none")  # (batch, width), 0 if ignored
        for i, nll in zip(order[start : start + batch_size], losses.double().sum(dim=1).tolist()):
            nlls[i] = nll
        bar.update(sum(w.scored for w in batch))
    bar.close()
    return nlls


def evaluate_perplexity(
    model: Transformer, windows: Sequence[Window], *, batch_size: int = 8, n_bytes: int | None = None,
    documents: int = 0, progress: bool = False,
) -> Perplexity:
    """The perplexity of ``model`` over ``windows`` (``sliding_windows``, ``text_windows``, ``shard_windows``);
    ``n_bytes``, the UTF-8 bytes of the scored text, gives bits per byte. A trainer can call this on its model
    between steps (it runs under ``torch.inference_mode``; put the model in eval mode first)."""
    if not windows:
        raise ValueError("no tokens to score: the data is empty")
    nll = math.fsum(window_nlls(model, windows, batch_size, progress))
    return Perplexity(nll, sum(w.scored for w in windows), n_bytes, len(windows), documents)
