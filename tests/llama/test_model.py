"""The model on its own: construction, init and the KV-cache path. Parity with transformers lives in
test_checkpoint.py, where HF weights are loaded through the readers."""

import pytest
import torch

import llama.model
from llama.kernels import cpu as cpu_kernels
from llama.model import ModelArgs, Transformer, ffn_hidden_dim

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64)


def test_ffn_width_follows_metas_rule():
    assert ffn_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672  # Llama 3 70B


def test_defaults_are_resolved():
    args = ModelArgs(dim=64, n_heads=8, vocab_size=10)
    assert (args.n_kv_heads, args.head_dim, args.hidden_dim) == (8, 8, 256)


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=6, n_kv_heads=4, vocab_size=10)


def test_meta_device_construction_then_materialise():
    with torch.device("meta"):
        model = Transformer(ModelArgs(**TINY))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    reference = Transformer(ModelArgs(**TINY))
    reference.init_weights(seed=0)
    tokens = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=0)


def test_init_scales_residual_projections():
    model = Transformer(ModelArgs(**{**TINY, "dim": 256, "n_layers": 8}))
    model.init_weights(seed=0)
    wq_std = model.layers[0].attention.wq.weight.std().item()
    wo_std = model.layers[0].attention.wo.weight.std().item()
    assert wq_std == pytest.approx(0.02 * 0.987, rel=0.05)  # truncation at 3 sigma shrinks the std by ~1.3%
    assert wo_std == pytest.approx(wq_std / 4, rel=0.05)  # 1/sqrt(2 * 8)
    assert torch.all(model.norm.weight == 1)


def test_tied_model_has_no_output_projection():
    model = Transformer(ModelArgs(**TINY, tie_embeddings=True))
    assert "output.weight" not in model.state_dict()


@pytest.mark.parametrize("n_kv_heads, head_dim", [(4, None), (2, None), (1, None), (2, 64)])
def test_cached_prefill_and_decode_equal_full_forward(n_kv_heads, head_dim):
    # head_dim 64 takes our CPU decode-attention kernel where it is built, the others SDPA
    model = Transformer(ModelArgs(**{**TINY, "n_kv_heads": n_kv_heads, "head_dim": head_dim})).eval()
    tokens = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(max_batch_size=4, max_seq_len=32)
        assert model.layers[0].attention.kv_cache.decode_kernel == (head_dim == 64 and cpu_kernels.available())
        steps = [model(tokens[:, :12], input_pos=torch.arange(12))]
        steps += [model(tokens[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_an_fp32_cpu_model_trains_through_our_attention_kernel_with_sdpas_gradients(monkeypatch):
    if not cpu_kernels.causal_attention_available():
        pytest.skip("the kernels need an x86 CPU with AVX2, a C++ compiler and PyTorch's BLAS")
    model = Transformer(ModelArgs(**TINY))
    model.init_weights(seed=0)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    calls = []
    kernel = cpu_kernels.causal_attention
    monkeypatch.setattr(cpu_kernels, "causal_attention", lambda *qkv: calls.append(1) or kernel(*qkv))
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    ours = {name: p.grad for name, p in model.named_parameters()}
    assert len(calls) == TINY["n_layers"]
    model.zero_grad()
    monkeypatch.setattr(cpu_kernels, "causal_attention_available", lambda: False)  # SDPA
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    assert len(calls) == TINY["n_layers"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("head_dim", [None, 64])
def test_rows_at_different_positions_share_a_step_and_give_their_own_logits(head_dim):
    # rows of 9, 4 and 6 tokens prefilled together (right-padded: padding writes only past each row's content),
    # then decoded together, each one token at its own position; head_dim 64 takes our decode kernel
    model = Transformer(ModelArgs(**{**TINY, "head_dim": head_dim})).eval()
    lengths = [9, 4, 6]
    rows = [torch.randint(0, 128, (1, n + 3)) for n in lengths]
    with torch.no_grad():
        alone = [model(row) for row in rows]
        model.setup_caches(max_batch_size=3, max_seq_len=32)
        prompt = torch.zeros(3, max(lengths), dtype=torch.long)
        for i, n in enumerate(lengths):
            prompt[i, :n] = rows[i][0, :n]
        input_pos = torch.arange(max(lengths)).expand(3, -1)
        prefill = model(prompt, input_pos=input_pos, logits_at=torch.tensor(lengths) - 1)  # (3, 1, vocab)
        steps = [prefill]
        for t in range(3):
            tokens = torch.stack([row[0, n + t] for row, n in zip(rows, lengths)])[:, None]
            steps.append(model(tokens, input_pos=torch.tensor(lengths)[:, None] + t))
    for i, n in enumerate(lengths):
        ours = torch.cat([step[i, -1:] for step in steps])  # the logits after tokens n-1 .. n+2
        torch.testing.assert_close(ours, alone[i][0, n - 1 : n + 3], rtol=1e-5, atol=1e-5)


def test_cache_rows_put_a_sequence_in_any_slot():
    model = Transformer(ModelArgs(**TINY)).eval()
    tokens = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        alone = model(tokens)
        model.setup_caches(max_batch_size=4, max_seq_len=32)
        slot = torch.tensor([2])
        steps = [model(tokens[:, :7], input_pos=torch.arange(7), cache_rows=slot)]
        steps += [model(tokens[:, i : i + 1], input_pos=torch.tensor([i]), cache_rows=slot) for i in range(7, 10)]
        assert not model.layers[0].attention.kv_cache.k[:2].any()  # the other slots are untouched
    torch.testing.assert_close(torch.cat(steps, dim=1), alone, rtol=1e-5, atol=1e-5)


def test_cache_longer_than_context_is_refused():
    model = Transformer(ModelArgs(**TINY))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.setup_caches(1, 65)


def test_logits_at_gives_those_positions_logits():
    model = Transformer(ModelArgs(**TINY)).eval()
    tokens = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        # the same numbers up to matmul rounding (one row vs many take different BLAS paths)
        torch.testing.assert_close(model(tokens, logits_at=torch.tensor([8, 8])), full[:, -1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(tokens, logits_at=torch.tensor([3, 6])), full[[0, 1], [3, 6], None],
                                   rtol=1e-5, atol=1e-5)
        several = torch.tensor([[0, 3, 3], [8, 1, 5]])  # k positions per row, in any order, repeats allowed
        torch.testing.assert_close(model(tokens, logits_at=several), full[torch.arange(2)[:, None], several],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() and llama.model.flash_attn_func is not None),
                    reason="needs CUDA and the optional flash-attn package")
def test_flash_attn_gives_sdpas_logits_within_bf16_tolerance(monkeypatch):
    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, max_seq_len=128)
    with torch.device("cuda"):
        model = Transformer(args).to(torch.bfloat16)
    model.init_weights(seed=0)
    tokens = torch.randint(512, (2, 100), device="cuda")
    with torch.no_grad():
        flash = model(tokens).float()
        monkeypatch.setattr(llama.model, "flash_attn_func", None)  # the SDPA path
        sdpa = model(tokens).float()
    torch.testing.assert_close(flash, sdpa, rtol=2e-2, atol=2e-2)
