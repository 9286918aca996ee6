"""llama.metrics: the FLOP count behind MFU and the table of GPU peaks."""

import pytest

from llama.training.metrics import flops_per_token, peak_flops_of
from llama.model import ModelArgs, Transformer


def test_flops_per_token_counts_matmul_parameters_and_attention():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=100)
    n_params = sum(p.numel() for p in Transformer(args).parameters())
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * args.hidden_dim + 2 * 64  # wq wo, wk wv, ffn, norms
    matmul_params = 2 * per_layer + 64 + 100 * 64  # blocks, final norm, output (the input embedding is a lookup)
    attention = 12 * 2 * 4 * 16 * 128  # 12 · layers · heads · head_dim · seq_len
    assert flops_per_token(args, n_params, seq_len=128) == 6 * matmul_params + attention
    tied = ModelArgs(**{**args.__dict__, "tie_embeddings": True})
    n_tied = sum(p.numel() for p in Transformer(tied).parameters())
    assert flops_per_token(tied, n_tied, seq_len=128) == 6 * matmul_params + attention  # same matmuls


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None),
])
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops_of(name) == peak
