"""Training metrics: model FLOPs utilisation and a per-step log (``metrics.jsonl``, TensorBoard when installed)."""

from __future__ import annotations

import json
import resource
import warnings
from pathlib import Path

import torch

from llama.model import ModelArgs

# Dense bf16 peak FLOP/s by device name (torchtitan's table); devices not listed report no MFU.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("A100", 312e12),
)


def flops_per_token(args: ModelArgs, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul parameter plus attention's 12·L·H·Q·T.
    The input embedding is a lookup, not a matmul; a tied model still multiplies by it once as the output."""
    embedding = 0 if args.tie_embeddings else args.vocab_size * args.dim
    return 6 * (n_params - embedding) + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, None on CPU and on GPUs not in the table (their MFU is not reported)."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class MetricsError(ValueError):
    pass


class MetricsLog:
    """One JSON object per step appended to ``<run>/metrics.jsonl`` (rank 0 only), mirrored to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        # Steps after the checkpoint we resume from were logged by the interrupted run; they are redone.
        if self.path.exists():
            kept = [record for record in read_records(self.path) if record["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self):
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_records(Path(run_dir) / "metrics.jsonl")


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``. A last line cut short (its run was killed while writing it) is dropped
    with a warning; any other line that is not a JSON object with a step is refused, naming the file and line."""
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                raise ValueError("not a JSON object with an integer 'step'")
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}:{number}: dropped an incomplete last line (its run stopped while writing it)")
                break
            raise MetricsError(f"{path}:{number}: expected one JSON object with a 'step' per line ({e})") from None
        records.append(record)
    return records
