"""Corpus inputs as ``python -m tokenizer.train`` and ``python -m llama.prepare`` read them: files, folders (searched
recursively for document files, minus excluded names), glob patterns and comma lists of those, expanded to one
sorted list without repeats; and the documents of each kind of file."""

import gzip
import json

import pytest

from tokenizer.corpus import CorpusError, expand_inputs, read_documents


@pytest.fixture
def tree(tmp_path):
    """A small corpus folder: documents at several depths, files that are not documents, an excluded folder."""
    files = {
        "a.txt": "alpha",
        "b.md": "beta",
        "notes.bin": "not a document",
        "data.jsonl": '{"text": "one"}\n{"text": "two"}\n',
        "sub/c.py": "print('c')",
        "sub/deeper/d.rst": "delta",
        "sub/deeper/image.png": "not a document",
        "skip/e.txt": "excluded by folder name",
        "sub/skip_me.txt": "excluded by file name",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def names(paths, root):
    return [str(p.relative_to(root)) for p in paths]


def test_a_folder_is_searched_recursively_for_document_files(tree):
    found = expand_inputs(str(tree))
    assert names(found, tree) == [
        "a.txt", "b.md", "data.jsonl", "skip/e.txt", "sub/c.py", "sub/deeper/d.rst", "sub/skip_me.txt",
    ]


def test_exclude_patterns_skip_folders_and_files_by_name(tree):
    found = expand_inputs([str(tree)], exclude=["skip", "*_me.txt"])
    assert names(found, tree) == ["a.txt", "b.md", "data.jsonl", "sub/c.py", "sub/deeper/d.rst"]


def test_exclude_looks_only_below_the_folder_given(tree):
    # the folder's own name (and its parents') matching a pattern does not exclude everything in it
    assert names(expand_inputs(str(tree / "sub"), exclude=["sub"]), tree) == [
        "sub/c.py", "sub/deeper/d.rst", "sub/skip_me.txt",
    ]


def test_a_file_given_by_name_is_taken_whatever_its_suffix(tree):
    assert expand_inputs(str(tree / "notes.bin")) == [tree / "notes.bin"]


def test_globs_expand_including_recursive_ones(tree):
    assert names(expand_inputs(str(tree / "*.txt")), tree) == ["a.txt"]
    assert names(expand_inputs(str(tree / "**" / "*.txt")), tree) == ["a.txt", "skip/e.txt", "sub/skip_me.txt"]


def test_comma_lists_and_several_inputs_merge_into_one_sorted_list_without_repeats(tree):
    found = expand_inputs([f"{tree / 'sub' / 'c.py'},{tree / 'a.txt'}", str(tree / "a.txt"), str(tree / "sub")])
    assert names(found, tree) == ["a.txt", "sub/c.py", "sub/deeper/d.rst", "sub/skip_me.txt"]
    assert expand_inputs(f"{tree / 'a.txt'},,") == [tree / "a.txt"]  # empty items are ignored


def test_an_input_that_matches_nothing_is_named(tree):
    missing = tree / "nowhere" / "x.txt"
    with pytest.raises(FileNotFoundError, match=f"input {missing} matches no file or folder"):
        expand_inputs([str(tree / "a.txt"), str(missing)])
    with pytest.raises(FileNotFoundError, match="matches no file or folder"):
        expand_inputs(str(tree / "*.nothing"))  # a glob that matches nothing is a missing name too


def test_a_folder_without_documents_is_an_error(tmp_path):
    (tmp_path / "image.png").write_text("")
    with pytest.raises(FileNotFoundError, match="no input files found"):
        expand_inputs(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no inputs given"):
        expand_inputs([])


def test_documents_of_each_kind_of_file(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("line one\nline two\n")
    assert list(read_documents(text)) == ["line one\nline two\n"]  # a whole text file is one document
    lines = tmp_path / "docs.jsonl"
    lines.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    assert list(read_documents(lines)) == ["first", "second"]  # blank lines are skipped
    packed = tmp_path / "docs.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(json.dumps({"text": "zipped ü"}) + "\n")
    assert list(read_documents(packed)) == ["zipped ü"]


def test_a_bad_json_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=rf"{path}:2: expected a JSON object with a 'text' field"):
        list(read_documents(path))


def test_parquet_documents_are_the_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["p one", "p two"], "id": [1, 2]}), path)
    assert list(read_documents(path)) == ["p one", "p two"]
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(CorpusError, match="no 'text' column"):
        list(read_documents(path))
