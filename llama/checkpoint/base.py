"""What the format modules share: the error types and the checks of a checkpoint's metadata."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llama.files import atomic_folder, check_writable
from llama.model import ModelArgs


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and what was expected."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


class CheckpointExistsError(CheckpointError, FileExistsError):
    pass


@contextmanager
def checkpoint_folder(out_dir, replace: bool = False) -> Iterator[Path]:
    """``llama.files.atomic_folder`` for a checkpoint writer: a non-empty ``out_dir`` is refused (unless
    ``replace``) before anything is written."""
    try:
        check_writable(Path(out_dir), replace)
    except FileExistsError as e:
        raise CheckpointExistsError(str(e)) from None
    with atomic_folder(out_dir, replace=replace) as tmp:
        yield tmp


def read_json(file: Path) -> dict:
    """The JSON object in ``file``; anything else (not JSON, a list, unreadable) is an error naming the file."""
    if not file.exists():
        raise CheckpointNotFoundError(f"{file}: file not found")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object {{...}}, got a {type(data).__name__}")
    return data


def check_readable(file: Path) -> None:
    """Some readers report an unreadable file as a missing one (safetensors says "No such file"): open it first."""
    try:
        with open(file, "rb"):
            pass
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror})") from None


def make_args(file: Path, **kwargs) -> ModelArgs:
    try:
        return ModelArgs(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: inconsistent model configuration ({e})") from None


def cpu_state_dict(model, dtype, progress: bool) -> dict:
    """The model's tensors on the CPU in ``dtype``, contiguous, ready to be written."""
    from tqdm import tqdm

    tensors = tqdm(model.state_dict().items(), desc="converting", unit="tensor", disable=not progress)
    return {name: t.detach().to(device="cpu", dtype=dtype).contiguous() for name, t in tensors}
