"""The sandbox that runs HumanEval programs: every canonical solution passes, wrong or empty completions fail,
loops time out, and programs that write files, open sockets or exit early neither pass nor touch the host, even
when they go around the Python-level guard (then the namespaces stop them)."""

import socket
import time

import pytest

from llama.evaluation.humaneval import load_problems, program
from llama.evaluation.sandbox import run_program, run_programs

PROBLEMS = load_problems()


@pytest.fixture(scope="module")
def isolated() -> bool:
    """Whether this machine gives the child its own network and a read-only filesystem (namespaces)."""
    return run_program("pass\n").isolation == "network isolated, filesystem read-only"


def test_every_canonical_solution_passes():
    start = time.perf_counter()
    outcomes = run_programs([program(p, p["canonical_solution"]) for p in PROBLEMS], timeout=20)
    failed = [(p["task_id"], o.status, o.detail) for p, o in zip(PROBLEMS, outcomes) if not o.passed]
    assert len(PROBLEMS) == 164 and not failed
    print(f"164 canonical solutions in {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("completion", ["", "    return None\n", "    pass\n", "    return 1 +\n"])
def test_empty_wrong_and_broken_completions_fail(completion):
    problem = PROBLEMS[0]
    outcome = run_program(program(problem, completion))
    assert outcome.status == "failed", outcome


def test_the_failing_assertion_is_reported():
    outcome = run_program("assert 1 + 1 == 3, 'arithmetic'\n")
    assert outcome.status == "failed" and outcome.detail == "AssertionError: arithmetic"


def test_an_infinite_loop_times_out():
    outcome = run_program(program(PROBLEMS[0], "    while True:\n        pass\n"), timeout=2)
    assert outcome.status == "timed out" and outcome.seconds < 10


def test_exiting_early_is_not_passing():
    for source in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n", "exit()\n"):
        assert run_program(source).status == "failed", source


def test_memory_is_limited():
    outcome = run_program("blob = bytearray(3 << 30)\n", memory_bytes=1 << 30)
    assert outcome.status == "failed" and "MemoryError" in outcome.detail


def test_writing_files_does_not_touch_the_host(tmp_path, isolated):
    target = tmp_path / "written"
    guarded = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.system('touch {target}')",
        f"import subprocess\nsubprocess.run(['touch', {str(target)!r}])",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
    ]
    for source in guarded:
        outcome = run_program(source + "\n")
        assert outcome.status == "failed" and "PermissionError" in outcome.detail, (source, outcome)
    assert not target.exists() and tmp_path.is_dir()
    if not isolated:
        pytest.skip("no namespaces here: only the guard stands between a program and the filesystem")
    around_the_guard = [  # the C functions the guard does not wrap: the read-only mount namespace refuses them
        f"import io\nio.FileIO({str(target)!r}, 'w').write(b'x')",
        f"import posix\nposix.open({str(target)!r}, posix.O_CREAT | posix.O_WRONLY)",
        f"import posix\nposix.rmdir({str(tmp_path)!r})",
    ]
    for source in around_the_guard:
        outcome = run_program(source + "\n")
        assert outcome.status == "failed" and "Read-only file system" in outcome.detail, (source, outcome)
    assert not target.exists() and tmp_path.is_dir()


def test_sockets_reach_nothing_on_the_host(isolated):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(0.5)
        guarded = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n")
        assert guarded.status == "failed" and "PermissionError" in guarded.detail
        if not isolated:
            pytest.skip("no namespaces here: only the guard keeps programs off the network")
        # the C socket the guard does not wrap: in its own network namespace the host's loopback is not there
        around_the_guard = run_program(f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))\n")
        assert around_the_guard.status == "failed" and "unreachable" in around_the_guard.detail, around_the_guard
        with pytest.raises(TimeoutError):
            server.accept()  # nothing arrived
