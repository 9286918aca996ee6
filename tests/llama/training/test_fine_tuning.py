"""Fine-tuning with llama.train on chat data: the loss per trained token of the global batch whatever the
micro-batches and processes, LoRA runs killed with SIGKILL and resumed bit for bit, their merged and adapter
exports (loaded by peft and by Llama.build), and DPO's reward margin rising on a toy preference set."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llama.checkpoint import load_model, save_hf
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.training.chat_data import prepare_chat
from llama.training.config import ConfigError, load_config
from llama.training.dpo import dpo_loss
from llama.training.metrics import read_metrics
from llama.training.parallelize import init_distributed
from llama.training.trainer import train
from tokenizer import load_tokenizer

HERE = Path(__file__).parent
WORKER = HERE / "accumulation_worker.py"
spec = importlib.util.spec_from_file_location("accumulation_worker", WORKER)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    """Answers of very different lengths (2 to ~40 words): a mean per micro-batch would weigh their tokens unevenly."""
    rows = []
    for i in range(n):
        answer = " ".join(f"w{j}" for j in range(2 + (i * 11) % 40))
        rows.append({"messages": [{"role": "user", "content": f"List {i}."}, {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="module")
def tiny_checkpoint(smollm2_gguf_path, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, as an HF folder (init_from)."""
    model = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, multiple_of=16,
                                  max_seq_len=128, tie_embeddings=True))
    model.init_weights(std=0.05, seed=0)
    return save_hf(model, tmp_path_factory.mktemp("tiny") / "base", tokenizer=load_tokenizer(smollm2_gguf_path))


@pytest.fixture(scope="module")
def chat_shards(tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    return prepare_chat([str(write_jsonl(root / "chats.jsonl", chat_rows(40)))], str(tiny_checkpoint),
                        root / "shards", val_fraction=0.1)


@pytest.fixture
def group():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    device, mesh = init_distributed("cpu")
    yield device, mesh
    dist.destroy_process_group()
    torch.set_num_threads(threads)


def test_one_micro_batch_of_8_eight_of_1_and_two_processes_of_4_agree(chat_shards, group, tmp_path):
    device, mesh = group
    whole_loss, whole = worker.step(str(chat_shards), 8, device, mesh)
    ones_loss, ones = worker.step(str(chat_shards), 1, device, mesh)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(chat_shards), "4", str(tmp_path / "two.pt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    assert abs(ones_loss - whole_loss) < 1e-5 and abs(two["loss"] - whole_loss) < 1e-5
    for name, grad in whole.items():
        torch.testing.assert_close(ones[name], grad, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(two["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
    assert whole["tok_embeddings.weight"].abs().max() > 1e-3  # gradients worth comparing


TINY_RUN = [
    "--data.seq_len=96", "--training.steps=12", "--training.global_batch_size=4", "--training.micro_batch_size=2",
    "--optimizer.lr=3e-3", "--lr.warmup_steps=2", "--checkpoint.interval=4", "--checkpoint.keep=3",
    "--training.eval_interval=6", "--training.eval_batches=1", "--metrics.progress_bar=false",
    "--metrics.tensorboard=false", "--training.device=cpu",
]
LORA = ["--lora.rank=4", "--lora.alpha=8", "--lora.dropout=0.1", "--lora.targets=q,v,down"]


def run_args(checkpoint: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_RUN, f"--model.init_from={checkpoint}", f"--data.path={shards}", f"--checkpoint.dir={run_dir}",
            *extra]


def train_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "llama.train", *args]


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint, chat_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora_run")
    result = subprocess.run(train_command(run_args(tiny_checkpoint, chat_shards, run_dir, *LORA)),
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_lora_run_learns_and_saves_only_adapters(lora_run, tiny_checkpoint):
    records = read_metrics(lora_run)
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert list(val) == [0, 6, 12] and val[12] < val[0] - 0.3
    from safetensors.torch import load_file

    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(lora_run / "step-12").read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)  # no frozen base
    adapter = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 3 * 2  # A and B of q, v, down in 2 layers
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in adapter


def test_merged_export_equals_the_adapter_unmerged_in_ours_and_in_peft(lora_run, tiny_checkpoint):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    tokens = torch.randint(0, 49152, (2, 30))
    merged = load_model(lora_run / "final", dtype=torch.float32)
    adapted = Llama.build(tiny_checkpoint, adapter=lora_run / "adapter", device="cpu", max_seq_len=64).model
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    with torch.no_grad():
        expected = theirs(input_ids=tokens).logits
        assert (adapted(tokens) - expected).abs().max() < 1e-5
        assert (merged(tokens) - expected).abs().max() < 1e-5
        assert (load_model(tiny_checkpoint)(tokens) - expected).abs().max() > 1e-3  # the adapter did something


def test_lora_run_killed_then_rerun_gives_a_bit_identical_adapter(lora_run, tiny_checkpoint, chat_shards, tmp_path):
    command = train_command(run_args(tiny_checkpoint, chat_shards, tmp_path, *LORA))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 300
    while not (tmp_path / "step-4" / "train_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "final").exists(), "the run finished before it could be killed"
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / adapter).read_bytes() == (lora_run / adapter).read_bytes()
    assert [r.get("loss") for r in read_metrics(tmp_path)] == [r.get("loss") for r in read_metrics(lora_run)]


def test_lora_settings_are_checked(tiny_checkpoint, chat_shards, tmp_path):
    with pytest.raises(ConfigError, match="lora.targets must be one of q, k, v, o, gate, up, down, got 'qkv'"):
        load_config(["--lora.targets=qkv"])
    with pytest.raises(ConfigError, match="set lora.rank too"):
        train(load_config(run_args(tiny_checkpoint, chat_shards, tmp_path, "--lora.base_quantization=nf4")))


def test_dpo_loss_is_the_published_formula():
    beta = 0.3
    pc, pr, rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -2.0]), torch.tensor([-5.0, -7.0]), \
        torch.tensor([-5.5, -3.0])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(2):
        logits = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-logits))), rel=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())


