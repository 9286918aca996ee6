"""Writing token shards for training: a corpus (``tokenizer.corpus``) tokenized into ``<split>-NNNNN.bin`` files and
an ``index.json``, which ``llama.training.data`` reads.

Every document is encoded with the tokenizer's own convention (BOS first when the tokenizer adds one) and ends with
EOS, so documents stay separated in the concatenated stream; with a FIM rate, documents are first cut and laid out
for fill-in-the-middle (``llama.training.fim``). Tokens added to the vocabulary (``add_tokens``) are saved with the
shards' tokenizer. Every ``1 / val_fraction``-th document goes to the validation split. The output is
deterministic: inputs are sorted and the parallel map keeps their order (and a document's FIM cut depends on its
number only), so the same inputs give the same bytes whatever ``workers``. It is written atomically
(``llama.files``), ``index.json`` last.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama.files import atomic_folder
from llama.training.data import INDEX, TOKENIZER_DIR, ShardError, token_dtype
from llama.training.fim import FimOptions, encode_document
from tokenizer import load_tokenizer
from tokenizer.corpus import expand_inputs, read_documents

_tokenizer = _fim = None  # one per worker process


def load_with_added_tokens(path: str, add_tokens: list[str] = ()):
    """The tokenizer at ``path``, with ``add_tokens`` added to its vocabulary when there are any."""
    tokenizer = load_tokenizer(path)
    return tokenizer.with_added_tokens(list(add_tokens)) if add_tokens else tokenizer


def _load_worker_tokenizer(path: str, add_tokens: list[str], fim: FimOptions):
    global _tokenizer, _fim
    _tokenizer, _fim = load_with_added_tokens(path, add_tokens), fim


def _encode(numbered: tuple[int, str]) -> tuple[list[int], str | None]:
    """(token ids, "psm", "spm" or None) of document number ``numbered[0]``."""
    ids, split = encode_document(_tokenizer, numbered[1], numbered[0], _fim)
    return ids, None if split is None else ("spm" if split.suffix_first else "psm")


def is_validation(doc_number: int, val_fraction: float) -> bool:
    """Spreads the validation documents evenly: document i is one when floor(i * f) steps up at i + 1."""
    return math.floor((doc_number + 1) * val_fraction) > math.floor(doc_number * val_fraction)


class SplitWriter:
    """Appends token ids to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.files: list[dict] = []
        self.handle = None

    def write(self, ids: list[int]):
        if self.handle is None or self.files[-1]["tokens"] >= self.shard_tokens:
            self.close()
            name = f"{self.split}-{len(self.files):05d}.bin"
            self.files.append({"path": name, "tokens": 0, "documents": 0})
            self.handle = open(self.root / name, "wb")
        np.asarray(ids, dtype=self.dtype).tofile(self.handle)
        self.files[-1]["tokens"] += len(ids)
        self.files[-1]["documents"] += 1

    def close(self):
        if self.handle is not None:
            self.handle.close()

    def summary(self) -> dict:
        return {
            "files": self.files,
            "tokens": sum(f["tokens"] for f in self.files),
            "documents": sum(f["documents"] for f in self.files),
        }


def prepare(inputs: list[str], tokenizer: str, output: str, val_fraction: float = 0.01, workers: int = 1,
            shard_tokens: int = 100_000_000, exclude: list[str] = (), add_tokens: list[str] = (),
            fim: FimOptions = FimOptions()) -> Path:
    """Tokenize ``inputs`` (files, folders, globs, comma lists) with ``tokenizer`` (plus the control tokens
    ``add_tokens``) into the new folder ``output``, transforming documents for fill-in-the-middle as ``fim`` says."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"output {output} already exists; remove it or choose another --output")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1 or shard_tokens < 1:
        raise ValueError(f"--workers and --shard_tokens must be >= 1, got {workers} and {shard_tokens}")
    files = expand_inputs(inputs, exclude)
    base = load_tokenizer(tokenizer)
    tok = base.with_added_tokens(list(add_tokens)) if add_tokens else base
    added = {name: tok.token_id(name) for name in dict.fromkeys(add_tokens) if base.token_id(name) is None}
    if tok.eos_id is None:
        raise ShardError(f"tokenizer {tokenizer} has no EOS token to separate documents")
    fim.check(tok)
    dtype = token_dtype(tok.vocab_size)

    with atomic_folder(output) as tmp:
        writers = {split: SplitWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")}
        documents = enumerate(text for path in files for text in read_documents(path) if text)
        init = (tokenizer, list(add_tokens), fim)
        pool = multiprocessing.Pool(workers, _load_worker_tokenizer, init) if workers > 1 else None
        if pool is None:
            _load_worker_tokenizer(*init)
        layouts = {"psm": 0, "spm": 0}
        try:
            encoded = pool.imap(_encode, documents, chunksize=16) if pool else map(_encode, documents)
            for i, (ids, layout) in enumerate(tqdm(encoded, desc=f"tokenizing {len(files)} files", unit="doc")):
                writers["val" if is_validation(i, val_fraction) else "train"].write(ids)
                if layout:
                    layouts[layout] += 1
        finally:
            if pool is not None:
                pool.terminate()
            for writer in writers.values():
                writer.close()
        splits = {split: writer.summary() for split, writer in writers.items()}
        if splits["train"]["tokens"] == 0:
            raise ShardError(f"no training documents: every input in {' '.join(map(str, inputs))} is empty")
        extra = {}
        if add_tokens:  # the tokens the vocabulary did not have, and their ids
            extra["added_tokens"] = added
        if fim.rate > 0:
            extra["fim"] = {**fim.record(tok), "psm_documents": layouts["psm"], "spm_documents": layouts["spm"]}
        write_index(tmp, tok, tokenizer, len(files), val_fraction, splits, **extra)
    return output


def write_index(folder: Path, tok, tokenizer_source, input_files: int, val_fraction: float, splits: dict, **fields):
    """A shard folder's tokenizer and ``index.json``: what every shard writer records, then its own ``fields``.
    The index is written last: its presence marks a complete folder."""
    tok.save_pretrained(folder / TOKENIZER_DIR)
    index = {
        "dtype": token_dtype(tok.vocab_size).name,
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "add_bos": tok.add_bos,
        "tokenizer_source": str(tokenizer_source),
        "input_files": input_files,
        "val_fraction": val_fraction,
        **fields,
        "tokens": sum(s["tokens"] for s in splits.values()),
        "documents": sum(s["documents"] for s in splits.values()),
        "splits": splits,
    }
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
