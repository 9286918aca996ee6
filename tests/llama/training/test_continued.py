"""Continued pretraining that adds tokens and changes the RoPE base: tokens that stay whole, a grown model whose
old logits are unchanged, and an export that transformers loads with our logits and ids."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama.checkpoint import load_model, save_hf
from llama.checkpoint.embedded import default_checkpoint
from llama.model import ModelArgs, Transformer
from llama.training.config import ConfigError, load_config
from llama.training.continued import continue_from
from llama.training.data import ShardError
from llama.training.fim import FimOptions
from llama.training.shards import prepare
from llama.training.trainer import train
from tokenizer import load_tokenizer
from tokenizer.train import train as train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = [str(f) for f in sorted((STDLIB / "json").glob("*.py"))] + [str(STDLIB / "textwrap.py")]
CODE_LLAMA = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]
STARCODER = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random model with a 512-piece sentencepiece tokenizer, as an HF folder."""
    root = tmp_path_factory.mktemp("checkpoint")
    train_tokenizer(FILES, vocab_size=512, output=str(root / "tokenizer"))
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=512,
                                  max_seq_len=64, tie_embeddings=False))
    model.init_weights(std=0.3, seed=0)
    return save_hf(model, root / "hf", tokenizer=load_tokenizer(root / "tokenizer.model"))


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_added_tokens_are_single_ids_here_and_in_transformers(checkpoint, tmp_path, kind):
    base = load_tokenizer(checkpoint if kind == "sentencepiece" else default_checkpoint())
    names = CODE_LLAMA if kind == "sentencepiece" else STARCODER
    grown = base.with_added_tokens(names + names[:1])  # a repeated name is added once
    ids = [grown.token_id(name) for name in names]
    assert ids == list(range(base.vocab_size, base.vocab_size + len(names))) and grown.vocab_size == ids[-1] + 1
    text = f"x{names[0]}y {names[1]}{names[2]}\n"
    encoded = grown.encode(text, allow_special=True)
    assert [i for i in encoded if i >= base.vocab_size] == [ids[0], ids[1], ids[2]]
    assert not set(ids) & set(grown.encode(text))  # typed as text, never the control tokens (as every other one)
    assert grown.encode("def f(x):\n    return x") == base.encode("def f(x):\n    return x")
    grown.save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.convert_tokens_to_ids(names) == ids
    assert [i for i in theirs(text, add_special_tokens=False).input_ids if i >= base.vocab_size] == ids[:3]


def test_grown_model_keeps_its_old_logits(checkpoint):
    model = load_model(checkpoint)
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
    old_output = model.output.weight.clone()
    grown = continue_from(model, ModelArgs(**{**vars(model.args), "vocab_size": 516}), [512, 513, 514, 515])
    with torch.no_grad():
        after = grown(tokens)
    assert after.shape == (2, 48, 516) and torch.equal(after[..., :512], before)
    for weight, old in ((grown.output.weight, old_output), (grown.tok_embeddings.weight, None)):
        assert torch.allclose(weight[512:], weight[:512].mean(0).expand(4, -1))  # new rows: the old rows' mean
    assert torch.equal(grown.output.weight[:512], old_output)


def test_rope_override_recomputes_the_tables(checkpoint):
    args = ModelArgs(**{**vars(load_model(checkpoint).args), "rope_theta": 1e6, "max_seq_len": 128})
    model = continue_from(load_model(checkpoint), args, [])
    assert model.args.rope_theta == 1e6 and model.rope_cos.shape == (128, 16)
    assert torch.equal(model.rope_cos, Transformer(args).rope_cos)


@pytest.fixture(scope="module")
def fim_run(checkpoint, tmp_path_factory) -> Path:
    """Shards with the four Code Llama pieces added and FIM at 0.9, then 2 steps from the checkpoint that add
    the same tokens, raise the RoPE base to 10^6 and the context to 128."""
    root = tmp_path_factory.mktemp("fim_run")
    shards = prepare(FILES, str(checkpoint), root / "shards", val_fraction=0.2, add_tokens=CODE_LLAMA,
                     fim=FimOptions(rate=0.9, spm_rate=0.5, seed=0))
    train(load_config([
        f"--model.init_from={checkpoint}", f"--model.add_tokens={','.join(CODE_LLAMA)}", "--model.rope_theta=1e6",
        "--model.max_seq_len=128", f"--data.path={shards}", "--data.seq_len=96", f"--checkpoint.dir={root / 'run'}",
        "--training.steps=2", "--training.global_batch_size=2", "--training.micro_batch_size=1",
        "--optimizer.lr=1e-3", "--lr.warmup_steps=0", "--checkpoint.interval=0", "--training.eval_interval=0",
        "--metrics.progress_bar=false", "--metrics.tensorboard=false",
    ]))
    return root / "run" / "final"


def test_export_loads_in_transformers_with_our_logits_and_ids(fim_run):
    config = json.loads((fim_run / "config.json").read_text())
    assert (config["vocab_size"], config["rope_theta"], config["max_position_embeddings"]) == (516, 1e6, 128)
    ours = load_model(fim_run)
    theirs = AutoModelForCausalLM.from_pretrained(fim_run, dtype=torch.float32).eval()
    tokens = torch.cat([torch.tensor([[1, 512, 40, 41, 514, 42, 513, 43, 515]]),
                        torch.randint(0, 516, (1, 111), generator=torch.Generator().manual_seed(1))], dim=1)
    with torch.no_grad():
        delta = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert delta <= 1e-4
    assert AutoTokenizer.from_pretrained(fim_run).convert_tokens_to_ids(CODE_LLAMA) == [512, 513, 514, 515]
    assert [load_tokenizer(fim_run).token_id(name) for name in CODE_LLAMA] == [512, 513, 514, 515]


def test_shards_with_added_tokens_need_the_same_model_add_tokens(checkpoint, fim_run, tmp_path):
    shards = fim_run.parents[1] / "shards"
    common = [f"--model.init_from={checkpoint}", f"--data.path={shards}", "--data.seq_len=32",
              f"--checkpoint.dir={tmp_path}", "--training.steps=1"]
    with pytest.raises(ShardError, match=r"same --add_tokens as --model.add_tokens \(now \[\]\)"):
        train(load_config(common))
    with pytest.raises(ShardError, match="different tokenizer"):
        train(load_config([*common, "--model.add_tokens=▁<PRE>,▁<MID>"]))


@pytest.mark.parametrize("value, expected", [
    ('["<a>", "<b>"]', ["<a>", "<b>"]), ("<a>,<b>", ["<a>", "<b>"]), ("<a>", ["<a>"]),
])
def test_add_tokens_on_the_command_line(value, expected):
    assert load_config([f"--model.add_tokens={value}"]).model.add_tokens == expected


def test_add_tokens_in_toml_must_be_a_list_of_strings(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nadd_tokens = ["<a>", "<b>"]\n')
    assert load_config(["--config", str(toml)]).model.add_tokens == ["<a>", "<b>"]
    toml.write_text("[model]\nadd_tokens = [1, 2]\n")
    with pytest.raises(ConfigError, match=r"model.add_tokens: expected a list of strings, got \[1, 2\]"):
        load_config(["--config", str(toml)])
