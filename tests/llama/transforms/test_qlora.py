"""QLoRA's frozen quantised base: each quantised linear's forward against a float matmul by its own dequantised
weight (the documented tolerance), its input gradient, NF4 against bitsandbytes, and LoRA training over it."""

import pytest
import torch
import torch.nn.functional as F

from llama.model import ModelArgs, Transformer
from llama.transforms.lora import apply_lora, lora_layers, quantize_base, target_modules
from llama.transforms.nf4 import NF4_LEVELS, NF4Linear, nf4_dequantize, nf4_quantize
from llama.transforms.quantize import Int4Linear, Int8Linear

KINDS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}
# Documented in README (QLoRA): from 32 rows on (training) the forward is a float matmul by the dequantised weight;
# below that our AVX2 kernels round activations to int16 per group of 32, off by <= 1e-4 of the output's range.
SMALL_BATCH_TOLERANCE = 1e-4


@pytest.fixture
def weight():
    return torch.randn(256, 512) * 0.05


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [4, 64])
def test_forward_within_the_documented_tolerance_of_the_dequantised_weight(kind, rows, weight):
    layer = KINDS[kind](weight)
    x = torch.randn(rows, 512)
    with torch.no_grad():
        out, expected = layer(x), F.linear(x, layer.dequantize())
    error = ((out - expected).abs().max() / expected.abs().max()).item()
    assert error <= (1e-6 if rows >= 32 else SMALL_BATCH_TOLERANCE), error
    assert (layer.dequantize() - weight).abs().max() < 0.15 * weight.abs().max()  # it does stand for the weight


@pytest.mark.parametrize("kind", KINDS)
def test_input_gradient_is_the_dequantised_weights(kind, weight):
    layer = KINDS[kind](weight)
    x = torch.randn(3, 40, 512, requires_grad=True)
    grad_out = torch.randn(3, 40, 256)
    layer(x).backward(grad_out)
    expected = grad_out @ layer.dequantize()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_nf4_equals_bitsandbytes(weight):
    functional = pytest.importorskip("bitsandbytes.functional")
    packed, absmax = nf4_quantize(weight, 64)
    theirs, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(state.code, torch.tensor(NF4_LEVELS))
    assert torch.equal(packed, theirs.flatten()) and torch.equal(absmax, state.absmax)
    torch.testing.assert_close(nf4_dequantize(packed, absmax, weight.shape),
                               functional.dequantize_4bit(theirs, state, quant_type="nf4"), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_over_a_quantised_base_trains_only_the_adapters(kind):
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=64, max_seq_len=64))
    model.init_weights(seed=0)
    quantize_base(model, kind)
    apply_lora(model, target_modules(model, ["q", "v", "up", "down"]), rank=4, alpha=8)
    frozen = {name: b.clone() for name, b in model.named_buffers() if "weight" in name}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    tokens = torch.randint(0, 128, (4, 33))
    losses = []
    for _ in range(8):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(b, frozen[name]) for name, b in model.named_buffers() if name in frozen)
    assert {type(layer.base) for _, layer in lora_layers(model)} == {KINDS[kind]} or kind == "int4"
