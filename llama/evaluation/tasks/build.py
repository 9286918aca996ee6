"""Build the local lm-eval tasks' data from the running Python's standard library (no download):

    python -m llama.evaluation.tasks.build [--output llama/evaluation/tasks/data]

- ``stdlib_docstring_mc.jsonl`` (multiple choice): the first paragraph of a public function's docstring, and four
  names of functions of the same module, one of which has that docstring;
- ``stdlib_doctest.jsonl`` (generation): an example of a docstring's doctest transcript, with the examples before it
  as context; the target is the line the interpreter printed;
- ``stdlib_docs.jsonl`` (rolling log-likelihood): module docstrings as documents.

The output depends only on the Python version (docstrings change between versions): examples are taken in a
fixed order and the choices shuffled by a generator seeded with the function's name. The shipped files were built
with Python 3.11; every line records the version.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import json
import platform
import random
import re
from pathlib import Path

from llama import cli

TASKS = Path(__file__).parent
DOCSTRING_MODULES = [
    "base64", "binascii", "bisect", "calendar", "colorsys", "copy", "difflib", "fnmatch", "functools", "glob",
    "gzip", "heapq", "html", "itertools", "json", "keyword", "math", "operator", "os", "os.path", "pickle",
    "platform", "pprint", "random", "re", "shlex", "shutil", "statistics", "string", "struct", "tempfile",
    "textwrap", "time", "unicodedata", "urllib.parse", "uuid", "zlib",
]
DOCTEST_MODULES = ["collections", "difflib", "enum", "fractions", "json", "statistics", "typing", "_pydecimal"]
DOCUMENT_MODULES = [
    "abc", "argparse", "asyncio", "bisect", "calendar", "codecs", "collections", "contextlib", "csv", "dataclasses",
    "difflib", "doctest", "enum", "fractions", "ftplib", "functools", "heapq", "inspect", "ipaddress", "logging",
    "mailbox", "optparse", "pathlib", "pickle", "pprint", "pydoc", "random", "shlex", "shutil", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "uuid", "zipfile",
]
PER_MODULE = 20  # questions per module at most: os alone has over a hundred functions
DOCTEST_LIMIT = 40  # examples per module at most: the Decimal docstrings alone hold hundreds of alike ones
UNSTABLE = re.compile(r"0x[0-9a-f]+|object at|random|time|id\(|Traceback|\.\.\.")


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def docstring_examples() -> list[dict]:
    """One multiple-choice question per public function whose docstring's first paragraph does not give its name."""
    examples = []
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        functions = {}
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = first_paragraph(inspect.getdoc(obj) or "")
            if 40 <= len(doc) <= 400 and name not in doc and doc not in functions.values():
                functions[name] = doc
        names = sorted(functions)
        asked = names[:: max(1, -(-len(names) // PER_MODULE))]  # spread over the alphabet, at most PER_MODULE
        for name in asked if len(names) >= 4 else []:
            rng = random.Random(f"{module_name}.{name}")
            choices = [name] + rng.sample([other for other in names if other != name], 3)
            rng.shuffle(choices)
            examples.append({
                "module": module_name, "docstring": functions[name],
                "choices": [f"{module_name}.{choice}" for choice in choices], "answer": choices.index(name),
            })
    return examples


def doctest_examples() -> list[dict]:
    """Single-line doctest outputs that do not depend on the run (addresses, randomness, time)."""
    examples = []
    finder = doctest.DocTestFinder(exclude_empty=True)
    for module_name in DOCTEST_MODULES:
        taken = 0
        for test in sorted(finder.find(importlib.import_module(module_name)), key=lambda t: t.name):
            transcript = ""
            for example in test.examples:
                source, want = example.source.rstrip("\n"), example.want.rstrip("\n")
                step = ">>> " + source.replace("\n", "\n... ") + "\n"
                if (taken < DOCTEST_LIMIT and want and "\n" not in source and "\n" not in want and len(want) <= 80
                        and not UNSTABLE.search(source + want)):
                    examples.append({"module": module_name, "name": test.name, "context": transcript + step,
                                     "target": want})
                    taken += 1
                transcript += step + (want + "\n" if want else "")
    return examples


def documents() -> list[dict]:
    docs = []
    for module_name in DOCUMENT_MODULES:
        doc = inspect.getdoc(importlib.import_module(module_name)) or ""
        if len(doc) >= 300:
            docs.append({"module": module_name, "text": doc})
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    version = platform.python_version()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({**row, "python": version}, ensure_ascii=False) + "\n" for row in rows))
    print(f"{path}: {len(rows)} examples")


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("python -m llama.evaluation.tasks.build", __doc__)
    parser.add_argument("--output", default=str(TASKS / "data"), help="folder for the .jsonl files")
    args = parser.parse_args(argv)
    out = Path(args.output)
    write_jsonl(out / "stdlib_docstring_mc.jsonl", docstring_examples())
    write_jsonl(out / "stdlib_doctest.jsonl", doctest_examples())
    write_jsonl(out / "stdlib_docs.jsonl", documents())


if __name__ == "__main__":
    main()
