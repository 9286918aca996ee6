"""Hugging Face's format: ``config.json`` and safetensors (one file, or shards listed in
``model.safetensors.index.json``), read by transformers 4.45+ and 5."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llama.checkpoint.base import (
    CheckpointError, CheckpointNotFoundError, check_readable, checkpoint_folder, cpu_state_dict, make_args, read_json,
)
from llama.model import ROPE_SCALING_KEYS, ModelArgs, Transformer

HF_NAMES = {  # HF parameter name -> ours; {} is the layer index
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
OURS_TO_HF = {ours: hf for hf, ours in HF_NAMES.items()}
HF_HARMLESS = re.compile(r".*rotary_emb\.inv_freq")  # written by transformers < 4.31
HF_NUMBERS = {  # config.json keys we read and their types, each > 0 when present
    **dict.fromkeys(("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "intermediate_size", "max_position_embeddings", "head_dim"), int),
    **dict.fromkeys(("rms_norm_eps", "rope_theta"), (int, float)),
}


def is_hf(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def rename(name: str, table: dict[str, str]) -> str | None:
    """Map a parameter name through ``table``, carrying the layer index across; None if not in the table."""
    layer = re.search(r"\.(\d+)\.", name)
    template = name.replace(layer[0], ".{}.", 1) if layer else name
    target = table.get(template)
    return target.format(layer[1]) if target and layer else target


def _rope(config: dict, file: Path) -> tuple[float, dict | None, int]:
    """(rope_theta, rope scaling or None, context length) from transformers 5 ``rope_parameters`` or 4's
    ``rope_theta`` / ``rope_scaling`` (legacy key ``type``), with transformers' defaults for what is left out."""
    params = config.get("rope_parameters") or {}
    legacy = config.get("rope_scaling") or {}
    if not (isinstance(params, dict) and isinstance(legacy, dict)):
        raise CheckpointError(f"{file}: rope_parameters and rope_scaling must be JSON objects or null")
    params = dict(params)
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    context = config.get("max_position_embeddings", ModelArgs.max_seq_len)
    scaling = {key: value for key, value in {**legacy, **params}.items() if key not in ("type", "rope_type")}
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if rope_type == "default":
        return theta, None, context
    if rope_type not in ROPE_SCALING_KEYS:
        raise CheckpointError(
            f"{file}: unsupported rope_type {rope_type!r} (supported: default, {', '.join(ROPE_SCALING_KEYS)})"
        )
    if rope_type == "dynamic":
        # transformers scales past max_position_embeddings, up to what the factor allows: that is our context
        scaling["original_max_position_embeddings"] = context
        context = int(context * scaling.get("factor", 1.0))
    elif rope_type in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings", context)
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = context / scaling["original_max_position_embeddings"]
    required, optional = ROPE_SCALING_KEYS[rope_type]
    missing = sorted(required - scaling.keys())
    if missing:
        raise CheckpointError(f"{file}: {rope_type} rope scaling without {missing}")
    kept = {key: scaling[key] for key in sorted(required | optional) if scaling.get(key) is not None}
    return theta, {"rope_type": rope_type, **kept}, context


def read_hf_config(path: Path) -> tuple[ModelArgs, torch.dtype | None]:
    """The model's args and the dtype the checkpoint declares (transformers 5 "dtype", 4 "torch_dtype")."""
    file = path / "config.json"
    config = read_json(file)
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in architectures):
        raise CheckpointError(
            f"{file}: unsupported architecture {architectures or config.get('model_type')!r} "
            "(expected model_type 'llama', LlamaForCausalLM)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{file}: {flag}=true is not supported (LLaMA has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file}: hidden_act {config['hidden_act']!r} is not supported (expected 'silu')")
    for key, kind in HF_NUMBERS.items():
        value = config.get(key)
        if value is not None and not (isinstance(value, kind) and not isinstance(value, bool) and value > 0):
            expected = "an integer" if kind is int else "a number"
            raise CheckpointError(f"{file}: {key} must be {expected} > 0, got {value!r}")
    theta, scaling, context = _rope(config, file)
    declared = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    try:
        args = make_args(
            file,
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"),
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=context,
            tie_embeddings=config.get("tie_word_embeddings", False),
            head_dim=config.get("head_dim"),
        )
    except KeyError as e:
        raise CheckpointError(f"{file}: missing key {e}") from None
    return args, declared if isinstance(declared, torch.dtype) else None


def _shard_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if not index_file.exists():
        return sorted(path.glob("*.safetensors"))
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: expected a 'weight_map' object")
    files = [path / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.exists():
            raise CheckpointNotFoundError(f"{index_file}: names shard {file.name}, which is not in {path}")
    return files


def read_hf(path: Path):
    """(args, tensors in our names, the file each came from)."""
    from safetensors import SafetensorError, safe_open

    args, declared = read_hf_config(path)  # tensors stored in another dtype are cast, as transformers does
    tensors, sources = {}, {}
    for file in _shard_files(path):
        check_readable(file)
        try:
            # Tensors from safe_open are views of a private mmap of the file: no copy until a dtype change.
            with safe_open(file, framework="pt") as f:
                for hf_name in f.keys():
                    name = rename(hf_name, HF_NAMES)
                    if HF_HARMLESS.fullmatch(hf_name) or (name == "output.weight" and args.tie_embeddings):
                        continue
                    tensors[name or hf_name] = f.get_tensor(hf_name).to(dtype=declared)
                    sources[name or hf_name] = file
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return args, tensors, sources


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '2GB', '500MB'")
    units = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match[1]) * units[match[2].lower()])


def hf_config(args: ModelArgs, dtype: torch.dtype, tokenizer=None) -> dict:
    """config.json that transformers 4.45+ (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and 5
    (``rope_parameters``, ``dtype``) both read the same way."""
    scaling, context = args.rope_scaling, args.max_seq_len
    if scaling and scaling["rope_type"] == "dynamic":  # transformers' dynamic type scales past this length
        context = scaling["original_max_position_embeddings"]
        scaling = {key: value for key, value in scaling.items() if key != "original_max_position_embeddings"}
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": context,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": args.rope_theta},
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "bos_token_id": getattr(tokenizer, "bos_id", None),
        "eos_token_id": getattr(tokenizer, "eos_id", None),
    }


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_hf(
    model: Transformer, out_dir, *, tokenizer=None, dtype=None, max_shard_size: int | str = "2GB", progress=False,
    replace: bool = False,
) -> Path:
    """A Hugging Face folder that ``transformers.AutoModelForCausalLM.from_pretrained`` and ``load_model`` load;
    ``replace`` swaps out a previous folder of that name (atomically, see ``llama.files``)."""
    from safetensors.torch import save_file

    dtype = dtype or model.tok_embeddings.weight.dtype
    state = {rename(name, OURS_TO_HF): t for name, t in cpu_state_dict(model, dtype, progress).items()}
    shards = _shards(state, _parse_size(max_shard_size))
    config = hf_config(model.args, dtype, tokenizer)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    if tokenizer is not None and len(tokenizer.stop_ids) > 1:
        generation["eos_token_id"] = sorted(tokenizer.stop_ids)
    with checkpoint_folder(out_dir, replace=replace) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
