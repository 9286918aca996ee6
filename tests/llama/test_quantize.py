import pytest
import torch

from llama.model import ModelArgs, Transformer
from llama.quantize import Int4Linear, Int8Linear, quantize_weights

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=256, max_seq_len=64)


def test_int8_linear_is_the_matmul_with_the_dequantised_weight():
    linear = torch.nn.Linear(96, 40, bias=False)
    q = Int8Linear(linear.weight)
    dequantised = q.weight.float() * q.scales[:, None]
    x = torch.randn(3, 5, 96)
    # activations enter the CPU kernel as bf16 (8 mantissa bits)
    torch.testing.assert_close(q(x), x @ dequantised.T, rtol=2e-2, atol=2e-2)
    # each weight is off by at most half a step of its channel's scale
    assert torch.all((dequantised - linear.weight).abs() <= q.scales.float()[:, None] * 0.5 + 1e-7)


def test_quantised_model_stays_close_to_float():
    model = Transformer(ARGS).eval()
    model.init_weights(seed=0)
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        reference = model(tokens).log_softmax(-1)
        quantised = quantize_weights(model)(tokens).log_softmax(-1)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 7 + 1
    assert (quantised - reference).abs().mean() < 5e-3


def q4_1_weight(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A weight on GGUF Q4_1's grid: per group of 32, d * q + m with q in 0..15 and both ends used; d and m are
    power-of-two fractions, so they and the kernels' zero point m + 8d are exact in bf16."""
    q = torch.randint(0, 16, (out_features, in_features // 32, 32), generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15
    d = 2.0 ** -torch.randint(4, 8, (out_features, in_features // 32, 1), generator=generator).float()
    m = d * torch.randint(-12, -3, d.shape, generator=generator).float()
    return (d * q + m).reshape(out_features, in_features)


def test_int4_linear_reproduces_a_q4_1_weight_exactly():
    generator = torch.Generator().manual_seed(0)
    weight = q4_1_weight(48, 128, generator)
    x = torch.randn(3, 5, 128, generator=generator)
    expected = x.bfloat16().float() @ weight.T  # activations enter the kernel as bf16; the weight is exact
    torch.testing.assert_close(Int4Linear(weight)(x), expected, rtol=1e-2, atol=1e-2)


def test_int4_linear_error_is_within_half_a_step_per_weight():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator)
    x = torch.randn(4, 256, generator=generator).bfloat16().float()
    groups = weight.reshape(64, 8, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)  # (64, 256)
    bound = (x.abs() @ (step / 2).T) * 1.02 + 0.05  # + bf16 rounding of scales, zero points and output
    error = (Int4Linear(weight)(x) - x @ weight.T).abs()
    assert torch.all(error <= bound)
    assert error.mean() > 0.01 * bound.mean()  # the bound is not vacuous: 4 bits do cost something


def test_int4_leaves_shapes_its_kernels_cannot_take_in_int8():
    model = quantize_weights(Transformer(ModelArgs(**{**ARGS.__dict__, "n_kv_heads": 1, "head_dim": 8})), "int4")
    attention = model.layers[0].attention  # wk and wv have 8 output rows: the CPU kernel needs multiples of 16
    assert isinstance(attention.wq, Int4Linear) and isinstance(model.layers[0].feed_forward.w2, Int4Linear)
    assert isinstance(attention.wk, Int8Linear) and isinstance(attention.wv, Int8Linear)
    assert isinstance(model.output, Int8Linear)
    with pytest.raises(ValueError, match=r"int4 kernels cannot take a \(8, 128\) weight with groups of 32"):
        Int4Linear(torch.zeros(8, 128))


def test_unknown_quantisation_is_refused():
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_weights(Transformer(ARGS), "int3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the tinygemm int4 kernel)")
def test_int4_linear_on_cuda_reproduces_a_q4_1_weight():
    generator = torch.Generator().manual_seed(0)
    weight = q4_1_weight(64, 256, generator)
    x = torch.randn(3, 256, generator=generator)
    expected = x.bfloat16().float() @ weight.T
    out = Int4Linear(weight.cuda().bfloat16())(x.cuda().bfloat16())
    torch.testing.assert_close(out.float().cpu(), expected, rtol=1e-2, atol=1e-2)

def test_tied_output_gets_an_int8_copy_and_embedding_stays_float():
    model = quantize_weights(Transformer(ModelArgs(**{**ARGS.__dict__, "tie_embeddings": True})))
    assert isinstance(model.output, Int8Linear)
    assert model.tok_embeddings.weight.dtype == torch.float32


# The documented quality cost on the real model (README): on these chat prompts, the quantised model's top token
# agrees with fp32's at >= 95% of positions, and fp32's top token loses <= 0.1 nats of logprob on average.
# Measured over 183 positions: int8 96.7% agreement, 0.055 mean |Δ logprob| (0.26 max); int4 98.4%, 0.043 (0.14
# max). int4 is the closer of the two here because SmolLM2's GGUF stores its blocks as Q4_1, which int4 with
# groups of 32 reproduces.
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain gravity to a child.",
    "List three colors.",
    "def fibonacci(n):",
]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quality_cost_on_smollm2(smollm2_gguf_path, method):
    from llama.checkpoint import load_model
    from tokenizer import encode_dialog, load_tokenizer

    tok = load_tokenizer(smollm2_gguf_path)
    model = load_model(smollm2_gguf_path)
    batches = [torch.tensor([encode_dialog(tok, [{"role": "user", "content": p}])]) for p in PROMPTS]
    with torch.no_grad():
        reference = [model(ids).log_softmax(-1) for ids in batches]
        quantize_weights(model, method)
        quantised = [model(ids).log_softmax(-1) for ids in batches]
    top = [r.argmax(-1, keepdim=True) for r in reference]
    agreement = torch.cat([(q.argmax(-1, keepdim=True) == t).flatten() for q, t in zip(quantised, top)])
    delta = torch.cat([(r.gather(-1, t) - q.gather(-1, t)).abs().flatten() for r, q, t in zip(reference, quantised, top)])
    assert agreement.float().mean() >= 0.95
    assert delta.mean() <= 0.1


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantising_twice_changes_nothing(method):
    model = Transformer(ARGS).eval()
    model.init_weights(seed=0)
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        once = quantize_weights(model, method)(tokens)
        twice = quantize_weights(model, method)(tokens)
    torch.testing.assert_close(twice, once, rtol=0, atol=0)
