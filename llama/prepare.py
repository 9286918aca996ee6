"""Tokenize a corpus into shards for ``llama.train``.

    python -m llama.prepare --input src/ data/*.jsonl.gz --tokenizer tokenizer.model --output shards/ \
        [--val_fraction 0.01] [--workers 8]

Inputs are text files (one document each), folders (searched recursively for text files, skipping names that
match an ``--exclude`` pattern), glob patterns, ``.jsonl``/``.jsonl.gz`` files (one document per line, in its
``text`` field) and ``.parquet`` files (the ``text`` column; needs pyarrow). Every document is encoded with the tokenizer's own convention (BOS first when the
tokenizer adds one) and ends with EOS, so documents stay separated in the concatenated stream. Every
``1 / val_fraction``-th document goes to the validation split.

The output is deterministic: inputs are sorted and the parallel map keeps their order, so the same inputs give the
same bytes whatever ``--workers``. It is written into a temporary folder, ``index.json`` last, then renamed, so a
folder under the output name is always complete.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import gzip
import json
import math
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama.data import INDEX, TOKENIZER_DIR, ShardError, token_dtype
from tokenizer import load_tokenizer

TEXT_SUFFIXES = {
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java",
    ".js", ".ts", ".sh", ".html", ".css", ".toml", ".yaml", ".yml", ".json",
}


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def expand_inputs(patterns: list[str], exclude: list[str] = ()) -> list[Path]:
    """Every input file, sorted: files as given, folders searched for text/jsonl/parquet files (skipping those
    with a path component matching an ``exclude`` pattern), globs expanded."""
    files = set()
    for pattern in patterns:
        matches = [Path(p) for p in glob.glob(pattern, recursive=True)] or [Path(pattern)]
        for path in matches:
            if path.is_dir():
                files.update(
                    p for p in path.rglob("*")
                    if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".parquet" or is_jsonl(p))
                    and not any(fnmatch.fnmatch(part, x) for part in p.relative_to(path).parts for x in exclude)
                )
            elif path.is_file():
                files.add(path)
            else:
                raise FileNotFoundError(f"input {pattern} matches no file or folder")
    if not files:
        raise FileNotFoundError(f"no input files found in {' '.join(patterns)}")
    return sorted(files)


def read_documents(path: Path):
    """The documents of one input file, as strings."""
    if is_jsonl(path):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ShardError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
                yield text
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ShardError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ShardError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        yield from table.column("text").to_pylist()
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


_tokenizer = None  # one per worker process


def _load_worker_tokenizer(path: str):
    global _tokenizer
    _tokenizer = load_tokenizer(path)


def _encode(text: str) -> list[int]:
    return _tokenizer.encode(text, bos=_tokenizer.add_bos, eos=True)


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
            shard_tokens: int = 100_000_000, exclude: list[str] = ()) -> Path:
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"output {output} already exists; remove it or choose another --output")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    files = expand_inputs(inputs, exclude)
    tok = load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise ShardError(f"tokenizer {tokenizer} has no EOS token to separate documents")
    dtype = token_dtype(tok.vocab_size)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writers = {split: SplitWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")}
        documents = (text for path in files for text in read_documents(path) if text)
        pool = multiprocessing.Pool(workers, _load_worker_tokenizer, (tokenizer,)) if workers > 1 else None
        if pool is None:
            _load_worker_tokenizer(tokenizer)
        try:
            encoded = pool.imap(_encode, documents, chunksize=16) if pool else map(_encode, documents)
            for i, ids in enumerate(tqdm(encoded, desc=f"tokenizing {len(files)} files", unit="doc")):
                writers["val" if is_validation(i, val_fraction) else "train"].write(ids)
        finally:
            if pool is not None:
                pool.terminate()
        for writer in writers.values():
            writer.close()
        splits = {split: writer.summary() for split, writer in writers.items()}
        if splits["train"]["tokens"] == 0:
            raise ShardError(f"no training documents: every input in {' '.join(inputs)} is empty")
        tok.save_pretrained(tmp / TOKENIZER_DIR)
        index = {
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "fingerprint": tok.fingerprint,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "add_bos": tok.add_bos,
            "tokenizer_source": str(tokenizer),
            "input_files": len(files),
            "val_fraction": val_fraction,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "documents": sum(s["documents"] for s in splits.values()),
            "splits": splits,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")  # last: its presence marks a complete folder
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m llama.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files, folders or glob patterns")
    parser.add_argument("--tokenizer", required=True, help="tokenizer file or checkpoint folder")
    parser.add_argument("--output", required=True, help="shard folder to create")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="share of documents held out")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per .bin file at most")
    parser.add_argument("--exclude", nargs="*", default=[], help="skip folder/file names matching these patterns")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.input, args.tokenizer, args.output, args.val_fraction, args.workers, args.shard_tokens,
                      args.exclude)
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        sys.exit(f"llama.prepare: error: {e}")
    index = json.loads((out / INDEX).read_text())
    print(f"{out}: {index['tokens']:,} tokens in {index['documents']:,} documents "
          f"(train {index['splits']['train']['tokens']:,}, val {index['splits']['val']['tokens']:,}), {index['dtype']}")


if __name__ == "__main__":
    main()
