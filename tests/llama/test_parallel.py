import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")


def test_two_process_tensor_parallel_equals_one_process(tmp_path):
    single, parallel = tmp_path / "single.pt", tmp_path / "parallel.pt"
    subprocess.run([sys.executable, WORKER, single], check=True)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, parallel],
        check=True,
    )
    one, two = torch.load(single), torch.load(parallel)
    assert torch.equal(one["tokens"], two["tokens"])
    torch.testing.assert_close(two["logits"], one["logits"], rtol=1e-5, atol=1e-5)
