"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), for exact resume.

``<run>/step-N/`` holds the model and optimizer (DCP, each process writing its own shards, reloadable on any
number of processes), ``rng-rank-R.pt`` per process (tensors and numbers, read with ``weights_only=True``: a file
holding anything else is refused, never run), and ``train_state.json`` (step, global sample counter, scheduler,
skipped-step count, and what defines the run: tokenizer, shards, sequence length, global batch, seed, model
arguments). A save fills a hidden temporary folder, ``train_state.json`` last, which rank 0 renames to ``step-N/``
after every process has finished and everything is on disk (``llama.files``), so a crash mid-save leaves the
previous checkpoint as the newest complete one. (Loading a pretrained model for the start of a run is
``llama.checkpoint``'s job, not this one.)
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from llama.files import commit, remove_leftovers, temporary_name

STEP_DIR = re.compile(r"step-(\d+)")
# Only what trains is saved: under LoRA the adapters (the frozen base comes from model.init_from again).
TRAINABLE = StateDictOptions(ignore_frozen_params=True)
WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing, compile: not in state keys


def trainable_state(model, model_sd: dict) -> dict:
    """``model_sd`` less the frozen tensors that ``ignore_frozen_params`` keeps: buffers (a quantised base's)."""
    names = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            for wrapper in WRAPPERS:
                name = name.replace(wrapper, "")
            names.add(name)
    return {key: value for key, value in model_sd.items() if key in names}
TRAIN_STATE = "train_state.json"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what was expected."""


class CheckpointMismatch(ResumeError):
    """A checkpoint of another model or another run than the one configured."""


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """``step-N`` folders that finished saving, oldest first (a folder without its ``train_state.json`` is not
    one of ours)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if STEP_DIR.fullmatch(p.name) and (p / TRAIN_STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(run_dir: Path, step: int, model, optimizer, train_state: dict, keep: int):
    """Collective: every process calls it."""
    rank = dist.get_rank()
    final = run_dir / f"step-{step}"
    names = [str(temporary_name(final))]  # rank 0's: the folder every process writes into
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(run_dir / "step-*")  # saves a crash interrupted; never resumed from
        shutil.rmtree(names[0], ignore_errors=True)
        Path(names[0]).mkdir()
    dist.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINABLE)
    model_sd = trainable_state(model, model_sd)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), tmp / f"rng-rank-{rank}.pt")
    dist.barrier()  # every shard is written before the checkpoint is declared complete
    if rank == 0:
        (tmp / TRAIN_STATE).write_text(json.dumps({**train_state, "world_size": dist.get_world_size()}, indent=2))
        commit(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def check_shapes(path: Path, model_sd: dict):
    """Refuses a checkpoint whose model tensors do not have this model's names and shapes."""
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    stored = {k.removeprefix("model."): v.size for k, v in stored.items() if k.startswith("model.")}
    ours = {k: v.shape for k, v in model_sd.items()}
    if stored.keys() != ours.keys():
        missing, extra = sorted(ours.keys() - stored.keys()), sorted(stored.keys() - ours.keys())
        raise CheckpointMismatch(
            f"checkpoint {path} is from a different model: missing {missing[:3]}, unexpected {extra[:3]}; "
            "use another --checkpoint.dir or the architecture it was trained with"
        )
    for name, shape in ours.items():
        if tuple(stored[name]) != tuple(shape):
            raise CheckpointMismatch(
                f"checkpoint {path} is from a different model: {name} has shape {tuple(stored[name])} there, "
                f"{tuple(shape)} in the configured model; use another --checkpoint.dir or the architecture it "
                "was trained with"
            )


def read_train_state(path: Path) -> dict:
    file = path / TRAIN_STATE
    try:
        state = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ResumeError(f"{file}: not valid JSON ({e})") from None
    if not (isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ("step", "samples", "world_size"))):
        raise ResumeError(f"{file}: expected a JSON object with integer step, samples and world_size")
    return state


def check_run(path: Path, run: dict, allowed: tuple[str, ...] = ()):
    """Refuses to resume from ``path`` a run that differs from the one it records (``run``: the tokenizer's
    fingerprint, the shards, seq_len, global_batch_size, seed and the model arguments), unless ``allowed`` names
    what changed. A checkpoint that records no run (written before runs were recorded) is not checked."""
    recorded = read_train_state(path).get("run") or {}
    for key, now in json.loads(json.dumps(run)).items():  # as train_state.json gives it back: tuples as lists
        then = recorded.get(key)
        if then is None or key in allowed or _same(key, then, now):
            continue
        if key == "tokenizer":
            advice = "its embedding rows stand for that tokenizer's tokens: train on shards made with it"
        else:
            advice = f"to resume with this change, add --checkpoint.allow_changed={key}"
        raise CheckpointMismatch(
            f"{path} was saved by a run with {_describe(key, then, now)}, this run has {_describe(key, now, then)}; "
            f"{advice}, or use another checkpoint.dir"
        )


def _same(key: str, then, now) -> bool:
    return then["digest"] == now["digest"] if key == "shards" else then == now


def _describe(key: str, value, other) -> str:
    if key == "tokenizer":
        return f"tokenizer fingerprint {value[:16]}"
    if key == "shards":
        return f"shards {value['path']} ({value['train_tokens']} training tokens, digest {value['digest']})"
    if key == "model":
        changed = sorted(k for k in value.keys() | other.keys() if value.get(k) != other.get(k))
        return "model " + ", ".join(f"{k}={value.get(k)!r}" for k in changed)
    return f"{key} {value!r}"


def load_rng_state(file: Path):
    """Restores the RNG states saved in ``file``. It is read with ``weights_only=True``: a file holding anything
    but tensors and plain values (a pickled object would run code as it loads) is refused, naming it."""
    try:
        set_rng_state(torch.load(file, weights_only=True))
    except Exception as e:  # UnpicklingError for a forbidden object, RuntimeError for a damaged file, Key/TypeError
        lines = str(e).splitlines()
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(e).__name__)
        raise ResumeError(f"{file}: not RNG states saved by llama.train (tensors and numbers); not loaded: {reason}")


def load(path: Path, model, optimizer) -> dict:
    """Collective: restores model, optimizer and (same world size) RNG states; returns the train state."""
    train_state = read_train_state(path)
    rng_file = path / f"rng-rank-{dist.get_rank()}.pt"
    if train_state["world_size"] == dist.get_world_size() and rng_file.is_file():
        load_rng_state(rng_file)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINABLE)
    model_sd = trainable_state(model, model_sd)
    check_shapes(path, model_sd)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path)  # DCP's .metadata is a pickle: the run folder is trusted input (README)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # keys: check_shapes
    return train_state
