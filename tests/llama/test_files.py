"""Folders written atomically (``llama.files``): a reader finds the previous content or the new one, whole and on disk,
never a part; whatever an interrupted writer left behind, the next write of the same target clears up, without
touching what a live writer is filling."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import llama.files
from llama.files import atomic_folder, remove_leftovers, temporary_name


def contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    """Every name beside ``folder``, hidden ones included."""
    return sorted(p.name for p in folder.parent.iterdir())


def old_content(target: Path) -> None:
    target.mkdir(parents=True)
    (target / "model.bin").write_text("old")


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_block_fills_a_hidden_folder_that_becomes_the_target_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = llama.files._fsync
    monkeypatch.setattr(llama.files, "_fsync", lambda path: (synced.append(Path(path)), real_fsync(path)))
    target = tmp_path / "out" / "model"  # parents are created
    with atomic_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".model.tmp-")
        (tmp / "config.json").write_text("{}")
        (tmp / "shards").mkdir()
        (tmp / "shards" / "0.bin").write_text("weights")
        assert not target.exists()  # nothing is visible before the block ends
    assert contents(target) == {"config.json": "{}", "shards/0.bin": "weights"}
    assert siblings(target) == ["model"]
    # every file and folder was synced before the rename, and the parent after it (so that the rename lasts)
    *before_rename, after_rename = synced
    assert {p.relative_to(tmp) for p in before_rename} == {
        Path("."), Path("config.json"), Path("shards"), Path("shards/0.bin"),
    }
    assert after_rename == target.parent


def test_files_get_the_usual_modes_whatever_their_writer_gave_them(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "out") as tmp:
            private = tmp / "private.bin"
            private.write_text("x")
            private.chmod(0o600)  # as tempfile and safetensors create them
    finally:
        os.umask(umask)
    assert (tmp_path / "out" / "private.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_non_empty_target_is_refused_unless_replace(tmp_path):
    target = tmp_path / "model"
    old_content(target)
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with atomic_folder(target):
            pytest.fail("the block must not run")
    assert contents(target) == {"model.bin": "old"} and siblings(target) == ["model"]
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "new.bin").write_text("new")
    assert contents(target) == {"new.bin": "new"}  # replaced whole: the old files are gone
    assert siblings(target) == ["model"]  # and so is the old folder, set aside during the swap


def test_an_empty_target_folder_is_filled_without_replace(tmp_path):
    (tmp_path / "model").mkdir()
    with atomic_folder(tmp_path / "model") as tmp:
        (tmp / "a").write_text("a")
    assert contents(tmp_path / "model") == {"a": "a"}


@pytest.mark.parametrize("existing", [True, False])
def test_an_exception_in_the_block_leaves_the_target_as_it_was_and_no_temporary_folder(tmp_path, existing):
    target = tmp_path / "model"
    if existing:
        old_content(target)
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_folder(target, replace=True) as tmp:
            (tmp / "half.bin").write_text("half")
            raise RuntimeError("interrupted")
    assert siblings(target) == (["model"] if existing else [])
    if existing:
        assert contents(target) == {"model.bin": "old"}


# llama/files.py loaded on its own: importing the llama package would take seconds (torch)
WRITER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("files", sys.argv[2])
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    with files.atomic_folder(sys.argv[1], replace=True) as tmp:
        (tmp / "model.bin").write_text("new")
        print("written", flush=True)
        time.sleep(600)
""")


def test_a_writer_killed_before_its_rename_leaves_the_previous_content_and_the_next_write_clears_up(tmp_path):
    target = tmp_path / "model"
    old_content(target)
    command = [sys.executable, "-c", WRITER, str(target), llama.files.__file__]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "written\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert contents(target) == {"model.bin": "old"}  # what a reader sees
    leftover = target.parent / f".model.tmp-{socket.gethostname()}-{writer.pid}"
    assert siblings(target) == sorted(["model", leftover.name])
    assert contents(leftover) == {"model.bin": "new"}
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "model.bin").write_text("newer")
    assert contents(target) == {"model.bin": "newer"} and siblings(target) == ["model"]


def test_a_previous_content_set_aside_by_a_killed_replacement_is_put_back(tmp_path):
    # killed between its two renames: the target is gone, the old content sits under .NAME.old-HOST-PID
    target = tmp_path / "model"
    aside = tmp_path / f".model.old-{socket.gethostname()}-{dead_pid()}"
    old_content(aside)
    remove_leftovers(target)
    assert contents(target) == {"model.bin": "old"} and siblings(target) == ["model"]


def test_a_set_aside_content_is_dropped_when_the_target_was_written_after_all(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.bin").write_text("new")
    old_content(tmp_path / f".model.old-{socket.gethostname()}-{dead_pid()}")
    remove_leftovers(target)
    assert contents(target) == {"model.bin": "new"} and siblings(target) == ["model"]


@pytest.fixture
def live_writer():
    """Another process, alive while the test runs."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.mark.parametrize("mark", [".tmp-", ".old-"])
def test_a_live_writers_folders_are_left_alone(tmp_path, live_writer, mark):
    target = tmp_path / "model"
    filling = tmp_path / f".model{mark}{socket.gethostname()}-{live_writer}"
    old_content(filling)
    remove_leftovers(target)
    assert contents(filling) == {"model.bin": "old"} and not target.exists()
    with atomic_folder(target) as tmp:  # a write of the same target leaves it alone too
        (tmp / "a").write_text("a")
    assert contents(filling) == {"model.bin": "old"}


def test_a_leftover_of_this_very_process_or_of_another_host_is_cleared(tmp_path):
    # This process writes one folder at a time, so a temporary folder of its own that it is not filling is a
    # leftover of an earlier, interrupted write; a writer on another host cannot be checked, and one run owns its
    # targets.
    target = tmp_path / "model"
    old_content(target)
    for leftover in (temporary_name(target), tmp_path / f".model.tmp-not-{socket.gethostname()}-1"):
        leftover.mkdir()
        remove_leftovers(target)
        assert siblings(target) == ["model"]


def test_leftovers_of_other_targets_are_not_touched(tmp_path):
    target = tmp_path / "model"
    other = tmp_path / f".model-2.tmp-{socket.gethostname()}-{dead_pid()}"  # a leftover of "model-2", not of "model"
    other.mkdir()
    remove_leftovers(target)
    assert siblings(target) == [other.name]
