"""What every benchmark shares: the machine description, timing, and the JSON result file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds taken by ``fn()``, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed_in_turns(fns: dict, rounds: int, device: torch.device) -> dict[object, list[float]]:
    """Seconds of each ``fns[key]()`` per round, the functions taking turns within each round, so that load from
    other processes on a shared machine falls on all of them alike."""
    seconds = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            seconds[key].append(timed(fn, device))
    return seconds


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Achievable GPU memory bandwidth in bytes/s, from a large device-to-device copy (read + write)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = min(timed(lambda: dst.copy_(src), device) for _ in range(10))
    return 2 * nbytes / seconds


def write_result(name: str, device: torch.device, rows: list[dict], out_dir: str | Path | None = None,
                 **extra) -> Path:
    """Write <out_dir or bench/results>/<name>-<device>-<utc time>.json and return its path."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:  # no git on the machine (a bare GPU image): the result is still written
        commit = None
    result = {
        "benchmark": name,
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": commit,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()),  # 1, 5, 15 min: other work on the machine skews the timings
        **extra,
        "rows": rows,
    }
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = out_dir / f"{name}-{device.type}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def linear_matmul_floor_s(model, tokens: int, dtype: torch.dtype, device: torch.device, frozen: bool = False) -> float:
    """Seconds one training step's linear-layer matmuls take on their own: for each weight (out, in), the forward
    x @ W.T, the input's gradient g @ W and, unless the weights are ``frozen`` (LoRA's base), the weight's gradient
    g.T @ x over ``tokens`` rows (best of 3). A step takes at least this long with these matmuls."""
    shapes = Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))
    if model.output is None:  # tied: the output projection multiplies by the embedding
        shapes[tuple(model.tok_embeddings.weight.shape)] += 1
    total = 0.0
    for (out_features, in_features), count in shapes.items():
        x = torch.randn(tokens, in_features, dtype=dtype, device=device)
        weight = torch.randn(out_features, in_features, dtype=dtype, device=device)
        grad = torch.randn(tokens, out_features, dtype=dtype, device=device)
        if frozen:
            matmuls = lambda: (F.linear(x, weight), grad @ weight)  # noqa: E731
        else:
            matmuls = lambda: (F.linear(x, weight), grad @ weight, grad.t() @ x)  # noqa: E731
        matmuls()
        total += count * min(timed(matmuls, device) for _ in range(3))
    return total


def real_text(min_chars: int) -> str:
    """Text of the Python standard library's modules, in a fixed order, at least ``min_chars`` long."""
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="replace")
        parts.append(text)
        size += len(text)
        if size >= min_chars:
            break
    return "\n".join(parts)
