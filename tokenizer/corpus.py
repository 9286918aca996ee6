"""Text corpora as the commands read them (``python -m tokenizer.train``, ``python -m llama.prepare``): every input
is a file, a folder (searched recursively for text, ``.jsonl``/``.jsonl.gz`` and ``.parquet`` files), a glob
pattern, or a comma-separated list of those; a document is a whole text file, the ``text`` field of a JSON line,
or the ``text`` column of a parquet row."""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizer.base import check_text

TEXT_SUFFIXES = {
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java",
    ".js", ".ts", ".sh", ".html", ".css", ".toml", ".yaml", ".yml", ".json",
}


class CorpusError(ValueError):
    """An input that cannot be read as documents; the message names the file (and line)."""


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def is_document_file(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or path.suffix == ".parquet" or is_jsonl(path)


def expand_inputs(inputs: str | Iterable[str], exclude: Iterable[str] = ()) -> list[Path]:
    """Every input file, sorted: files as given, folders searched for document files (skipping those with a path
    component matching an ``exclude`` pattern), globs expanded; each input may be a comma-separated list."""
    patterns = [inputs] if isinstance(inputs, str) else list(inputs)
    names = [name for pattern in patterns for name in str(pattern).split(",") if name]
    exclude = list(exclude)
    files = set()
    for name in names:
        matches = [Path(p) for p in glob.glob(name, recursive=True)] or [Path(name)]
        for path in matches:
            if path.is_dir():
                files.update(
                    p for p in path.rglob("*")
                    if p.is_file() and is_document_file(p)
                    and not any(fnmatch.fnmatch(part, x) for part in p.relative_to(path).parts for x in exclude)
                )
            elif path.is_file():
                files.add(path)
            else:
                raise FileNotFoundError(f"input {name} matches no file or folder")
    if not files:
        raise FileNotFoundError(f"no input files found in {' '.join(names) or '(no inputs given)'}")
    return sorted(files)


def read_documents(path: Path) -> Iterator[str]:
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
                    raise CorpusError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
                try:
                    check_text(text)  # "\ud800" is valid JSON, and not text
                except (TypeError, ValueError) as e:
                    raise CorpusError(f"{path}:{lineno}: 'text': {e}") from None
                yield text
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CorpusError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CorpusError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        yield from table.column("text").to_pylist()
    else:
        yield path.read_text(encoding="utf-8", errors="replace")
