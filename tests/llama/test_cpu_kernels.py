import os
import subprocess
import sys

import pytest

# A fresh process: whether the kernels are available is decided once per process.
PROBE = """
import torch
from llama import cpu_kernels
from llama.quantize import Int4Linear
linear = Int4Linear(torch.randn(48, 64))
print(cpu_kernels.available(), linear.ours, tuple(linear(torch.randn(2, 64)).shape))
"""


def probe(tmp_path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "build"), **env}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)


def test_a_failed_build_falls_back_to_pytorchs_kernels_with_a_warning(tmp_path):
    result = probe(tmp_path, CXX="/bin/false")  # a compiler that always fails
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "(2,", "48)"]
    assert "could not build" in result.stderr and "cpu_kernels.cpp" in result.stderr


def test_kernels_can_be_switched_off(tmp_path):
    result = probe(tmp_path, LLAMA_ONE_CPU_KERNELS="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "(2,", "48)"]
    assert not (tmp_path / "build").exists()  # nothing was built


def test_the_kernels_build_from_source(tmp_path):
    import torch

    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("the kernels need an x86 CPU with AVX2")
    result = probe(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "(2,", "48)"]
