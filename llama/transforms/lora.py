"""LoRA (low-rank adapters) applied to a model from outside, with peft's conventions, so adapters move between the
two: ``y = base(x) + scaling · B(A(dropout(x)))``, scaling = alpha / rank (rsLoRA: alpha / sqrt(rank)), A drawn
kaiming-uniform(a=sqrt(5)) and B zero, so a fresh adapter changes nothing. DoRA (``dora=True``) adds a trained
magnitude per output row: ``y = m / ||W + scaling·BA||_row · (W + scaling·BA) x``, the norm taken as a constant in
backward, as peft does. Adapters are kept in fp32 whatever the base's dtype.

The base stays frozen; it may be a quantised linear (``llama.transforms.quantize``'s int8/int4 or
``llama.transforms.nf4``'s NF4: QLoRA), which is differentiable in its input. Only adapter tensors are trainable,
so the optimizer and training checkpoints hold nothing else.

Adapters are saved in peft's layout (``save_adapter``: ``adapter_config.json`` and ``adapter_model.safetensors``
with keys such as ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; q/k rows are already in HF's
rotary layout, ours) and read from it (``load_adapter``), so ``peft.PeftModel.from_pretrained`` loads ours on the
HF export of the base and gives the same logits, and an adapter trained with peft runs here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llama.checkpoint.base import CheckpointError, checkpoint_folder, read_json
from llama.checkpoint.hf import HF_NAMES, OURS_TO_HF, rename
from llama.model import Transformer
from llama.transforms.nf4 import NF4Linear
from llama.transforms.quantize import Int4Linear, Int8Linear, QuantizedLinear

# target name -> (our module name in a block, HF's)
TARGETS = {
    "q": ("attention.wq", "self_attn.q_proj"),
    "k": ("attention.wk", "self_attn.k_proj"),
    "v": ("attention.wv", "self_attn.v_proj"),
    "o": ("attention.wo", "self_attn.o_proj"),
    "gate": ("feed_forward.w1", "mlp.gate_proj"),
    "up": ("feed_forward.w3", "mlp.up_proj"),
    "down": ("feed_forward.w2", "mlp.down_proj"),
}
BASE_QUANTIZATIONS = ("none", "int8", "int4", "nf4")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen linear ``base`` (nn.Linear or a quantised linear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude = None
        if dora:
            self.magnitude = nn.Parameter(torch.empty(self.out_features, device=device, dtype=torch.float32))
        self.enabled = True  # False: the base alone (DPO's reference model)
        self.unmerged_weight = None  # the base weight as it was before ``merge``
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """peft's init: A kaiming-uniform(a=sqrt(5)), B zeros; DoRA's magnitude the base weight's row norms."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.magnitude is not None and self.magnitude.device.type != "meta":
            self.magnitude.copy_(torch.linalg.vector_norm(self.base_weight(), dim=1))

    def base_weight(self) -> torch.Tensor:
        """The base's weight as float32 (dequantised when quantised)."""
        if isinstance(self.base, QuantizedLinear):
            return self.base.dequantize()
        return self.base.weight.float()

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, (out_features, in_features) float32."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def merged_weight(self) -> torch.Tensor:
        """The one weight that gives this layer's output, float32."""
        weight = self.base_weight() + self.delta_weight()
        if self.magnitude is not None:
            weight = (self.magnitude / torch.linalg.vector_norm(weight, dim=1))[:, None] * weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if not self.enabled or self.unmerged_weight is not None:
            return result
        adapter_x = x.to(self.lora_A.weight.dtype)
        dropped = self.dropout(adapter_x)
        down = self.lora_A(dropped)  # (..., rank)
        if self.magnitude is None and result.dtype == down.dtype:
            # result + scaling · down Bᵀ in one addmm: no separate pass to scale the update and one to add it
            flat = torch.addmm(result.reshape(-1, self.out_features), down.reshape(-1, self.rank), self.lora_B.weight.T,
                               alpha=self.scaling)
            return flat.view(result.shape)
        update = self.lora_B(down) * self.scaling
        if self.magnitude is None:
            return result + update.to(result.dtype)
        # DoRA, as peft computes it: the row norm of the updated weight, detached (a constant in backward)
        with torch.no_grad():
            norm = torch.linalg.vector_norm(self.base_weight() + self.delta_weight().detach(), dim=1)
        scale = (self.magnitude / norm).to(result.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return scale * (result + update.to(result.dtype))
        # with dropout the base term is taken again on the dropped input (peft's form)
        base_dropped = F.linear(dropped.to(result.dtype), self.base_weight().to(result.dtype))
        return result + (scale - 1) * base_dropped + scale * update.to(result.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into the base weight (a float base only); ``unmerge`` restores the weight exactly."""
        if isinstance(self.base, QuantizedLinear):
            raise ValueError("a quantised base cannot hold a merged adapter; merge into the float checkpoint")
        if self.unmerged_weight is None:
            self.unmerged_weight = self.base.weight.detach().clone()
            self.base.weight.copy_(self.merged_weight().to(self.base.weight.dtype))

    @torch.no_grad()
    def unmerge(self):
        if self.unmerged_weight is not None:
            self.base.weight.copy_(self.unmerged_weight)
            self.unmerged_weight = None

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"
                + (", dora" if self.magnitude is not None else ""))


def target_modules(model: Transformer, targets: Iterable[str]) -> list[str]:
    """Our names of the linears ``targets`` (any of q, k, v, o, gate, up, down) name, in every block."""
    targets = list(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or targets}: expected some of {', '.join(TARGETS)}")
    return [f"layers.{i}.{TARGETS[t][0]}" for i in range(len(model.layers)) for t in targets]


def apply_lora(model: Transformer, modules: Iterable[str], rank: int, alpha: float, dropout: float = 0.0,
               rslora: bool = False, dora: bool = False) -> Transformer:
    """Freeze every parameter of ``model`` and wrap each linear named in ``modules`` (``target_modules``) in a
    ``LoRALinear``, in place."""
    model.requires_grad_(False)
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout, rslora, dora))
    return model


def quantize_base(model: Transformer, method: str) -> Transformer:
    """QLoRA's frozen base: every linear of the blocks stored as int8, int4 (int8 where its shape does not fit the
    int4 kernels) or NF4, in place. The embedding and output projection stay in float: the loss multiplies by the
    output weight directly (``llama.loss``)."""
    if method not in BASE_QUANTIZATIONS:
        raise ValueError(f"base quantization must be one of {', '.join(BASE_QUANTIZATIONS)}, got {method!r}")
    if method == "none":
        return model
    with torch.no_grad():
        for block in model.layers:
            for parent in (block.attention, block.feed_forward):
                for name, child in list(parent.named_children()):
                    if not isinstance(child, nn.Linear):
                        continue
                    if method == "nf4":
                        layer = NF4Linear(child.weight)
                    elif method == "int4" and Int4Linear.supports(child.weight, 32):
                        layer = Int4Linear(child.weight)
                    else:
                        layer = Int8Linear(child.weight)
                    setattr(parent, name, layer)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) of every adapter, names cleaned of wrappers (activation checkpointing, compile)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield clean_name(name), module


def clean_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model alone inside the block (DPO's reference forward under LoRA)."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and put the plain linear back (peft's ``merge_and_unload``), in
    place: the model is then a plain ``Transformer``."""
    for name, layer in list(lora_layers(model)):
        if isinstance(layer.base, QuantizedLinear):
            raise ValueError(f"{name}: a quantised base cannot hold a merged adapter; merge into the float checkpoint")
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model


# ---------------------------------------------------------------------------------------------------------------
# peft's files


def peft_module_name(ours: str) -> str:
    """``layers.0.attention.wq`` -> ``base_model.model.model.layers.0.self_attn.q_proj``."""
    return PEFT_PREFIX + rename(f"{ours}.weight", OURS_TO_HF).removesuffix(".weight")


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict's adapter tensors (our names, as ``get_model_state_dict`` gives them) under peft's keys."""
    tensors = {}
    for name, tensor in state.items():
        name = clean_name(name)
        for ours, theirs in ((".lora_A.weight", ".lora_A.weight"), (".lora_B.weight", ".lora_B.weight"),
                             (".magnitude", ".lora_magnitude_vector")):
            if name.endswith(ours):
                tensors[peft_module_name(name.removesuffix(ours)) + theirs] = tensor.detach().float().cpu().contiguous()
    return tensors


def adapter_config(layers: list[tuple[str, LoRALinear]], base_model: str | None) -> dict:
    """peft's ``LoraConfig`` fields for these layers (one rank, alpha and dropout for all)."""
    first = layers[0][1]
    hf_targets = sorted({name.rpartition(".")[2] for name, _ in ((peft_module_name(n), l) for n, l in layers)})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": hf_targets,
        "use_rslora": first.rslora,
        "use_dora": first.magnitude is not None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, out_dir, base_model: str | None = None, state: dict | None = None,
                 replace: bool = False) -> Path:
    """Write ``model``'s adapters in peft's layout (atomically). ``state``: the adapter tensors gathered from a
    sharded model (``get_model_state_dict``), when ``model``'s own are shards."""
    from safetensors.torch import save_file

    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    tensors = adapter_tensors(state if state is not None else {
        f"{name}.{key}": t for name, layer in layers for key, t in layer.named_parameters() if t.requires_grad
    })
    with checkpoint_folder(out_dir, replace=replace) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(layers, base_model), indent=2) + "\n")
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return Path(out_dir)


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a peft adapter folder, checked for what we can run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = read_json(path / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r}; only LORA is supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: {key} (per-layer ranks or alphas) is not supported")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: adapters with biases or modules_to_save are not supported")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: {key} must be a number > 0, got {config.get(key)!r}")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS} (a peft LoRA adapter folder holds it)")
    try:
        tensors = load_file(weights)
    except SafetensorError as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    return config, tensors


