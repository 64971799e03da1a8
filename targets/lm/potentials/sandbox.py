"""Run untrusted Python (a model's program) in a sandboxed subprocess (docs/algorithms.md
section 6): for execution-checked rewards such as HumanEval's tests.

Each run gets a fresh interpreter (``python -I -B``: no user site, no environment variables, no
bytecode written) in a new, empty temporary folder, in a session and process group of its own,
which sets these limits on itself before it reads the program:

- a wall-clock ``timeout`` (the whole group is killed: a program that loops forever is stopped),
  and the same limit on CPU seconds (RLIMIT_CPU);
- an address-space limit ``memory_mb`` (RLIMIT_AS: allocating 10 GB raises MemoryError), a
  file-size limit and no core dumps;
- an audit hook (PEP 578, installed before the program runs and impossible to remove from Python)
  that refuses sockets, new processes (fork, exec, spawn, subprocess, os.system), signals to
  other processes, ctypes, and any write, rename, removal or permission change outside the folder.

The folder is deleted afterwards. This keeps honest mistakes and casual escapes of generated code
away from the machine; it is not a boundary against a determined attacker (a C extension already
on the path could bypass the hook): run untrusted code at scale in a container as well.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import NamedTuple

# Runs in the child before the program: everything here must be self-contained.
GUARD = r'''
import os, resource, sys
MEMORY, CPU = int(sys.argv[1]), int(sys.argv[2])
for limit, value in ((resource.RLIMIT_AS, MEMORY), (resource.RLIMIT_CPU, CPU),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty",
           "os.posix_spawn", "os.spawn", "os.kill", "os.killpg", "ctypes.", "pty.",
           "os.startfile", "signal.pthread_kill", "os.putenv", "os.unsetenv", "webbrowser.")
PATH_EVENTS = {"os.remove": 1, "os.rename": 2, "os.replace": 2, "os.rmdir": 1, "os.mkdir": 1,
               "os.chmod": 1, "os.chown": 1, "os.link": 2, "os.symlink": 2, "os.truncate": 1,
               "os.utime": 1, "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2,
               "shutil.copytree": 2, "os.chdir": 1, "os.chroot": 1}

def inside(path):
    if isinstance(path, int):
        return True
    try:
        path = os.fsdecode(path)
    except TypeError:
        return False
    full = os.path.realpath(os.path.join(ROOT, path))
    return full == ROOT or full.startswith(ROOT + os.sep)

def hook(event, args):
    if event.startswith(REFUSED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
        if writes and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the folder")
    elif event in PATH_EVENTS:
        if not all(inside(p) for p in args[:PATH_EVENTS[event]]):
            raise PermissionError(f"sandbox: {event}{args[:PATH_EVENTS[event]]!r} outside the folder")

sys.addaudithook(hook)
del hook
source = open("program.py", encoding="utf-8").read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
'''


class Outcome(NamedTuple):
    passed: bool   # the program ran to the end without an exception (exit status 0)
    status: str    # "passed", "failed" (an exception or a refused action) or "timed out"
    detail: str    # the end of its standard error (at most 2,000 characters)


def run_python(source: str, *, timeout: float = 5.0, memory_mb: int = 1024) -> Outcome:
    """Run ``source`` as a program in the sandbox (module docstring); never raises for what the
    program does."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if not memory_mb >= 64:
        raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
    limit_bytes = int(memory_mb) << 20
    cpu_seconds = max(1, int(timeout) + 1)
    with tempfile.TemporaryDirectory(prefix="sandbox-") as folder:
        with open(os.path.join(folder, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", GUARD, str(limit_bytes), str(cpu_seconds)],
            cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            return Outcome(False, "timed out", f"stopped after {timeout} s")
        finally:
            _kill_group(process)   # anything the program left behind in its group
    detail = err.decode("utf-8", "replace")[-2000:]
    if process.returncode == 0:
        return Outcome(True, "passed", detail)
    if process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome(False, "timed out", detail or "CPU time limit")
    return Outcome(False, "failed", detail)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
