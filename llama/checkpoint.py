"""Checkpoint readers and writers: Meta (``params.json`` + ``consolidated.NN.pth``), Hugging Face (``config.json`` +
safetensors, single or sharded) and GGUF (llama.cpp, any quantisation ``gguf`` can dequantise).

``load_model(path)`` detects the format, builds the model on the meta device and assigns the weights straight from
memory-mapped files, so loading holds one copy of the weights. ``save_hf`` and ``save_meta`` write atomically.

RoPE layout (see ``llama.model``): we keep q/k rows in HF's rotate-half order, where head row c·(d/2)+i (c ∈ {0, 1})
is the i-th member of rotated pair c. Meta and GGUF store the same rows interleaved, pairs at rows 2i and 2i+1.
Reading Meta/GGUF we view each head's rows as (d/2, 2) and transpose to (2, d/2) (``interleaved_to_half``); writing
Meta we do the reverse (``half_to_interleaved``). The same permutation applied to both q and k leaves q·k and so
the whole model unchanged; v, o and the FFN are never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llama.model import ModelArgs, Transformer, ffn_hidden_dim


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and what was expected."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


# Meta's constants for Llama 3.1 RoPE scaling (``use_scaled_rope: true``); 3.2 varies only the factor.
META_ROPE_SCALING = {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def detect_format(path: str | os.PathLike) -> str:
    """'meta', 'hf' or 'gguf' from what lies at ``path``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or folder (expected a checkpoint folder or a .gguf file)")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise CheckpointError(f"{path}: not a checkpoint (expected a .gguf file or a folder)")
    if (path / "params.json").exists() and any(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return "hf"
    raise CheckpointError(
        f"{path}: no checkpoint found; looked for params.json + consolidated.*.pth (Meta), "
        "config.json + *.safetensors / model.safetensors.index.json (Hugging Face), or a .gguf file"
    )


def load_args(path: str | os.PathLike) -> ModelArgs:
    """The model's hyper-parameters, read from the checkpoint's metadata (and shapes where the format needs them)."""
    fmt = detect_format(path)
    if fmt == "gguf":
        return _gguf_args(_open_gguf(Path(path)), Path(path))  # without dequantising the weights
    if fmt == "hf":
        return _read_hf_config(Path(path))[0]
    return READERS[fmt](Path(path))[0]


def load_model(path: str | os.PathLike, *, device="cpu", dtype=None, max_seq_len: int | None = None) -> Transformer:
    """The model in eval mode. ``dtype=None`` keeps the stored dtype (GGUF dequantises to float32);
    ``max_seq_len`` overrides the checkpoint's context length."""
    path = Path(path)
    args, tensors, sources = READERS[detect_format(path)](path)
    if max_seq_len is not None:
        args = replace(args, max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{sources[name]}: unexpected tensor {name!r} {tuple(tensor.shape)}")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{sources[name]}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[name].shape)} from the checkpoint's configuration"
            )
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    # pop as we go, so that a dtype or device change never holds two copies of every weight
    state = {name: tensors.pop(name).to(device=device, dtype=dtype) for name in list(tensors)}
    model.load_state_dict(state, assign=True)
    model.init_rope()
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# RoPE row permutation (see the module docstring)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta/GGUF q or k rows (pairs at 2i, 2i+1) -> HF rotate-half rows (pairs at i, i + d/2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_half``."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(tensors: dict[str, torch.Tensor], args: ModelArgs, permute) -> None:
    """Apply ``permute`` to every wq (n_heads) and wk (n_kv_heads) in ``tensors``, in place."""
    for name, w in tensors.items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            n_heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads
            if w.shape[0] % (2 * n_heads) == 0:  # a shape that does not fit is reported by load_model
                tensors[name] = permute(w, n_heads)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def _read_json(file: Path) -> dict:
    if not file.exists():
        raise CheckpointNotFoundError(f"{file}: file not found")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _make_args(file: Path, **kwargs) -> ModelArgs:
    try:
        return ModelArgs(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: inconsistent model configuration ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# Meta: params.json + consolidated.NN.pth

# Model-parallel split dimension per weight kind (Meta's Column/RowParallelLinear); absent = replicated.
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
META_HARMLESS = {"rope.freqs"}  # Llama 2 files carry the reference's precomputed frequencies


def _meta_split_dim(name: str, shard: torch.Tensor, dim: int) -> int | None:
    kind = name.split(".")[-2]
    if kind == "tok_embeddings":  # ParallelEmbedding (Llama 1/2) splits dim 1, VocabParallelEmbedding (3) dim 0
        return 0 if shard.shape[1] == dim else 1
    return META_SPLIT_DIM.get(kind)


def _read_meta(path: Path):
    params_file = path / "params.json"
    params = _read_json(params_file)
    shard_files = sorted(path.glob("consolidated.*.pth"))
    shards = []
    for file in shard_files:
        try:
            shards.append(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # torch raises RuntimeError/pickle errors for truncated or foreign files
            raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({e})") from None
    try:
        dim = params["dim"]
        tensors = {}
        for name in shards[0]:
            if name in META_HARMLESS:
                continue
            parts = [shard[name] for shard in shards]
            split = _meta_split_dim(name, parts[0], dim) if len(parts) > 1 else None
            tensors[name] = parts[0] if split is None else torch.cat(parts, dim=split)
        tie = "output.weight" not in tensors or torch.equal(tensors["output.weight"], tensors["tok_embeddings.weight"])
        if tie:  # Llama 3.2 stores the tied output projection as a copy
            tensors.pop("output.weight", None)
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = {**META_ROPE_SCALING, "factor": params.get("rope_scaling_factor") or META_ROPE_SCALING["factor"]}
        vocab_size = params.get("vocab_size", -1)
        args = _make_args(
            params_file,
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab_size if vocab_size > 0 else tensors["tok_embeddings.weight"].shape[0],
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0),
            rope_scaling=scaling,
            tie_embeddings=tie,
            head_dim=params.get("head_dim"),  # not Meta's; save_meta writes it for a non-default head size
        )
    except KeyError as e:
        raise CheckpointError(f"{params_file}: missing key {e} (expected Meta's params.json or its tensors)") from None
    permute_qk(tensors, args, interleaved_to_half)
    source = shard_files[0] if len(shard_files) == 1 else f"{path}/consolidated.*.pth (merged)"
    return args, tensors, {name: source for name in tensors}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: config.json + safetensors

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


def _rename(name: str, table: dict[str, str]) -> str | None:
    """Map a parameter name through ``table``, carrying the layer index across; None if not in the table."""
    layer = re.search(r"\.(\d+)\.", name)
    template = name.replace(layer[0], ".{}.", 1) if layer else name
    target = table.get(template)
    return target.format(layer[1]) if target and layer else target


def _hf_rope(config: dict, file: Path) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from transformers 5 ``rope_parameters`` or 4's ``rope_theta``/``rope_scaling``."""
    params = config.get("rope_parameters") or {}
    legacy = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"{file}: unsupported rope_type {rope_type!r} (supported: default, llama3)")
    factors = {**legacy, **params}
    missing = [key for key in META_ROPE_SCALING if key not in factors]
    if missing:
        raise CheckpointError(f"{file}: llama3 rope scaling without {missing}")
    return theta, {key: factors[key] for key in META_ROPE_SCALING}


def _read_hf_config(path: Path) -> tuple[ModelArgs, torch.dtype | None]:
    """The model's args and the dtype the checkpoint declares (transformers 5 "dtype", 4 "torch_dtype")."""
    file = path / "config.json"
    config = _read_json(file)
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
    theta, scaling = _hf_rope(config, file)
    declared = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    try:
        args = _make_args(
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
            max_seq_len=config.get("max_position_embeddings", ModelArgs.max_seq_len),
            tie_embeddings=config.get("tie_word_embeddings", False),
            head_dim=config.get("head_dim"),
        )
    except KeyError as e:
        raise CheckpointError(f"{file}: missing key {e}") from None
    return args, declared if isinstance(declared, torch.dtype) else None


def _hf_shard_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if not index_file.exists():
        return sorted(path.glob("*.safetensors"))
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: expected a 'weight_map' object")
    files = [path / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.exists():
            raise CheckpointNotFoundError(f"{index_file}: names shard {file.name}, which is not in {path}")
    return files


def _read_hf(path: Path):
    from safetensors import SafetensorError, safe_open

    args, declared = _read_hf_config(path)  # tensors stored in another dtype are cast, as transformers does
    tensors, sources = {}, {}
    for file in _hf_shard_files(path):
        try:
            # Tensors from safe_open are views of a private mmap of the file: no copy until a dtype change.
            with safe_open(file, framework="pt") as f:
                for hf_name in f.keys():
                    name = _rename(hf_name, HF_NAMES)
                    if HF_HARMLESS.fullmatch(hf_name) or (name == "output.weight" and args.tie_embeddings):
                        continue
                    tensors[name or hf_name] = f.get_tensor(hf_name).to(dtype=declared)
                    sources[name or hf_name] = file
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return args, tensors, sources


# ---------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp)

GGUF_NAMES = {
    "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
}


def _open_gguf(file: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(file)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on truncated or foreign files
        raise CheckpointError(f"{file}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{file}: GGUF architecture is {arch!r}, only 'llama' is supported")
    return reader


def _gguf_value(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _gguf_args(reader, file: Path) -> ModelArgs:
    def value(key, default=None):
        return _gguf_value(reader, f"llama.{key}", default)

    def required(key):
        if (found := value(key)) is None:
            raise CheckpointError(f"{file}: missing GGUF key llama.{key}")
        return found

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{file}: no token_embd.weight tensor")
    dim, n_heads = required("embedding_length"), required("attention.head_count")
    head_dim = value("attention.key_length", dim // n_heads)
    if value("rope.dimension_count", head_dim) != head_dim or value("expert_count"):
        raise CheckpointError(f"{file}: partial rotary or mixture-of-experts llama variants are not supported")
    args = _make_args(
        file,
        dim=dim,
        n_layers=required("block_count"),
        n_heads=n_heads,
        n_kv_heads=value("attention.head_count_kv", n_heads),
        vocab_size=value("vocab_size", int(tensors["token_embd.weight"].shape[-1])),  # gguf lists shapes (in, out)
        hidden_dim=required("feed_forward_length"),
        norm_eps=value("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=value("rope.freq_base", 10000.0),
        max_seq_len=value("context_length", ModelArgs.max_seq_len),
        tie_embeddings="output.weight" not in tensors,
        head_dim=head_dim,
    )
    if "rope_freqs.weight" in tensors:  # Llama 3.1
        freqs = tensors["rope_freqs.weight"]
        rope_freqs = _dequantize(freqs.data, freqs.tensor_type)
        args = _gguf_rope_scaling(args, rope_freqs, value("rope.scaling.original_context_length"), file)
    return args


def _gguf_rope_scaling(args: ModelArgs, rope_freqs: torch.Tensor, original_len: int | None, file: Path) -> ModelArgs:
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors; recover the llama3 parameters they came from
    (the largest divisor is the factor, the band edges are Meta's) and check they reproduce every divisor."""
    from llama.model import rope_frequencies

    scaling = {**META_ROPE_SCALING, "factor": float(rope_freqs.max())}
    if original_len:
        scaling["original_max_position_embeddings"] = original_len
    scaled = replace(args, rope_scaling=scaling)
    wanted = rope_frequencies(args) / rope_freqs.float()
    if not torch.allclose(rope_frequencies(scaled), wanted, rtol=1e-4):
        raise CheckpointError(f"{file}: rope_freqs do not follow Llama 3.1 scaling; this variant is not supported")
    return scaled


def _dequantize(data: np.ndarray, tensor_type) -> torch.Tensor:
    """Stored GGUF data as a writable float32 tensor (out, in)."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.require(dequantize(data, tensor_type), np.float32, ["C", "W"]))


def _read_gguf(file: Path):
    reader = _open_gguf(file)
    args = _gguf_args(reader, file)
    # What each tensor is and where it lies; the reader itself (its parsed metadata is ~1.6x the size of a small
    # model's quantised weights) is then released before anything is dequantised.
    infos = [(t.name, t.tensor_type, t.data.dtype, t.data.shape, t.data_offset, t.n_bytes) for t in reader.tensors]
    del reader
    tensors = {}
    with open(file, "rb") as f:
        for gguf_name, tensor_type, stored_dtype, shape, offset, n_bytes in infos:
            if gguf_name == "rope_freqs.weight":  # already in args.rope_scaling
                continue
            layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
            base = layer[2] if layer else gguf_name.removesuffix(".weight")
            name = f"{GGUF_NAMES.get(base, base)}.weight"
            name = f"layers.{layer[1]}.{name}" if layer else name
            # read (not mmap) one tensor at a time, so the file's pages do not add to the process's memory
            f.seek(offset)
            data = f.read(n_bytes)
            if len(data) != n_bytes:
                raise CheckpointError(f"{file}: truncated: tensor {gguf_name} needs {n_bytes} bytes at offset {offset}")
            stored = np.frombuffer(data, dtype=stored_dtype).reshape(shape)
            try:
                tensors[name] = _dequantize(stored, tensor_type)
            except NotImplementedError as e:
                raise CheckpointError(f"{file}: tensor {gguf_name} has unsupported type {tensor_type.name} ({e})") from None
    permute_qk(tensors, args, interleaved_to_half)  # llama.cpp's converter interleaves q/k rows like Meta
    return args, tensors, {name: file for name in tensors}


READERS = {"meta": _read_meta, "hf": _read_hf, "gguf": _read_gguf}


# ---------------------------------------------------------------------------------------------------------------
# Writers


def _atomic_folder(out_dir: Path, write) -> Path:
    """Run ``write(tmp)`` into a temp folder beside ``out_dir``, then rename it into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: already exists and is not empty; remove it or pick another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for item in [tmp, *tmp.iterdir()]:  # mkdtemp (and safetensors) create private files; give the usual modes
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '2GB', '500MB'")
    units = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match[1]) * units[match[2].lower()])


def _state_dict(model: Transformer, dtype, progress: bool) -> dict[str, torch.Tensor]:
    tensors = tqdm(model.state_dict().items(), desc="converting", unit="tensor", disable=not progress)
    return {name: t.detach().to(device="cpu", dtype=dtype).contiguous() for name, t in tensors}


def hf_config(args: ModelArgs, dtype: torch.dtype, tokenizer=None) -> dict:
    """config.json that transformers 4.45+ (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and 5
    (``rope_parameters``, ``dtype``) both read the same way."""
    scaling = {"rope_type": "llama3", **args.rope_scaling} if args.rope_scaling else None
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
        "max_position_embeddings": args.max_seq_len,
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


def save_hf(
    model: Transformer, out_dir, *, tokenizer=None, dtype=None, max_shard_size: int | str = "2GB", progress=False
) -> Path:
    """A Hugging Face folder that ``transformers.AutoModelForCausalLM.from_pretrained`` and ``load_model`` load."""
    from safetensors.torch import save_file

    dtype = dtype or model.tok_embeddings.weight.dtype
    limit = _parse_size(max_shard_size)
    state = {_rename(name, OURS_TO_HF): t for name, t in _state_dict(model, dtype, progress).items()}
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    def write(tmp: Path):
        config = hf_config(model.args, dtype, tokenizer)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        if tokenizer is not None and len(tokenizer.stop_ids) > 1:
            generation["eos_token_id"] = sorted(tokenizer.stop_ids)
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

    return _atomic_folder(Path(out_dir), write)


def meta_params(args: ModelArgs) -> dict:
    """params.json in Meta's names."""
    multiple_of, multiplier = args.multiple_of, args.ffn_dim_multiplier
    if ffn_hidden_dim(args.dim, multiple_of, multiplier) != args.hidden_dim:
        # Meta has no field for the FFN width: pick values its rule maps to ours. Rounding up to a multiple of
        # hidden_dim itself gives hidden_dim from anything in (0, hidden_dim]; scale the base width there if needed.
        multiple_of = args.hidden_dim
        base = int(2 * 4 * args.dim / 3)
        multiplier = None if base <= args.hidden_dim else args.hidden_dim / base
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
    }  # no max_seq_len: Meta's reference passes it beside **params, and a duplicate is a TypeError
    if args.head_dim != args.dim // args.n_heads:
        params["head_dim"] = args.head_dim
    if args.rope_scaling:
        if any(args.rope_scaling[k] != v for k, v in META_ROPE_SCALING.items() if k != "factor"):
            raise CheckpointError(f"rope scaling {args.rope_scaling} cannot be expressed in Meta's params.json")
        params["use_scaled_rope"] = True
        if args.rope_scaling["factor"] != META_ROPE_SCALING["factor"]:
            params["rope_scaling_factor"] = args.rope_scaling["factor"]
    return params


def save_meta(model: Transformer, out_dir, *, tokenizer=None, dtype=None, mp: int = 1, progress=False) -> Path:
    """A Meta folder: params.json and ``mp`` files consolidated.NN.pth split like Meta's model-parallel ranks
    (the embedding along the vocabulary, as Llama 3). A tied model is written with its output projection, which
    Meta's reference expects; ``load_model`` ties it again."""
    args = model.args
    if args.n_kv_heads % mp or args.vocab_size % mp or args.hidden_dim % mp:
        raise CheckpointError(f"cannot split into {mp} shards: n_kv_heads, vocab_size and hidden_dim must divide")
    params = meta_params(args)  # refuses what Meta's format cannot express, before anything is written
    state = _state_dict(model, dtype or model.tok_embeddings.weight.dtype, progress)
    state.setdefault("output.weight", state["tok_embeddings.weight"])
    permute_qk(state, args, half_to_interleaved)

    def write(tmp: Path):
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        for rank in range(mp):
            shard = {}
            for name, t in state.items():
                split = 0 if name == "tok_embeddings.weight" else META_SPLIT_DIM.get(name.split(".")[-2])
                # clone a slice, or torch.save writes its whole storage; mp=1 keeps a tied output sharing its storage
                shard[name] = t if split is None or mp == 1 else t.chunk(mp, dim=split)[rank].clone()
            torch.save(shard, tmp / f"consolidated.{rank:02d}.pth")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _atomic_folder(Path(out_dir), write)


__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "detect_format", "load_args", "load_model", "save_hf", "save_meta",
    "interleaved_to_half", "half_to_interleaved", "hf_config", "meta_params",
]
