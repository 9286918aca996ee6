"""LoRA against peft on the same tiny random base (our HF export of it) and the same A and B: logits and the
gradients of A and B in fp32, merged weights, and adapters moving both ways between peft's files and ours."""

import copy
import json
import math

import pytest
import torch

from llama.checkpoint import load_model, save_hf
from llama.checkpoint.base import CheckpointError
from llama.model import ModelArgs, Transformer
from llama.transforms.lora import (
    LoRALinear, adapters_disabled, apply_lora, load_adapter, lora_layers, merge_lora, peft_module_name,
    save_adapter, target_modules,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)
HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama and its HF export."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(std=0.1, seed=0)
    folder = save_hf(model, tmp_path_factory.mktemp("lora") / "base")
    return folder


def ours_with_adapters(folder, targets, **options):
    model = load_model(folder, dtype=torch.float32)
    apply_lora(model, target_modules(model, targets), **options)
    torch.manual_seed(1)
    for _, layer in lora_layers(model):  # B non-zero, so the adapters do something
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model


def peft_model(folder, targets, rank, alpha, **options):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=[HF_TARGETS[t] for t in targets], **options)
    return peft.get_peft_model(hf, config)


def copy_adapters_into_peft(ours, theirs):
    """Our A, B (and DoRA magnitudes) into peft's modules of the same names."""
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            target = modules[peft_module_name(name)]
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)
            if layer.magnitude is not None:
                target.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)


@pytest.mark.parametrize("targets,options", [
    (("q", "k", "v", "o", "gate", "up", "down"), {}),
    (("q", "v"), {"rslora": True}),
    (("k", "o", "down"), {"dora": True}),
])
def test_logits_and_adapter_gradients_equal_peft(base, targets, options):
    rank, alpha = 4, 8.0
    ours = ours_with_adapters(base, targets, rank=rank, alpha=alpha, **options)
    theirs = peft_model(base, targets, rank, alpha, use_rslora=options.get("rslora", False),
                        use_dora=options.get("dora", False))
    copy_adapters_into_peft(ours, theirs)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 24))
    ours.train(), theirs.train()
    ours_logits, their_logits = ours(tokens), theirs(input_ids=tokens).logits
    assert (ours_logits - their_logits).abs().max().item() < 1e-5
    targets = torch.randint(0, ARGS.vocab_size, tokens.shape)
    for logits in (ours_logits, their_logits):
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    modules = dict(theirs.named_modules())
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_B") or n.endswith("magnitude")
                             for n in trainable)
    for name, layer in lora_layers(ours):
        target = modules[peft_module_name(name)]
        for mine, peer in ((layer.lora_A.weight, target.lora_A["default"].weight),
                           (layer.lora_B.weight, target.lora_B["default"].weight)):
            torch.testing.assert_close(mine.grad, peer.grad, rtol=0, atol=1e-5)
        if layer.magnitude is not None:
            torch.testing.assert_close(layer.magnitude.grad, target.lora_magnitude_vector["default"].weight.grad,
                                       rtol=0, atol=1e-5)
        assert layer.base.weight.grad is None  # the base is frozen


def test_init_is_peft_s():
    layer = LoRALinear(torch.nn.Linear(64, 32, bias=False), rank=8, alpha=16)
    assert layer.scaling == 2.0 and LoRALinear(torch.nn.Linear(64, 32), 16, 16, rslora=True).scaling == 4.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0  # a fresh adapter changes nothing
    bound = 1 / math.sqrt(64)  # kaiming-uniform with a = sqrt(5) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound


def test_merged_weight_is_w_plus_scaled_ba_and_merge_unmerge_are_exact(base):
    ours = ours_with_adapters(base, ("q", "down"), rank=4, alpha=12.0)
    layer = ours.layers[1].attention.wq
    original = layer.base.weight.detach().clone()
    expected = original + (12.0 / 4) * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer.merged_weight(), expected, rtol=0, atol=1e-7)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 20))
    with torch.no_grad():
        unmerged = ours(tokens)
        for _, lora in lora_layers(ours):
            lora.merge()
        merged = ours(tokens)
        for _, lora in lora_layers(ours):
            lora.unmerge()
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert torch.equal(layer.base.weight, original)  # bit for bit
    plain = merge_lora(copy.deepcopy(ours))
    assert not list(lora_layers(plain)) and isinstance(plain.layers[0].attention.wq, torch.nn.Linear)
    with torch.no_grad():
        assert (plain(tokens) - unmerged).abs().max().item() < 1e-5


def test_adapters_disabled_gives_the_base(base):
    ours = ours_with_adapters(base, ("q", "v"), rank=2, alpha=4.0)
    plain = load_model(base, dtype=torch.float32)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 16))
    with torch.no_grad(), adapters_disabled(ours):
        torch.testing.assert_close(ours(tokens), plain(tokens), rtol=0, atol=0)
    with torch.no_grad():
        assert (ours(tokens) - plain(tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("dora", [False, True])
def test_our_adapter_loads_in_peft_with_the_same_logits(base, tmp_path, dora):
    ours = ours_with_adapters(base, ("q", "k", "v", "o", "gate", "up", "down"), rank=4, alpha=8.0, dora=dora)
    if dora:
        with torch.no_grad():
            for _, layer in lora_layers(ours):
                layer.magnitude.mul_(1.1)
    save_adapter(ours, tmp_path / "adapter", base_model=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["use_dora"] == dora
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    expected_keys = {k.replace(".default", "") for k, _ in peft.get_peft_model_state_dict(theirs).items()}
    assert set(saved) == expected_keys  # neither missing nor unexpected keys
    tokens = torch.randint(0, ARGS.vocab_size, (2, 24))
    with torch.no_grad():
        assert (ours.eval()(tokens) - theirs.eval()(input_ids=tokens).logits).abs().max().item() < 1e-5


def test_peft_saved_adapter_loads_in_ours(base, tmp_path):
    theirs = peft_model(base, ("q", "v", "up"), rank=8, alpha=16, use_rslora=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_model(base, dtype=torch.float32), tmp_path / "peft")
    assert len(list(lora_layers(ours))) == 3 * ARGS.n_layers
    tokens = torch.randint(0, ARGS.vocab_size, (2, 24))
    with torch.no_grad():
        assert (ours(tokens) - theirs.eval()(input_ids=tokens).logits).abs().max().item() < 1e-5


def test_adapter_of_another_shape_is_refused(base, tmp_path):
    ours = ours_with_adapters(base, ("q",), rank=4, alpha=8.0)
    save_adapter(ours, tmp_path / "adapter")
    other = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32))
    with pytest.raises(CheckpointError, match=r"q_proj lora_A.weight has shape \(4, 64\), expected \(4, 32\)"):
        load_adapter(other, tmp_path / "adapter")
