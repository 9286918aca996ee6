"""The shape of the code base, read from its imports: no module imports another that (directly or not) imports it
back; the core (``llama.model``, ``llama.loss``) imports none of the wings built on it; the ``tokenizer`` package
stands alone, without ``llama``; and every module imports cleanly on its own.

Imports are read with ``ast``, at module level and inside functions alike: a function-level import is still a
dependency, only a later one. ``from package import name`` counts as an import of ``package.name`` when that is a
module, else of ``package``; a package's ``__init__`` run on the way to a submodule is not counted (it is the
package's own business, and would make every submodule that its ``__init__`` re-exports a cycle)."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llama", "tokenizer")
WINGS = (
    "llama.checkpoint", "llama.generation", "llama.training", "llama.transforms", "llama.serving", "llama.evaluation",
)
CORE = ("llama.model", "llama.loss")  # may import llama.kernels: the kernels the core itself calls


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def imports_of(path: Path) -> set[str]:
    """The modules of ours that ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the code base uses absolute ones)"
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if ours(name)}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for name in GRAPH.get(todo.pop(), ()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_the_graph_sees_every_module_and_knows_them_all():
    assert {"llama.model", "llama.loss", "llama.generation.engine", "tokenizer.corpus"} <= set(MODULES)
    unknown = {(name, dep) for name, deps in GRAPH.items() for dep in deps if dep not in MODULES}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"
    assert "llama.model" in GRAPH["llama.generation.engine"]  # the parse finds real edges


def test_there_are_no_import_cycles():
    cycles = sorted(name for name in GRAPH if name in reachable(name))
    assert not cycles, f"modules that import themselves through others: {cycles}"


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_no_wing(core):
    upward = sorted(name for name in reachable(core) if name.startswith(WINGS))
    assert not upward, f"{core} depends on {upward}"
    assert reachable(core) <= {"llama.kernels", "llama.kernels.cpu", *CORE}


def test_the_tokenizer_package_does_not_import_llama():
    offenders = {name: sorted(d for d in deps if d.split(".")[0] == "llama")
                 for name, deps in GRAPH.items() if name.startswith("tokenizer")}
    assert not any(offenders.values()), offenders


def third_party_imported_at_module_level() -> list[str]:
    """What our modules import from elsewhere when they are imported (not inside functions)."""
    found = set()
    for path in MODULES.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found.add(node.module)
    return sorted(name for name in found if not ours(name) and name.split(".")[0] not in sys.stdlib_module_names)


# Each module in a child forked from a parent that has imported the third-party libraries only (nothing of ours): the
# child imports one module of ours starting from nothing of ours, as a fresh interpreter would, in a fraction of the
# time a fresh interpreter per module takes. torch._dynamo is imported by torch.compiler's decorators (~3 s).
IMPORT_EACH = textwrap.dedent("""
    import importlib, os, sys, traceback
    ours, preload = sys.argv[1].split(), sys.argv[2].split()
    for name in preload + ["torch._dynamo"]:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional extra: the module that needs it says so
    assert not any(m.split(".")[0] in ("llama", "tokenizer") for m in sys.modules)
    failed = []
    for name in ours:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(name)
    print("FAILED:", " ".join(failed))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_on_its_own():
    preload = " ".join(third_party_imported_at_module_level())
    command = [sys.executable, "-c", IMPORT_EACH, " ".join(sorted(MODULES)), preload]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "FAILED:", result.stderr
