"""Chat data for fine-tuning: rows of conversations rendered with the checkpoint's own chat format, exactly as
inference sends them (``tokenizer.chat_format.encode_dialog``), each token marked trained or not.

Rows (JSONL, ``.jsonl.gz`` or parquet), one sample each:
  {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
  {"prompt": "...", "completion": "..."}                       (a user turn and the assistant's answer)
Preference rows, for DPO, two samples each (chosen, then rejected):
  {"prompt": "..." | "messages": [... ending with a user turn], "chosen": "...", "rejected": "..."}
  (``chosen``/``rejected`` may also be an assistant message, or a list holding one, as trl writes them)

The trained tokens are each assistant turn's content and its end-of-turn token; everything else (system and user
turns, the template's headers, what follows the end-of-turn token) is masked. ``last_turn_only`` trains the final
assistant turn alone (always so for preference pairs). Spans are found by rendering the dialog up to each
assistant turn with the generation prompt (what inference would send) and up to the end of that turn, and
comparing their ids with the whole dialog's: this works for any format, Jinja templates included, with no markers
in them. Where a tokenizer merges tokens across the turn's boundary, so that a prefix's ids are not a prefix of the
whole dialog's, the span starts where they part, and the row is counted in ``index.json``'s
``boundary_mismatches``.

Written beside each token file ``<split>-NNNNN.bin``: ``<split>-NNNNN.mask.bin`` (one uint8 per token, 1 = trained
as a target) and ``<split>-NNNNN.samples.bin`` (int64 start of every sample, then the end), named in ``index.json``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama.files import atomic_folder
from llama.training.data import ShardError, token_dtype
from llama.training.shards import SplitWriter, is_validation, write_index
from tokenizer import load_tokenizer
from tokenizer.base import Tokenizer
from tokenizer.chat_format import encode_dialog
from tokenizer.corpus import CorpusError, expand_inputs, is_jsonl

CHAT, PREFERENCE = "chat", "preference"


def read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a JSONL (optionally gzipped) or parquet file; ``where`` names file and line."""
    if is_jsonl(path):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise CorpusError(f"{path}:{lineno}: expected a JSON object, got a {type(row).__name__}")
                yield f"{path}:{lineno}", row
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CorpusError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
        for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path} row {number}", row
    else:
        raise CorpusError(f"{path}: chat data must be .jsonl, .jsonl.gz or .parquet")


