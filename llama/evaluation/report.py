"""What every evaluation writes: a Markdown table on stdout and a JSON file (by default under ``runs/eval/``)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

RUNS = Path("runs/eval")


def default_output(kind: str, checkpoint: str | os.PathLike) -> Path:
    """runs/eval/<kind>-<checkpoint name>-<utc time>.json"""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return RUNS / f"{kind}-{Path(checkpoint).name.removesuffix('.gguf')}-{stamp}.json"


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """Write ``result`` to ``path`` whole or not at all (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
    return "—" if value is None else str(value)
