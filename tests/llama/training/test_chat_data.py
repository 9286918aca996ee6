"""Chat data: the trained tokens are exactly each assistant turn's content and its end-of-turn token, for Llama 2's
format, Llama 3's and a Jinja template (SmolLM2's), and equal to transformers' assistant mask where a template
marks its generation blocks; packed windows give each sample the losses it gives alone."""

import base64
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.loss import IGNORE_INDEX
from llama.model import ModelArgs, Transformer
from llama.prepare import main as prepare_main
from llama.training.chat_data import prepare_chat, render
from llama.training.data import read_index
from llama.training.packing import PackedWindows, PreferencePairs, pack
from tokenizer import load_tokenizer
from tokenizer.corpus import CorpusError
from tokenizer.train import train as train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DIALOG = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "Six, of course."},
]
GENERATION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llama2_tokenizer(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
    files = [str(STDLIB / name) for name in ("argparse.py", "textwrap.py")]
    train_tokenizer(files, vocab_size=1000, output=str(prefix))
    return load_tokenizer(prefix.with_suffix(".model"))


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    """A small tiktoken vocabulary (Llama 3's file format, so Llama 3's special tokens and chat format)."""
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import models, pre_tokenizers, trainers

    from tokenizer.hf import char_to_byte, split_then_bytes
    from tokenizer.tiktoken_bpe import LLAMA3_PATTERN

    backend = HFBackend(models.BPE())
    backend.pre_tokenizer = split_then_bytes(LLAMA3_PATTERN)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train([str(STDLIB / "textwrap.py")], trainer)
    ranks = {bytes(char_to_byte()[c] for c in token): i for token, i in backend.get_vocab().items()}
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda item: item[1])]
    path.write_text("".join(lines))
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf_path):
    return load_tokenizer(smollm2_gguf_path)


def trained_runs(ids, mask) -> list[list[int]]:
    runs, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("which", ["llama2_tokenizer", "llama3_tokenizer", "smollm2_tokenizer"])
def test_trained_tokens_are_the_assistant_contents_and_their_end_of_turn(which, request):
    tok = request.getfixturevalue(which)
    ids, mask, mismatches = render(tok, DIALOG)
    assert mismatches == 0
    answers = [m["content"] for m in DIALOG if m["role"] == "assistant"]
    runs = trained_runs(ids, mask)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] in tok.stop_ids  # the model learns to stop
        assert tok.decode(run[:-1]).strip() == answer
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert all(answer not in untrained for answer in answers)
    last_ids, last_mask, _ = render(tok, DIALOG, last_turn_only=True)
    assert last_ids == ids and trained_runs(last_ids, last_mask) == runs[-1:]


def test_masks_equal_transformers_assistant_masks(smollm2_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    smollm2_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GENERATION_TEMPLATE}))
    ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for dialog in (DIALOG[1:], DIALOG[1:3]):
        ids, mask, _ = render(ours, dialog)
        out = theirs.apply_chat_template(dialog, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == list(out["input_ids"])
        assert mask == list(out["assistant_masks"])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    """Conversations of very different lengths, both row shapes."""
    rows = []
    for i in range(n):
        words = " ".join(["word"] * (3 + (i * 7) % 40))
        if i % 3 == 0:
            rows.append({"prompt": f"Say {i}", "completion": f"{i}: {words}"})
        else:
            rows.append({"messages": [{"role": "user", "content": f"Question {i}? {words}"},
                                      {"role": "assistant", "content": f"Answer {i}."},
                                      {"role": "user", "content": "More?"},
                                      {"role": "assistant", "content": words[: 5 * i]}]})
    return rows


@pytest.fixture(scope="module")
def chat_shards(smollm2_gguf_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return prepare_chat([str(write_jsonl(root / "chats.jsonl", chat_rows(24)))], str(smollm2_gguf_path),
                        root / "shards", val_fraction=0.2)


def test_prepared_shards_hold_every_sample_and_its_mask(chat_shards, smollm2_tokenizer):
    meta = json.loads((chat_shards / "index.json").read_text())
    assert meta["format"] == "chat" and meta["rows"] == 24 and meta["boundary_mismatches"] == 0
    assert meta["splits"]["val"]["documents"] == 4 and meta["splits"]["train"]["documents"] == 20
    windows = PackedWindows(read_index(chat_shards), "train", 256)
    ids, trained = windows.samples[0]
    expected_ids, expected_mask, _ = render(smollm2_tokenizer, chat_rows(24)[0] and [
        {"role": "user", "content": "Say 0"}, {"role": "assistant", "content": "0: " + " ".join(["word"] * 3)}])
    assert ids.tolist() == expected_ids and trained.astype(int).tolist() == expected_mask


def test_prepare_command_refuses_a_bad_row_naming_its_line(smollm2_gguf_path, tmp_path):
    rows = chat_rows(2) + [{"messages": [{"role": "assistant", "content": "no question"}]}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit) as exit:
        prepare_main(["--format", "chat", "--input", str(path), "--tokenizer", str(smollm2_gguf_path),
                      "--output", str(tmp_path / "out")])
    assert str(exit.value.code).startswith(f"python -m llama.prepare: error: {path}:3: dialog roles ['assistant']")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CorpusError, match=r"bad2.jsonl:1: expected 'messages'"):
        prepare_chat([str(write_jsonl(tmp_path / "bad2.jsonl", [{"text": "x"}]))], str(smollm2_gguf_path),
                     tmp_path / "out2")


def test_packing_fits_every_sample_once_best_fit_decreasing():
    lengths = {i: n for i, n in enumerate([9, 5, 5, 3, 2, 17, 4, 8])}
    windows = pack(lengths, 16)
    assert sorted(i for w in windows for i in w) == sorted(lengths)
    assert all(sum(lengths[i] - 1 for i in w) <= 16 for w in windows)
    assert len(windows) == 3  # 45 positions in windows of 16


def test_overlong_samples_are_truncated_or_dropped_and_counted(chat_shards):
    index = read_index(chat_shards)
    longest = int(PackedWindows(index, "train", 512).samples.lengths.max())
    seq_len = longest - 10
    truncated = PackedWindows(index, "train", seq_len, "truncate")
    dropped = PackedWindows(index, "train", seq_len, "drop")
    too_long = int((truncated.samples.lengths > seq_len + 1).sum())
    assert too_long > 0 and truncated.dropped.truncated == too_long and dropped.dropped.too_long == too_long
    assert len(dropped.lengths) == len(truncated.lengths) - too_long
    assert max(truncated.lengths.values()) == seq_len + 1


@pytest.fixture(scope="module")
def tiny_model():
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, multiple_of=16,
                                  max_seq_len=512))
    model.init_weights(std=0.2, seed=0)
    return model.eval()


