"""llama.prepare: stdlib source tokenized into shards that are deterministic, typed and complete or absent."""

import gzip
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llama.training import shards as prepare_module
from llama.training.data import ShardError, TokenWindows, read_index, token_dtype
from llama.training.shards import prepare
from tokenizer import load_tokenizer
from tokenizer.corpus import CorpusError
from tokenizer.train import train as train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of real text: the json and email packages of the standard library."""
    root = tmp_path_factory.mktemp("corpus")
    for package in ("json", "email"):
        (root / package).mkdir()
        for f in sorted((STDLIB / package).glob("*.py")):
            (root / package / f.name).write_text(f.read_text())
    return root


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory, corpus) -> Path:
    prefix = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([str(f) for f in sorted(corpus.rglob("*.py"))[:8]], vocab_size=400, output=str(prefix))
    return prefix.with_suffix(".model")


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def test_output_is_deterministic_whatever_the_worker_count(tmp_path, corpus, sp_tokenizer):
    one = prepare([str(corpus)], str(sp_tokenizer), tmp_path / "one", val_fraction=0.1, workers=1)
    two = prepare([str(corpus)], str(sp_tokenizer), tmp_path / "two", val_fraction=0.1, workers=2)
    assert shard_bytes(one) == shard_bytes(two)
    assert (one / "index.json").read_text() == (two / "index.json").read_text()


def test_index_records_tokenizer_and_counts(tmp_path, corpus, sp_tokenizer):
    out = prepare([str(corpus)], str(sp_tokenizer), tmp_path / "shards", val_fraction=0.1, shard_tokens=20_000)
    index = json.loads((out / "index.json").read_text())
    tok = load_tokenizer(sp_tokenizer)
    files = sorted(corpus.rglob("*.py"))
    assert index["fingerprint"] == tok.fingerprint and index["vocab_size"] == tok.vocab_size
    assert index["dtype"] == "uint16"
    assert index["documents"] == len(files)
    assert index["splits"]["val"]["documents"] == len(files) // 10
    assert len(index["splits"]["train"]["files"]) > 1  # split into files of at most ~20k tokens
    # Every document is BOS + text + EOS (sentencepiece's Llama convention), concatenated in sorted order.
    first = np.fromfile(out / "train-00000.bin", dtype=np.uint16)
    expected = tok.encode(files[0].read_text(), bos=True, eos=True)
    assert first[: len(expected)].tolist() == expected
    assert index["tokens"] == sum(p.stat().st_size for p in out.glob("*.bin")) // 2
    assert index["tokens"] == index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"]
    # The shards carry their tokenizer, so training and export need no other path.
    assert load_tokenizer(out / "tokenizer").fingerprint == tok.fingerprint


def test_jsonl_and_gzipped_jsonl_documents(tmp_path, sp_tokenizer):
    docs = ["def f():\n    return 1\n", "import os\nprint(os.sep)\n", "class A:\n    pass\n"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:2]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": docs[2]}) + "\n")
    out = prepare([str(tmp_path / "*.jsonl*")], str(sp_tokenizer), tmp_path / "shards", val_fraction=0)
    tok = load_tokenizer(sp_tokenizer)
    expected = [i for d in docs for i in tok.encode(d, bos=True, eos=True)]
    assert np.fromfile(out / "train-00000.bin", dtype=np.uint16).tolist() == expected


def test_jsonl_without_text_field_is_refused(tmp_path, sp_tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:1: expected a JSON object with a 'text' field"):
        prepare([str(tmp_path / "bad.jsonl")], str(sp_tokenizer), tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def test_parquet_needs_pyarrow(tmp_path, sp_tokenizer):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "data.parquet").write_bytes(b"PAR1")
        with pytest.raises(CorpusError, match="pip install pyarrow"):
            prepare([str(tmp_path / "data.parquet")], str(sp_tokenizer), tmp_path / "shards")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["x = 1\n", "y = 2\n"]}), tmp_path / "data.parquet")
        out = prepare([str(tmp_path / "data.parquet")], str(sp_tokenizer), tmp_path / "shards", val_fraction=0)
        assert read_index(out).splits["train"]["documents"] == 2


def test_dtype_is_the_narrowest_that_holds_the_vocabulary():
    assert token_dtype(400) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128256) == np.uint32  # Llama 3


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, corpus, sp_tokenizer, monkeypatch):
    def crash(self, ids):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway

    monkeypatch.setattr(prepare_module.SplitWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], str(sp_tokenizer), tmp_path / "shards")
    assert list(tmp_path.iterdir()) == []  # no output folder and no temp folder left behind
    # A folder without its index (say, copied while being written) is refused by the reader.
    (tmp_path / "half").mkdir()
    with pytest.raises(ShardError, match="not a complete shard folder"):
        read_index(tmp_path / "half")


def test_folders_are_searched_recursively_minus_excluded_names(tmp_path, corpus, sp_tokenizer):
    out = prepare([str(corpus)], str(sp_tokenizer), tmp_path / "shards", val_fraction=0, exclude=["email"])
    assert read_index(out).splits["train"]["documents"] == len(list((corpus / "json").glob("*.py")))


def test_existing_output_is_not_overwritten(tmp_path, corpus, sp_tokenizer):
    (tmp_path / "shards").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        prepare([str(corpus)], str(sp_tokenizer), tmp_path / "shards")


def test_missing_input_is_named(tmp_path, sp_tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.txt matches no file"):
        prepare([str(tmp_path / "nope.txt")], str(sp_tokenizer), tmp_path / "shards")


def test_empty_and_truncated_shards_are_refused(tmp_path, corpus, sp_tokenizer):
    out = prepare([str(corpus)], str(sp_tokenizer), tmp_path / "shards", val_fraction=0.1)
    shard = out / "train-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])  # an odd number of bytes: not whole uint16 tokens
    with pytest.raises(ShardError, match="train-00000.bin is truncated or corrupt"):
        TokenWindows(read_index(out), "train", 32)
    shard.write_bytes(data[:-2])  # whole tokens, but fewer than the index says
    with pytest.raises(ShardError, match="truncated or corrupt"):
        TokenWindows(read_index(out), "train", 32)
    shard.write_bytes(b"")
    with pytest.raises(ShardError, match="train-00000.bin is empty"):
        TokenWindows(read_index(out), "train", 32)
