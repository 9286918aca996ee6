"""``python -m tokenizer.train --input DIR``: a folder of text trains a sentencepiece BPE whose pieces are learned from
that text; an input that does not exist is named in a one-line error."""

import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm

VOCAB_SIZE = 500  # 3 specials, 256 byte pieces, ~90 characters of the text and ~150 merges


def train_command(*args):
    return subprocess.run([sys.executable, "-m", "tokenizer.train", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_files):
    """A folder of two stdlib sources (one in a subfolder), and a file that is not a document and must not count."""
    folder = tmp_path_factory.mktemp("corpus")
    shutil.copy(stdlib_files[1], folder / "textwrap.py")
    (folder / "json").mkdir()
    shutil.copy(stdlib_files[2], folder / "json" / "decoder.py")
    # Were it read, its word, repeated more than any word of the sources, would be learned as a piece of its own.
    (folder / "noise.bin").write_text("zqxj zqxj zqxj zqxj\n" * 5_000)
    return folder


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("out") / "tok"
    result = train_command("--input", str(corpus), "--vocab_size", str(VOCAB_SIZE), "--output", str(prefix))
    assert result.returncode == 0, result.stderr
    assert f"wrote {prefix}.model ({VOCAB_SIZE} pieces)" in result.stdout
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def test_training_on_a_folder_writes_a_model_of_the_asked_size(trained):
    assert trained.get_piece_size() == VOCAB_SIZE
    assert [trained.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


def test_its_pieces_are_learned_from_the_folder_and_encode_its_text(trained, corpus):
    pieces = {trained.id_to_piece(i) for i in range(trained.get_piece_size())}
    assert {"▁self", "▁return"} & pieces  # words frequent in both files
    assert not any("zqxj" in piece for piece in pieces)  # the .bin file was not read
    for path in (corpus / "textwrap.py", corpus / "json" / "decoder.py"):
        text = path.read_text()
        ids = trained.encode(text)
        assert trained.decode(ids) == text
        assert len(ids) < 0.6 * len(text.encode())  # merges, not bytes: ~0.5 tokens per byte here


def test_a_missing_input_is_named_in_a_one_line_error(corpus, tmp_path):
    missing = tmp_path / "no-such-folder"
    result = train_command("--input", str(corpus), str(missing), "--vocab_size", "300", "--output", str(tmp_path / "t"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"python -m tokenizer.train: error: input {missing} matches no file or folder"
    assert not list(tmp_path.glob("t.*"))  # nothing was written