def test_packed_window_gives_each_sample_its_losses_alone(chat_shards, tiny_model):
    windows = PackedWindows(read_index(chat_shards), "train", 256)
    w = max(range(len(windows)), key=lambda w: len(windows.windows[w]))
    assert len(windows.windows[w]) >= 3
    batch = windows.training_batch([w])
    assert batch.mask is not None and batch.positions is not None
    with torch.no_grad():
        packed = tiny_model(batch.inputs, input_pos=batch.positions, mask=batch.mask, targets=batch.targets,
                            reduction="none")[0]
        at = 0
        for i in windows.windows[w]:
            ids, trained = windows.samples[i]
            targets = torch.from_numpy(np.where(trained[1:], ids[1:], IGNORE_INDEX))[None]
            alone = tiny_model(torch.from_numpy(ids[:-1])[None], targets=targets, reduction="none")[0]
            n = len(ids) - 1
            torch.testing.assert_close(packed[at : at + n], alone, rtol=0, atol=1e-5)
            # rotary attention is relative, so the losses alone cannot tell: the positions restart as at inference
            assert batch.positions[0, at : at + n].tolist() == list(range(n))
            at += n
        # a changed neighbour (the first sample's tokens replaced) leaves the others' losses as they were
        first = len(windows.samples[windows.windows[w][0]][0]) - 1
        changed = batch.inputs.clone()
        changed[0, :first] = torch.randint(0, 49152, (first,))
        again = tiny_model(changed, input_pos=batch.positions, mask=batch.mask, targets=batch.targets,
                           reduction="none")[0]
    torch.testing.assert_close(again[first:], packed[first:], rtol=0, atol=1e-6)
    assert (again[:first] - packed[:first]).abs().max() > 1e-3


def test_preference_rows_become_pairs(smollm2_gguf_path, tmp_path):
    rows = [{"prompt": f"Pick {i}", "chosen": f"Yes {i}", "rejected": [{"role": "assistant", "content": f"No {i}"}]}
            for i in range(6)]
    shards = prepare_chat([str(write_jsonl(tmp_path / "pref.jsonl", rows))], str(smollm2_gguf_path),
                          tmp_path / "pref", val_fraction=0)
    index = read_index(shards)
    assert index.format == "preference"
    pairs = PreferencePairs(index, "train", 64)
    assert len(pairs) == 6
    batch = pairs.training_batch([0, 3])
    tok = load_tokenizer(smollm2_gguf_path)
    assert batch.inputs.shape == (4, 64)
    trained = [tok.decode(t[t != IGNORE_INDEX].tolist()) for t in batch.targets]
    assert trained == ["Yes 0<|im_end|>", "Yes 3<|im_end|>", "No 0<|im_end|>", "No 3<|im_end|>"]


def test_parquet_rows_give_the_same_shards_as_jsonl(smollm2_gguf_path, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    rows = chat_rows(6)
    rows = [r if "messages" in r else {"messages": [{"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": r["completion"]}]} for r in rows]
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "chats.parquet")
    from_parquet = prepare_chat([str(tmp_path / "chats.parquet")], str(smollm2_gguf_path), tmp_path / "a")
    jsonl = write_jsonl(tmp_path / "chats.jsonl", rows)
    from_jsonl = prepare_chat([str(jsonl)], str(smollm2_gguf_path), tmp_path / "b")
    for name in ("train-00000.bin", "train-00000.mask.bin", "train-00000.samples.bin"):
        assert (from_parquet / name).read_bytes() == (from_jsonl / name).read_bytes()
