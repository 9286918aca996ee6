"""Training configuration: one typed dataclass per TOML section, overridden from the command line.

    torchrun -m llama.train --config run.toml --training.steps=100 --model.init_from=path/to/checkpoint

Every ``[section]`` of the TOML file and every ``--section.key=value`` override is checked against the dataclass
of that section: an unknown section or key is an error naming the valid ones, and values are converted to the
field's type (``none`` gives None for optional fields).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from llama.model import ModelArgs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    # A checkpoint to continue training from: anything llama.checkpoint.load_model reads (Meta folder, HF
    # folder, .gguf file). When set, the architecture fields below are ignored.
    init_from: str | None = None
    # Architecture of a model trained from scratch (the fields of llama.model.ModelArgs).
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads
    vocab_size: int = 0  # 0: the shards' tokenizer vocabulary
    multiple_of: int = 32  # FFN width rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # FFN width; None: Meta's rule from dim
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # context length of the model (data.seq_len must not exceed it)
    tie_embeddings: bool = False  # output projection shares the input embedding matrix

    def model_args(self, vocab_size: int) -> ModelArgs:
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "init_from"}
        arch["vocab_size"] = self.vocab_size or vocab_size
        return ModelArgs(**arch)


@dataclass
class DataConfig:
    path: str = ""  # folder written by `python -m llama.prepare`
    seq_len: int = 256  # tokens per training sample (each sample reads seq_len + 1 tokens)


@dataclass
class TrainingConfig:
    steps: int = 1000  # optimizer steps
    seed: int = 0  # model init, data order
    global_batch_size: int = 32  # samples per optimizer step over all processes; fixed across world sizes
    micro_batch_size: int = 8  # samples per forward/backward on one process; accumulation makes up the rest
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables clipping (the norm is still logged)
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    mixed_precision: str = "bf16"  # bf16 (params and compute in bf16, fp32 gradient reduction) or fp32; CPU is always fp32
    activation_checkpointing: str = "none"  # none, full (recompute each block) or selective (keep matmul outputs)
    compile: bool = False  # torch.compile each transformer block
    eval_interval: int = 100  # steps between validation passes; 0 disables validation
    eval_batches: int = 4  # global batches of the validation split per pass
    max_bad_steps: int = 5  # consecutive steps with a non-finite loss or gradient before the run stops


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.1  # applied to matrices only, never to norms or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class LRConfig:
    schedule: str = "cosine"  # cosine, wsd (warmup-stable-decay) or constant (after warmup)
    warmup_steps: int = 100  # linear warmup from 0 to the peak learning rate
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min_lr_ratio
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak


@dataclass
class CheckpointConfig:
    dir: str = "runs/default"  # run folder: step-N/ checkpoints, final/ export, metrics.jsonl
    interval: int = 500  # steps between sharded checkpoints (and one at the end); 0: none, so no resume
    keep: int = 2  # newest checkpoints kept
    export: bool = True  # write <dir>/final/ as a Hugging Face folder when training ends
    export_only: bool = False  # load the newest checkpoint, export final/ and exit without training


@dataclass
class MetricsConfig:
    progress_bar: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # also write TensorBoard events to <dir>/tensorboard when it is installed
    log_samples: bool = False  # record the global sample indices of every step in metrics.jsonl


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    ("training", "device"): ("auto", "cpu", "cuda"),
    ("training", "mixed_precision"): ("bf16", "fp32"),
    ("training", "activation_checkpointing"): ("none", "full", "selective"),
    ("lr", "schedule"): ("cosine", "wsd", "constant"),
}


BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
TOML_NUMBERS = {int: (int,), float: (int, float)}  # TOML values a numeric field accepts


def _convert(value, hint, where: str):
    """``value`` (from TOML, or a string from the command line) as the type ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
    elif isinstance(value, str):  # command-line text for an int, float or str field
        try:
            return hint(value)
        except ValueError:
            pass
    elif isinstance(value, TOML_NUMBERS.get(hint, ())) and not isinstance(value, bool):
        return hint(value)
    raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")


def _set(config: Config, section: str, key: str, value, source: str):
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}]; valid sections: {', '.join(sections)}")
    obj = sections[section]
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys of [{section}]: {', '.join(hints)}")
    value = _convert(value, hints[key], f"{source}: {section}.{key}")
    choices = CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"{source}: {section}.{key} must be one of {', '.join(choices)}, got {value!r}")
    setattr(obj, key, value)


def load_config(argv: list[str] | None = None) -> Config:
    """``--config FILE.toml`` (optional) then ``--section.key=value`` or ``--section.key value`` overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = Config()
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE.toml and --section.key=value")
        name, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            path = Path(value)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            with open(path, "rb") as f:
                try:
                    table = tomllib.load(f)
                except tomllib.TOMLDecodeError as e:
                    raise ConfigError(f"{path}: invalid TOML: {e}") from None
            for section, values in table.items():
                if not isinstance(values, dict):
                    raise ConfigError(f"{path}: {section} = ... must be inside a [section]")
                for key, v in values.items():
                    _set(config, section, key, v, str(path))
        elif "." in name:
            overrides.append((name, value))
        else:
            raise ConfigError(f"unknown option --{name}; options are --config and --section.key=value")
    for name, value in overrides:  # the command line wins over the file, whatever the order
        section, _, key = name.partition(".")
        _set(config, section, key, value, f"--{name}")
    return config