@pytest.mark.parametrize("adapters", [True, False])
def test_dpo_reward_margin_rises_on_a_toy_set(tiny_checkpoint, tmp_path, adapters):
    """Chosen answers agree ("yes"), rejected ones refuse ("no"): the policy learns to prefer the first."""
    rows = [{"prompt": f"Question {i}?", "chosen": f"Yes, {i}.", "rejected": f"No, never {i}."} for i in range(24)]
    shards = prepare_chat([str(write_jsonl(tmp_path / "pref.jsonl", rows))], str(tiny_checkpoint), tmp_path / "pref",
                          val_fraction=0.25)
    extra = ["--lora.rank=8", "--lora.alpha=16"] if adapters else []
    train(load_config(run_args(tiny_checkpoint, shards, tmp_path / "run", "--data.seq_len=64", "--dpo.beta=0.5",
                               "--checkpoint.interval=0", "--checkpoint.export=false", *extra)))
    records = read_metrics(tmp_path / "run")
    first, last = records[1], records[-1]
    assert first["reward_margin"] == pytest.approx(0, abs=0.05)  # policy = reference at the start
    assert last["reward_margin"] > first["reward_margin"] + 0.5 and last["reward_accuracy"] == 1.0
    assert last["val_reward_margin"] > records[0]["val_reward_margin"] + 0.5 and last["val_loss"] < math.log(2)


def test_qlora_run_learns_and_merges_into_the_float_base(tiny_checkpoint, chat_shards, tmp_path):
    train(load_config(run_args(tiny_checkpoint, chat_shards, tmp_path, *LORA, "--lora.base_quantization=nf4",
                               "--training.steps=6", "--checkpoint.interval=0")))
    val = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r}
    assert val[6] < val[0] - 0.1
    tokens = torch.randint(0, 49152, (1, 20))
    adapted = Llama.build(tiny_checkpoint, adapter=tmp_path / "adapter", device="cpu", max_seq_len=64).model
    with torch.no_grad():
        assert (load_model(tmp_path / "final")(tokens) - adapted(tokens)).abs().max() < 1e-5


def test_chat_command_takes_the_adapter(lora_run, tiny_checkpoint):
    command = [sys.executable, "-m", "llama.chat", str(tiny_checkpoint), "--adapter", str(lora_run / "adapter"),
               "--temperature", "0", "--max_gen_len", "4", "--max_seq_len", "128"]
    result = subprocess.run(command, input="List 3.\n/quit\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = Llama.build(tiny_checkpoint, adapter=lora_run / "adapter", device="cpu", max_seq_len=128)
    reply = expected.chat_completion([[{"role": "user", "content": "List 3."}]], temperature=0, max_gen_len=4)
    assert reply[0]["generation"]["content"] in result.stdout
    missing = subprocess.run([*command[:4], "--adapter", str(lora_run / "nowhere")], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 1 and "adapter_config.json" in missing.stderr
