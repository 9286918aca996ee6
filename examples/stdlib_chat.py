"""A chat set built from real text on the machine, for examples/configs/smollm2_sft_lora.toml: questions about
Python standard-library functions answered from their own docstrings, in a taught style (every answer starts with
``PHRASE``), and a measure of how many held-out questions a model answers that way.

    python examples/stdlib_chat.py build data/stdlib-chat          # chats.jsonl (train + val) and heldout.jsonl
    python examples/stdlib_chat.py measure CKPT data/stdlib-chat/heldout.jsonl [--adapter RUN/adapter]

The set is deterministic: modules in a fixed list, their public functions and classes with a docstring in sorted
order, every 8th held out (never trained on); a question's wording is one of a few, chosen by the name's hash.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
from pathlib import Path

import fire

PHRASE = "From the Python docs:"
MODULES = [
    "base64", "bisect", "calendar", "collections", "copy", "csv", "datetime", "difflib", "fnmatch", "functools",
    "glob", "gzip", "hashlib", "heapq", "html", "inspect", "itertools", "json", "math", "operator", "os", "os.path",
    "pathlib", "random", "re", "shutil", "statistics", "string", "tempfile", "textwrap", "time", "urllib.parse",
    "uuid", "zlib",
]
QUESTIONS = ["What does {name} do?", "Explain {name} in Python.", "How do I use {name}?", "What is {name} for?"]
HELD_OUT_EVERY = 8


def first_paragraph(doc: str, limit: int = 320) -> str:
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    return paragraph if len(paragraph) <= limit else paragraph[:limit].rsplit(" ", 1)[0] + " ..."


def entries() -> list[tuple[str, str]]:
    """(qualified name, answer) of every documented public function or class of ``MODULES``, sorted."""
    found = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in inspect.getmembers(module):
            if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) not in (module.__name__, "builtins", "posix", "_operator"):
                continue
            doc = inspect.getdoc(obj)
            paragraph = first_paragraph(doc) if doc else ""
            if len(paragraph) >= 20:
                found[f"{module_name}.{name}"] = f"{PHRASE} {paragraph}"
    return sorted(found.items())


def question(name: str) -> str:
    choice = int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(QUESTIONS)
    return QUESTIONS[choice].format(name=f"`{name}`")


def build(output: str = "data/stdlib-chat"):
    """Write ``output``/chats.jsonl (rows to train and validate on) and heldout.jsonl (questions kept apart)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = [], []
    for i, (name, answer) in enumerate(entries()):
        row = {"messages": [{"role": "user", "content": question(name)}, {"role": "assistant", "content": answer}]}
        (held_out if i % HELD_OUT_EVERY == 0 else train).append(row)
    for file, rows in (("chats.jsonl", train), ("heldout.jsonl", held_out)):
        (out / file).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{out}: {len(train)} conversations to train on, {len(held_out)} held out", file=sys.stderr)


def taught_share(llm, rows: list[dict], max_gen_len: int = 8) -> float:
    """Share of ``rows``' questions whose greedy answer starts with ``PHRASE``."""
    dialogs = [[row["messages"][0]] for row in rows]
    answers = []
    for i in range(0, len(dialogs), llm.max_batch_size):
        results = llm.chat_completion(dialogs[i : i + llm.max_batch_size], temperature=0, max_gen_len=max_gen_len)
        answers += [r["generation"]["content"] for r in results]
    return sum(a.strip().startswith(PHRASE) for a in answers) / len(answers)


def measure(ckpt: str, heldout: str, adapter: str | None = None, limit: int = 0):
    """Print the share of held-out questions answered the taught way by ``ckpt`` (with ``adapter``)."""
    from llama import Llama

    rows = [json.loads(line) for line in Path(heldout).read_text().splitlines()]
    rows = rows[:limit] if limit else rows
    llm = Llama.build(ckpt, adapter=adapter, max_seq_len=512, max_batch_size=8, device="cpu")
    print(f"{taught_share(llm, rows):.3f} of {len(rows)} held-out questions answered '{PHRASE} ...'")


if __name__ == "__main__":
    fire.Fire({"build": build, "measure": measure})