def _answer(value, where: str, key: str) -> dict:
    """A preference row's chosen or rejected answer as an assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    is_message = isinstance(value, dict) and isinstance(value.get("content"), str)
    if is_message and value.get("role", "assistant") == "assistant":
        return {"role": "assistant", "content": value["content"]}
    raise CorpusError(f"{where}: {key!r} must be a string or an assistant message, got {value!r:.80}")


def _prompt(row: dict, where: str) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    if isinstance(row.get("prompt"), list):  # trl's conversational form
        return row["prompt"]
    raise CorpusError(f"{where}: expected 'messages' (a list of {{role, content}}) or a string 'prompt'")


def row_kind(row: dict) -> str:
    return PREFERENCE if "chosen" in row or "rejected" in row else CHAT


def row_dialogs(row: dict, where: str) -> list[list[dict]]:
    """The dialogs a row stands for: one (chat) or two (preference: chosen, then rejected)."""
    if row_kind(row) == PREFERENCE:
        if "chosen" not in row or "rejected" not in row:
            raise CorpusError(f"{where}: a preference row needs both 'chosen' and 'rejected'")
        prompt = _prompt(row, where)
        return [prompt + [_answer(row[key], where, key)] for key in ("chosen", "rejected")]
    if "messages" in row:
        return [row["messages"]]
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]]
    raise CorpusError(
        f"{where}: expected 'messages' (a list of {{role, content}}), 'prompt' and 'completion' strings, or a "
        f"preference row ('prompt' or 'messages', 'chosen', 'rejected'); got keys {sorted(row)}"
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def render(tokenizer: Tokenizer, dialog: list[dict], last_turn_only: bool = False) -> tuple[list[int], list[int], int]:
    """(ids, mask, boundary mismatches) of a dialog ending with an assistant turn: ``mask[t]`` is 1 where token t
    is trained (the assistant contents and their end-of-turn tokens)."""
    ids = encode_dialog(tokenizer, dialog, add_generation_prompt=False)  # checks the dialog
    if dialog[-1]["role"] != "assistant":
        raise ValueError(f"the dialog must end with an assistant turn to train on, not {dialog[-1]['role']!r}")
    mask = [0] * len(ids)
    turns = [i for i, message in enumerate(dialog) if message["role"] == "assistant"]
    mismatches = 0
    for turn in turns[-1:] if last_turn_only else turns:
        prompt = encode_dialog(tokenizer, dialog[:turn], add_generation_prompt=True)  # what inference sends
        through = encode_dialog(tokenizer, dialog[: turn + 1], add_generation_prompt=False)
        start, end = _common_prefix(prompt, ids), _common_prefix(through, ids)
        mismatches += start != len(prompt) or end != len(through)
        # the turn ends at its first end-of-turn token: what follows it (ChatML's "\n") is never generated
        stop = next((t for t in range(start, end) if ids[t] in tokenizer.stop_ids), end - 1)
        mask[start : stop + 1] = [1] * (stop + 1 - start)
    return ids, mask, mismatches


class ChatSplitWriter(SplitWriter):
    """``SplitWriter``'s token files, plus each file's mask and sample offsets."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        super().__init__(root, split, dtype, shard_tokens)
        self.masks, self.offsets = None, [0]

    def write_sample(self, ids: list[int], mask: list[int]):
        if self.handle is None or self.files[-1]["tokens"] >= self.shard_tokens:  # write() starts a new file
            self._finish_extras()
            self.write(ids)
            name = self.files[-1]["path"].removesuffix(".bin")
            self.files[-1].update({"mask": f"{name}.mask.bin", "samples": f"{name}.samples.bin", "trained_tokens": 0})
            self.masks, self.offsets = open(self.root / self.files[-1]["mask"], "wb"), [0]
        else:
            self.write(ids)
        np.asarray(mask, dtype=np.uint8).tofile(self.masks)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.files[-1]["trained_tokens"] += sum(mask)

    def _finish_extras(self):
        """The current file's mask closed and its sample offsets written."""
        if self.masks is not None:
            self.masks.close()
            np.asarray(self.offsets, dtype=np.int64).tofile(self.root / self.files[-1]["samples"])
            self.masks = None

    def close(self):
        self._finish_extras()
        super().close()

    def summary(self) -> dict:
        return {**super().summary(), "trained_tokens": sum(f.get("trained_tokens", 0) for f in self.files)}


def prepare_chat(inputs: list[str], tokenizer: str, output: str, val_fraction: float = 0.01,
                 last_turn_only: bool = False, shard_tokens: int = 100_000_000) -> Path:
    """Render chat or preference rows of ``inputs`` with ``tokenizer``'s chat format into the new shard folder
    ``output`` (``llama.training.packing`` reads it)."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"output {output} already exists; remove it or choose another --output")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    kind, mismatches, rows = None, 0, 0
    with atomic_folder(output) as tmp:
        writers = {split: ChatSplitWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")}
        try:
            for where, row in tqdm((r for path in files for r in read_rows(path)), desc="rendering", unit="row"):
                if kind is None:
                    kind = row_kind(row)
                elif row_kind(row) != kind:
                    raise CorpusError(f"{where}: a {row_kind(row)} row among {kind} rows; keep them in separate sets")
                writer = writers["val" if is_validation(rows, val_fraction) else "train"]
                for dialog in row_dialogs(row, where):
                    try:
                        ids, mask, mismatch = render(tok, dialog, last_turn_only or kind == PREFERENCE)
                    except ValueError as e:
                        raise CorpusError(f"{where}: {e}") from None
                    writer.write_sample(ids, mask)
                    mismatches += mismatch
                rows += 1
        finally:
            for writer in writers.values():
                writer.close()
        splits = {split: writer.summary() for split, writer in writers.items()}
        if splits["train"]["documents"] == 0:
            raise ShardError(f"no training rows in {' '.join(map(str, inputs))}")
        write_index(tmp, tok, tokenizer, len(files), val_fraction, splits, format=kind,
                    last_turn_only=last_turn_only or kind == PREFERENCE, rows=rows, boundary_mismatches=mismatches)
    return output
