"""Folders written atomically: every writer (checkpoint exports, shards, training checkpoints, the embedded model's
cache) fills a hidden temporary folder beside its target, fsyncs each file and the folder, and renames it into
place. A reader sees the previous content or the new, never a part of it: a write killed before its rename leaves
the previous content as it was, plus a temporary folder that the next write of the same target removes.

    with atomic_folder(out_dir) as tmp:
        (tmp / "config.json").write_text(...)
    # out_dir now holds config.json, on disk

A folder that one process at a time may write into (a training run's) is held with ``folder_lock``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
LOCK_FILE = ".lock"


class FolderInUseError(OSError):
    pass


def temporary_name(target: Path) -> Path:
    """The hidden folder a write of ``target`` fills first; it names the writer's host and process, so that a later
    write can tell a leftover of a dead writer from a folder another live process is filling."""
    return target.parent / f".{target.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}"


def _writer_is_gone(folder: Path, mark: str) -> bool:
    host, _, pid = folder.name.rpartition(mark)[2].rpartition("-")
    if host != socket.gethostname():
        return True  # another machine's writer of the same folder: one run owns a target at a time
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):  # not our naming, or alive under another user
        return False
    return int(pid) == os.getpid()


def remove_leftovers(target: Path) -> None:
    """Remove what interrupted writes of ``target`` (a name, or a glob pattern of names) left: their temporary
    folders, and the previous content set aside by a replacement killed between its two renames (put back when
    its name is free)."""
    if not target.parent.is_dir():
        return
    for mark in (TMP_MARK, OLD_MARK):
        for folder in target.parent.glob(f".{target.name}{mark}*"):
            if not _writer_is_gone(folder, mark):
                continue
            original = target.parent / folder.name[1:].rpartition(mark)[0]
            if mark == OLD_MARK and not original.exists():
                folder.rename(original)
            else:
                shutil.rmtree(folder, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (and ``folder`` itself), giving files the usual modes: some
    writers (safetensors, tempfile) create them private."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root, name)
            os.chmod(path, 0o666 & ~umask)
            _fsync(path)
        for name in dirs:
            _fsync(Path(root, name))
    os.chmod(folder, 0o777 & ~umask)
    _fsync(folder)


def commit(tmp: Path, target: Path) -> Path:
    """Sync ``tmp`` to disk and rename it to ``target``, replacing a previous ``target``; syncs the parent folder
    so that the rename itself survives a power cut."""
    _sync_tree(tmp)
    if target.exists():
        old = target.parent / f".{target.name}{OLD_MARK}{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    _fsync(target.parent)
    return target


def check_writable(target: Path, replace: bool) -> None:
    if target.exists() and not replace and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target}: already exists and is not empty; remove it or pick another folder")


@contextmanager
def atomic_folder(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yields the temporary folder to fill; on leaving the block it becomes ``target``. An existing non-empty
    ``target`` is refused unless ``replace``. On an exception the temporary folder is removed and ``target`` is
    left as it was."""
    target = Path(target)
    check_writable(target, replace)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = temporary_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Holds ``folder`` (created if need be) for the block: an advisory ``flock`` on ``folder/.lock``, which names
    the holder's host and process. While another process holds it, raises ``FolderInUseError`` naming that one.
    The kernel releases a lock when its process ends, however it ends, so a killed holder's lock is simply taken
    over. (On a network filesystem the lock is as good as the filesystem's own locking.)"""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise FolderInUseError(f"{folder} is in use by {holder} (it holds {path}); wait for it to end") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield folder
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
