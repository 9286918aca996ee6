"""Continued pretraining from a checkpoint (``--model.init_from``): what a run may change about it.

* The RoPE base, rope scaling and context (``--model.rope_theta``, ``rope_scaling``, ``max_seq_len``) replace the
  checkpoint's when set to other than their defaults: Code Llama's long-context stage raised the base from 10^4 to
  10^6 and trained on 16,384-token sequences.
* Added tokens (``--model.add_tokens``, the same as ``llama.prepare --add_tokens``) grow the embedding and output
  matrices. Each new row starts as the mean of the rows of the checkpoint's own tokens: a new token then looks like
  an average token rather than noise, its first logits are moderate, and every old token's logits are unchanged.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from llama.model import ModelArgs, Transformer
from llama.training.data import INDEX, ShardIndex

OVERRIDES = ("rope_theta", "rope_scaling", "max_seq_len")  # [model] keys that apply to a loaded checkpoint


def checkpoint_overrides(model_config) -> dict:
    """The ``OVERRIDES`` keys of the [model] section set to other than ``ModelArgs``' defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelArgs)}
    return {key: getattr(model_config, key) for key in OVERRIDES if getattr(model_config, key) != defaults[key]}


def continued_args(model_config, checkpoint: ModelArgs, index: ShardIndex) -> ModelArgs:
    """The checkpoint's architecture with the run's overrides, its vocabulary grown to the shards' when the run
    adds tokens."""
    vocab_size = max(checkpoint.vocab_size, index.vocab_size) if model_config.add_tokens else checkpoint.vocab_size
    return dataclasses.replace(checkpoint, **checkpoint_overrides(model_config), vocab_size=vocab_size)


def added_token_ids(index: ShardIndex) -> list[int]:
    """The ids of the tokens ``llama.prepare --add_tokens`` added to the vocabulary (not those it already had)."""
    return sorted(json.loads((index.root / INDEX).read_text()).get("added_tokens", {}).values())


@torch.no_grad()
def continue_from(model: Transformer, args: ModelArgs, new_ids: list[int]) -> Transformer:
    """``model`` (as loaded) with ``args``: its vocabulary grown to ``args.vocab_size`` with the rows of ``new_ids``
    set to the mean of the rows before the first of them; its rotary tables recomputed."""

    def grown(weight: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([weight, weight.new_empty(args.vocab_size - weight.shape[0], weight.shape[1])])
        if new_ids:
            rows[new_ids] = weight[: min(new_ids)].mean(dim=0)
        return rows

    unset = set(range(model.args.vocab_size, args.vocab_size)) - set(new_ids)
    if unset or (new_ids and max(new_ids) >= args.vocab_size):
        raise ValueError(
            f"the vocabulary grows from {model.args.vocab_size} to {args.vocab_size} rows but the added tokens' "
            f"ids are {new_ids}"
        )
    model.tok_embeddings.weight = nn.Parameter(grown(model.tok_embeddings.weight))
    model.tok_embeddings.num_embeddings = args.vocab_size
    if model.output is not None:
        model.output.weight = nn.Parameter(grown(model.output.weight))
        model.output.out_features = args.vocab_size
    model.args = args
    model.init_rope()
    return model
