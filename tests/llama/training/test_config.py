"""llama.config: TOML sections and --section.key=value overrides, typed and checked."""

from pathlib import Path

import pytest

from llama.training.config import ConfigError, load_config

EXAMPLES = Path(__file__).parents[3] / "examples" / "configs"


def test_overrides_are_converted_to_the_field_type(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[training]\nsteps = 10\nseed = 1\n[optimizer]\nlr = 1\n[model]\nn_kv_heads = 2\n')
    cfg = load_config(["--config", str(toml), "--training.steps=20", "--model.n_kv_heads", "none",
                       "--training.compile=true", "--checkpoint.dir=runs/x", "--optimizer.weight_decay=0"])
    assert cfg.training.steps == 20 and cfg.training.seed == 1  # the command line wins over the file
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.n_kv_heads is None and cfg.training.compile is True
    assert cfg.checkpoint.dir == "runs/x" and cfg.optimizer.weight_decay == 0.0


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key training.stepz; valid keys of \[training\]: steps, seed"):
        load_config(["--training.stepz=3"])


def test_unknown_section_in_a_file_is_named(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[trainer]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"run.toml: unknown section \[trainer\]; valid sections: model, data"):
        load_config(["--config", str(toml)])


@pytest.mark.parametrize("arg, message", [
    ("--training.steps=ten", "training.steps: expected int, got 'ten'"),
    ("--training.activation_checkpointing=some", "must be one of none, full, selective"),
    ("--model.tie_embeddings=maybe", "expected bool"),
])
def test_bad_values_are_refused(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config([arg])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file nope.toml does not exist"):
        load_config(["--config", "nope.toml"])


@pytest.mark.parametrize("name", ["tiny.toml", "smollm2_code.toml", "smollm2_code_fim.toml"])
def test_example_configs_load(name):
    cfg = load_config(["--config", str(EXAMPLES / name)])
    assert cfg.data.path and cfg.checkpoint.dir
