"""Fill-in-the-middle training documents: every one reassembles into the original text, the rates and split points
follow the options, and llama.prepare writes the same shards with 1 and 2 workers."""

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llama.prepare import main as prepare_main
from llama.training.fim import FimOptions, encode_document, fim_split
from llama.training.shards import prepare
from tokenizer import load_tokenizer
from tokenizer.fim import fim_tokens
from tokenizer.train import train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE_LLAMA = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]
STARCODER = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The json package and a few modules of the standard library, plus texts at the edges."""
    root = tmp_path_factory.mktemp("corpus")
    for f in [*sorted((STDLIB / "json").glob("*.py")), STDLIB / "textwrap.py", STDLIB / "shlex.py"]:
        (root / f.name).write_text(f.read_text())
    (root / "edges.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "a", "  leading spaces", "trailing spaces  ", "naïve café 日本語 👍🏽", "\n\n\tx = 1\n", "x" * 3,
    ]))
    return root


def documents(corpus: Path) -> list[str]:
    texts = [f.read_text() for f in sorted(corpus.glob("*.py"))]
    return texts + [json.loads(line)["text"] for line in (corpus / "edges.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory, corpus) -> Path:
    prefix = tmp_path_factory.mktemp("tok") / "tokenizer"
    train([str(f) for f in sorted(corpus.glob("*.py"))], vocab_size=600, output=str(prefix))
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def tokenizers(sp_path, smollm2_gguf_path):
    """Code Llama's pieces in a sentencepiece model (with EOT), StarCoder's names in SmolLM2's BPE (no EOT)."""
    return {
        "sentencepiece": load_tokenizer(sp_path).with_added_tokens(CODE_LLAMA),
        "bpe": load_tokenizer(smollm2_gguf_path).with_added_tokens(STARCODER),
    }


def reassemble(tokenizer, ids: list[int], split) -> str:
    """The text read back from a FIM document's ids, piece by piece, in Code Llama's layout."""
    fim = fim_tokens(tokenizer)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    end = ([fim.end] if fim.end is not None else []) + [tokenizer.eos_id]
    assert ids[: len(bos) + 1] == bos + [fim.prefix] and ids[-len(end) :] == end
    body = ids[len(bos) + 1 : -len(end)]
    assert body.count(fim.suffix) == body.count(fim.middle) == 1
    if split.suffix_first:  # SUF suffix MID prefix middle
        assert body[0] == fim.suffix
        suffix, after = body[1 : body.index(fim.middle)], body[body.index(fim.middle) + 1 :]
        n_prefix = len(tokenizer.encode(split.prefix))
        prefix, middle = after[:n_prefix], after[n_prefix:]
    else:  # prefix SUF suffix MID middle
        prefix = body[: body.index(fim.suffix)]
        suffix = body[body.index(fim.suffix) + 1 : body.index(fim.middle)]
        middle = body[body.index(fim.middle) + 1 :]
    return tokenizer.decode(prefix) + tokenizer.decode_infill(middle) + tokenizer.decode_infill(suffix)


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_every_transformed_document_reassembles(tokenizers, corpus, kind):
    tokenizer = tokenizers[kind]
    options = FimOptions(rate=1.0, spm_rate=0.5, seed=3)
    layouts = set()
    for n, text in enumerate(documents(corpus)):
        for doc_number in (n, n + 1000):  # two cuts of each
            ids, split = encode_document(tokenizer, text, doc_number, options)
            assert split.prefix + split.middle + split.suffix == text
            assert reassemble(tokenizer, ids, split) == text
            layouts.add(split.suffix_first)
    assert layouts == {False, True}


def test_untransformed_documents_are_encoded_whole(tokenizers):
    tokenizer = tokenizers["sentencepiece"]
    ids, split = encode_document(tokenizer, "x = 1\n", 0, FimOptions(rate=0.0))
    assert split is None and ids == tokenizer.encode("x = 1\n", bos=True, eos=True)


def within_3_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p))


def test_rates_and_split_points_follow_the_options():
    n, options = 4000, FimOptions(rate=0.9, spm_rate=0.3, seed=7)
    text = "".join(chr(ord("a") + i % 26) for i in range(999))
    splits = [fim_split(text, i, options) for i in range(n)]
    cut = [s for s in splits if s is not None]
    assert within_3_sigma(len(cut), n, options.rate)
    assert within_3_sigma(sum(s.suffix_first for s in cut), len(cut), options.spm_rate)
    # the cuts are the smaller and the larger of two uniform positions: means 1/3 and 2/3 of the length
    starts, ends = [len(s.prefix) / len(text) for s in cut], [1 - len(s.suffix) / len(text) for s in cut]
    for positions, mean in (starts, 1 / 3), (ends, 2 / 3):
        assert abs(np.mean(positions) - mean) <= 3 * np.std(positions) / math.sqrt(len(cut))
    # a document's cut depends on its number and the seed only
    assert fim_split(text, 11, options) == fim_split(text, 11, options) != fim_split(text, 11, FimOptions(0.9, 0.3, 8))


def test_prepare_with_fim_is_the_same_with_1_and_2_workers(tmp_path, corpus, sp_path):
    kwargs = dict(val_fraction=0.1, add_tokens=CODE_LLAMA, fim=FimOptions(rate=0.9, spm_rate=0.5, seed=1))
    one = prepare([str(corpus)], str(sp_path), tmp_path / "one", workers=1, **kwargs)
    two = prepare([str(corpus)], str(sp_path), tmp_path / "two", workers=2, **kwargs)
    assert {p.name: p.read_bytes() for p in one.glob("*.bin")} == {p.name: p.read_bytes() for p in two.glob("*.bin")}
    assert (one / "index.json").read_text() == (two / "index.json").read_text()
    index = json.loads((one / "index.json").read_text())
    grown = load_tokenizer(one / "tokenizer")
    assert index["added_tokens"] == dict(zip(CODE_LLAMA, range(600, 604)))
    assert index["vocab_size"] == grown.vocab_size == 604
    assert index["fim"]["token_ids"] == {"prefix": 600, "suffix": 602, "middle": 601, "end": 603}
    assert (index["fim"]["rate"], index["fim"]["spm_rate"], index["fim"]["seed"]) == (0.9, 0.5, 1)
    cut = index["fim"]["psm_documents"] + index["fim"]["spm_documents"]
    expected = sum(fim_split(t, i, kwargs["fim"]) is not None for i, t in enumerate(documents(corpus)))
    assert cut == expected and 0 < index["fim"]["spm_documents"] < cut
    tokens = np.concatenate([np.fromfile(p, dtype=index["dtype"]) for p in sorted(one.glob("*.bin"))])
    assert (tokens == 600).sum() == cut  # one PRE per transformed document


def test_fim_without_fim_tokens_is_refused(tmp_path, corpus, sp_path):
    args = ["--input", str(corpus), "--tokenizer", str(sp_path), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"llama.prepare: error: .* no fill-in-the-middle tokens .*--add_tokens"):
        prepare_main([*args, "--fim_rate", "0.9"])
    with pytest.raises(SystemExit, match=r"--fim_rate must be in \[0, 1\], got 1.5"):
        prepare_main([*args, "--add_tokens", *CODE_LLAMA, "--fim_rate", "1.5"])
    assert not (tmp_path / "out").exists()
