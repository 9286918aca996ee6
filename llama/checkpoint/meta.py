"""Meta's format (``meta-llama/llama``, ``llama3``, ``llama-models``): ``params.json`` and one
``consolidated.NN.pth`` per model-parallel rank."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama.checkpoint.base import CheckpointError, checkpoint_folder, cpu_state_dict, make_args, read_json
from llama.checkpoint.rotary import half_to_interleaved, interleaved_to_half, permute_qk
from llama.model import ModelArgs, Transformer, ffn_hidden_dim

# Meta's constants for Llama 3.1 RoPE scaling (``use_scaled_rope: true``); 3.2 varies only the factor.
META_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}
# Model-parallel split dimension per weight kind (Meta's Column/RowParallelLinear); absent = replicated.
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
META_HARMLESS = {"rope.freqs"}  # Llama 2 files carry the reference's precomputed frequencies


def is_meta(path: Path) -> bool:
    return (path / "params.json").exists() and any(path.glob("consolidated.*.pth"))


def _split_dim(name: str, shard: torch.Tensor, dim: int) -> int | None:
    kind = name.split(".")[-2]
    if kind == "tok_embeddings":  # ParallelEmbedding (Llama 1/2) splits dim 1, VocabParallelEmbedding (3) dim 0
        return 0 if shard.shape[1] == dim else 1
    return META_SPLIT_DIM.get(kind)


def read_meta(path: Path):
    """(args, tensors in our names and rotary layout, the file each came from)."""
    params_file = path / "params.json"
    params = read_json(params_file)
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
            split = _split_dim(name, parts[0], dim) if len(parts) > 1 else None
            tensors[name] = parts[0] if split is None else torch.cat(parts, dim=split)
        tie = "output.weight" not in tensors or torch.equal(tensors["output.weight"], tensors["tok_embeddings.weight"])
        if tie:  # Llama 3.2 stores the tied output projection as a copy
            tensors.pop("output.weight", None)
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = {**META_ROPE_SCALING, "factor": params.get("rope_scaling_factor") or META_ROPE_SCALING["factor"]}
        vocab_size = params.get("vocab_size", -1)
        args = make_args(
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
        if any(args.rope_scaling.get(k) != v for k, v in META_ROPE_SCALING.items() if k != "factor"):
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
    state = cpu_state_dict(model, dtype or model.tok_embeddings.weight.dtype, progress)
    state.setdefault("output.weight", state["tok_embeddings.weight"])
    permute_qk(state, args, half_to_interleaved)
    with checkpoint_folder(out_dir) as tmp:
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
    return Path(out_dir)