def load_adapter(model: Transformer, path) -> Transformer:
    """Apply the peft adapter in ``path`` to ``model`` (unmerged), in place: the modules its tensors name get
    ``LoRALinear`` layers holding them."""
    config, tensors = read_adapter(path)
    weights = Path(path) / ADAPTER_WEIGHTS
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, ours in ((".lora_A.weight", "lora_A.weight"), (".lora_B.weight", "lora_B.weight"),
                             (".lora_magnitude_vector", "magnitude")):
            if key.endswith(suffix):
                hf = key.removeprefix(PEFT_PREFIX).removesuffix(suffix)
                name = rename(f"{hf}.weight", HF_NAMES)
                if not key.startswith(PEFT_PREFIX) or name is None or not name.startswith("layers."):
                    raise CheckpointError(f"{weights}: tensor {key!r} adapts no linear layer of a Llama block")
                modules.setdefault(name.removesuffix(".weight"), {})[ours] = tensor
                break
        else:
            raise CheckpointError(f"{weights}: unexpected tensor {key!r} (expected lora_A/lora_B weights)")
    dora = bool(config.get("use_dora"))
    apply_lora(model, modules, config["r"], config["lora_alpha"], rslora=bool(config.get("use_rslora")), dora=dora)
    for name, parts in modules.items():
        layer = model.get_submodule(name)
        expected = {"lora_A.weight": layer.lora_A.weight, "lora_B.weight": layer.lora_B.weight}
        if dora:
            expected["magnitude"] = layer.magnitude
        if parts.keys() != expected.keys():
            raise CheckpointError(f"{weights}: {name} has {sorted(parts)}, expected {sorted(expected)}")
        with torch.no_grad():
            for key, param in expected.items():
                if parts[key].shape != param.shape:
                    raise CheckpointError(
                        f"{weights}: {peft_module_name(name)} {key} has shape {tuple(parts[key].shape)}, expected "
                        f"{tuple(param.shape)} for rank {config['r']} on this model"
                    )
                param.copy_(parts[key])
    return model.eval()
