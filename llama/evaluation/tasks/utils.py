"""The local tasks' data loader (``custom_dataset`` in their YAML): the JSONL files beside this module, found from
any working directory (``dataset_kwargs.data_files`` would be read relative to the current one)."""

from pathlib import Path

import datasets

DATA = Path(__file__).parent / "data"


def load_stdlib_docstring_mc(**metadata):
    return _load("stdlib_docstring_mc")


def load_stdlib_doctest(**metadata):
    return _load("stdlib_doctest")


def load_stdlib_docs(**metadata):
    return _load("stdlib_docs")


def _load(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(DATA / f"{name}.jsonl")})
