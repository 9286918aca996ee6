"""Training configuration: one typed dataclass per TOML section, overridden from the command line.

    torchrun -m llama.train --config run.toml --training.steps=100 --model.init_from=path/to/checkpoint
    python -m llama.train --help          # every key, its default and its meaning

Every ``[section]`` of the TOML file and every ``--section.key=value`` (or ``--section.key value``) override is
checked against the dataclass of that section: an unknown section or key is an error naming the valid ones, and
values are converted to the field's type (``none`` gives None for optional fields). The command line wins over the
file. The comment after each field below is its ``--help`` text. ``[model]`` holds ``llama.model.ModelArgs``'s
fields (its defaults are Meta's 7B) plus ``init_from``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from llama.model import ModelArgs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    pass


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [
        # the fields of ModelArgs before it derives anything: n_kv_heads, head_dim, hidden_dim stay None until then
        ("init_from", str | None, None),
        ("add_tokens", list[str], field(default_factory=list)),
        *[(f.name, typing.get_type_hints(ModelArgs)[f.name], f.default) for f in dataclasses.fields(ModelArgs)],
    ],
    namespace={
        "__doc__": "The [model] section: a checkpoint to start from, or the architecture of a new model.",
        "model_args": lambda self, vocab_size: ModelArgs(**{
            f.name: getattr(self, f.name) for f in dataclasses.fields(ModelArgs)
        } | {"vocab_size": self.vocab_size if self.vocab_size > 0 else vocab_size}),
    },
)
MODEL_HELP = {
    "init_from": "a checkpoint to continue training from: anything llama.checkpoint.load_model reads (Meta folder, "
                 "HF folder, .gguf file); the architecture keys below are then ignored, except rope_theta, "
                 "rope_scaling and max_seq_len, which replace the checkpoint's when set",
    "add_tokens": "control tokens added to init_from's vocabulary, as llama.prepare --add_tokens added them to the "
                  "shards' (a list; on the command line JSON or comma-separated); their new rows start as the mean "
                  "of the old ones",
    "vocab_size": "0 or -1: the shards' tokenizer vocabulary",
}


@dataclass
class DataConfig:
    path: str = ""  # folder written by `python -m llama.prepare`
    seq_len: int = 256  # tokens per training sample (each sample reads seq_len + 1 tokens)
    overlong: str = "truncate"  # chat data: samples longer than seq_len + 1 tokens are truncated or dropped


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
    eval_interval: int = 100  # steps between validation losses on the shards' val split; 0: none ([eval]: other data)
    eval_batches: int = 4  # global batches of the validation split per pass
    max_bad_steps: int = 5  # consecutive steps with a non-finite loss or gradient before the run stops


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.1  # applied to matrices only, never to norms or embeddings
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator floor


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
    allow_changed: tuple[str, ...] = ()  # what a resume may change: shards, seq_len, global_batch_size, seed, model


@dataclass
class MetricsConfig:
    progress_bar: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # also write TensorBoard events to <dir>/tensorboard when it is installed
    log_samples: bool = False  # record the global sample indices of every step in metrics.jsonl


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: no adapters, every parameter trains (full fine-tuning); >= 1: LoRA of this rank, base frozen
    alpha: float = 16.0  # the update is scaled by alpha / rank (rsLoRA: alpha / sqrt(rank)), as peft
    dropout: float = 0.0  # dropout on the adapters' input
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # linears that get adapters
    rslora: bool = False  # rank-stabilised scaling, alpha / sqrt(rank)
    dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output row
    base_quantization: str = "none"  # QLoRA: the frozen base stored as none, int8, int4 or nf4


@dataclass
class DPOConfig:
    beta: float = 0.1  # preference data: strength of DPO's pull towards the reference model


@dataclass
class EvalConfig:
    interval: int = 0  # steps between [eval] evaluations (and one at the start and the end); 0: none
    perplexity: tuple[str, ...] = ()  # held-out text files, folders or globs, each NAME=PATH or PATH: eval/ppl/NAME
    max_length: int = 0  # tokens a perplexity window reads, and lm-eval's context; 0: the model's max_seq_len
    stride: int = 0  # new tokens scored per perplexity window (sliding window, as llama.eval); 0: max_length
    tasks: tuple[str, ...] = ()  # lm-eval tasks, groups or tags (local stdlib_* too) or YAML files: eval/TASK/METRIC
    limit: int = 0  # examples per lm-eval task; 0: all of them
    batch_size: int = 8  # rows per evaluation forward (perplexity windows, lm-eval requests)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What a resume may be told to change from the run its checkpoint records (``checkpoint.allow_changed``); never the
# tokenizer, whose ids the embedding rows stand for.
CHANGEABLE = ("shards", "seq_len", "global_batch_size", "seed", "model")
CHOICES = {  # for a tuple field: of each of its items
    ("training", "device"): ("auto", "cpu", "cuda"),
    ("training", "mixed_precision"): ("bf16", "fp32"),
    ("training", "activation_checkpointing"): ("none", "full", "selective"),
    ("lr", "schedule"): ("cosine", "wsd", "constant"),
    ("checkpoint", "allow_changed"): CHANGEABLE,
    ("data", "overlong"): ("truncate", "drop"),
    ("lora", "targets"): ("q", "k", "v", "o", "gate", "up", "down"),
    ("lora", "base_quantization"): ("none", "int8", "int4", "nf4"),
}


def _at_least(low):
    return lambda v: v >= low, f">= {low}"


def _above(low):
    return lambda v: v > low, f"> {low}"


def _fraction(upper_open: bool):
    return (lambda v: 0 <= v < 1, "in [0, 1)") if upper_open else (lambda v: 0 <= v <= 1, "in [0, 1]")


# The range of each numeric key (a float must also be finite); None, where a field allows it, is always accepted.
RANGES = {
    **{("model", key): _at_least(1) for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                                                 "max_seq_len", "head_dim", "hidden_dim")},
    ("model", "vocab_size"): _at_least(-1),
    **{("model", key): _above(0) for key in ("ffn_dim_multiplier", "norm_eps", "rope_theta")},
    ("data", "seq_len"): _at_least(1),
    **{("training", key): _at_least(1) for key in ("steps", "global_batch_size", "micro_batch_size", "eval_batches",
                                                    "max_bad_steps")},
    **{("training", key): _at_least(0) for key in ("seed", "max_grad_norm", "eval_interval")},
    ("optimizer", "lr"): _above(0),
    **{("optimizer", key): _at_least(0) for key in ("weight_decay", "eps")},
    **{("optimizer", key): _fraction(upper_open=True) for key in ("beta1", "beta2")},
    ("lr", "warmup_steps"): _at_least(0),
    **{("lr", key): _fraction(upper_open=False) for key in ("decay_fraction", "min_lr_ratio")},
    **{("checkpoint", key): _at_least(0) for key in ("interval", "keep")},
    ("lora", "rank"): _at_least(0),
    ("lora", "alpha"): _above(0),
    ("lora", "dropout"): _fraction(upper_open=True),
    ("dpo", "beta"): _above(0),
    **{("eval", key): _at_least(0) for key in ("interval", "max_length", "stride", "limit")},
    ("eval", "batch_size"): _at_least(1),
}


BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
TOML_NUMBERS = {int: (int,), float: (int, float)}  # TOML values a numeric field accepts


def _convert(value, hint, where: str):
    """``value`` (from TOML, or a string from the command line) as the type ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:  # of strings: a TOML list, or a comma list on the command line
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(item, str) for item in items):
            return tuple(item.strip() for item in items if item.strip())
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
    elif typing.get_origin(hint) is list:
        if isinstance(value, str):  # command-line JSON, or names separated by commas
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [name for name in value.split(",") if name]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    elif hint is dict:
        if isinstance(value, str):  # command-line JSON
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, dict):
            return value
    elif isinstance(value, str):  # command-line text for an int, float or str field
        try:
            return hint(value)
        except ValueError:
            pass
    elif isinstance(value, TOML_NUMBERS.get(hint, ())) and not isinstance(value, bool):
        return hint(value)
    raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")


