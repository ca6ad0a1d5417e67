"""The server's process tree: find the Python-backend stubs it forked, and make sure none outlive it.

``tritonserver`` forks one ``triton_python_backend_stub`` per model instance (:func:`python_stubs` lists
them, for a supervisor that must notice one dying). They normally exit with
the server; after a SIGKILL or a crash they can be orphaned, so :func:`kill_tree` kills whatever is
left of the tree (walked with psutil) and the server's process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import psutil


def descendants(pid: int) -> list[int]:
    """Direct and indirect children of ``pid`` (empty when ``pid`` is gone)."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def command_line(pid: int) -> list[str]:
    """The process's argv (empty when it is gone or unreadable)."""
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


STUB_BINARY = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    """One running Python-backend stub: the model (its repository folder name), the instance, its pid."""

    model: str
    instance: str
    pid: int
    started: float


def python_stubs(server_pid: int) -> list[Stub]:
    """The running stubs under ``server_pid``, newest first.

    The stub's argv is ``<stub> <repo>/<model>/<version>/model.py <shm prefix> ... <instance name> ...``;
    the model is read from the path (Triton requires the folder name to equal the model name), not from
    the instance name, whose ``<model>_<group>_<n>`` form is ambiguous for models named ``x`` and
    ``x_explain``. A stub killed by a signal stays a zombie until the server reaps it: zombies are left
    out, so a dead stub is one that is missing here.
    """
    found: list[Stub] = []
    for pid in descendants(server_pid):
        try:
            proc = psutil.Process(pid)
            if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                continue
            argv = proc.cmdline()
            if len(argv) < 9 or not argv[0].endswith(STUB_BINARY):
                continue
            found.append(Stub(Path(argv[1]).parts[-3], argv[8], pid, proc.create_time()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, IndexError):
            continue  # gone between the walk and the look: the next walk sees what replaced it
    return sorted(found, key=lambda s: -s.started)


def kill_tree(group_leader: int, also: Iterable[int] = ()) -> None:
    """SIGKILL the process group of ``group_leader`` and every pid in ``also`` (ignoring ones gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group_leader, signal.SIGKILL)
    for pid in also:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (e.g. a killed pytest).

    Linux delivers PR_SET_PDEATHSIG when the forking *thread* exits, so callers arm it only for
    servers started from the main thread (see :meth:`morphocam.serving.launcher.TritonServer.start`).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, Linux only
        pass