def _sections(config: Config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _set(config: Config, section: str, key: str, value, source: str):
    sections = _sections(config)
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}]; valid sections: {', '.join(sections)}")
    obj = sections[section]
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys of [{section}]: {', '.join(hints)}")
    value = _convert(value, hints[key], f"{source}: {section}.{key}")
    choices = CHOICES.get((section, key))
    for item in value if isinstance(value, tuple) else [value]:
        if choices and item not in choices:
            raise ConfigError(f"{source}: {section}.{key} must be one of {', '.join(choices)}, got {item!r}")
    _check_number(value, section, key, source)
    setattr(obj, key, value)


def _check_number(value, section: str, key: str, source: str):
    """Refuse a number outside its key's range (``RANGES``), NaN and infinities, naming where it came from."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    accepts, expected = RANGES.get((section, key), (lambda v: True, ""))
    if not (math.isfinite(value) and accepts(value)):
        expected = f"a finite number {expected}" if isinstance(value, float) else f"an integer {expected}"
        raise ConfigError(f"{source}: {section}.{key} must be {expected.strip()}, got {value!r}")


@cache
def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of a dataclass's source: its help text."""
    pattern = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")
    return {m[1]: m[2] for line in inspect.getsource(cls).splitlines() if (m := pattern.match(line))}


def parser(prog: str = "python -m llama.train", description: str | None = None) -> argparse.ArgumentParser:
    """--config, then every --section.key with its default and meaning in ``--help``. Values stay strings here:
    ``load_config`` converts them and names the key when one does not fit."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0],
                                     usage="%(prog)s [--config FILE.toml] [--section.key=value ...]",
                                     allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.toml", help="a TOML file of [section] tables (the command line wins)")
    for section, obj in _sections(Config()).items():
        group = parser.add_argument_group(f"[{section}]")
        comments = {**field_comments(ModelArgs), **MODEL_HELP} if section == "model" else field_comments(type(obj))
        for f in dataclasses.fields(obj):
            text = f"{comments.get(f.name, '')} (default: {getattr(obj, f.name)!r})".lstrip()
            group.add_argument(f"--{section}.{f.name}", metavar="VALUE", help=text.replace("%", "%%"))
    return parser


def load_config(argv: list[str] | None = None, prog: str = "python -m llama.train", description: str | None = None
                ) -> Config:
    """``--config FILE.toml`` (optional) then ``--section.key=value`` or ``--section.key value`` overrides;
    ``--help`` prints every key and exits."""
    options, unknown = parser(prog, description).parse_known_args(sys.argv[1:] if argv is None else argv)
    options = vars(options)
    for arg in unknown:
        name = arg[2:].partition("=")[0] if arg.startswith("--") else ""
        if "." not in name:
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE.toml and --section.key=value (see --help)")
        section, _, key = name.partition(".")
        _set(Config(), section, key, None, arg)  # names the unknown section or key
    config = Config()
    if "config" in options:
        _load_file(config, Path(options.pop("config")))
    for name, value in options.items():  # the command line wins over the file, whatever the order
        section, _, key = name.partition(".")
        _set(config, section, key, value, f"--{name}")
    return config


def _load_file(config: Config, path: Path) -> None:
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
