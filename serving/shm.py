"""The Python backend's shared-memory segments under ``/dev/shm``: list them, and remove leftovers.

Each server gets its own segment-name prefix ``morphocam_<launcher pid>_<random>_`` (passed as the
backend's ``shm-region-prefix-name``), so a stopped server's segments can be removed without touching
any other server's, and segments of a launcher that died (SIGKILL, crash) can be recognised later.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import psutil

SHM_DIR = Path("/dev/shm")
PREFIX = "morphocam_"


def new_prefix() -> str:
    """A fresh segment prefix that names this process."""
    return f"{PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}_"


def segments(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*"))


def remove(paths) -> list[Path]:
    """Unlink each path; returns the ones removed."""
    removed = []
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _mapped(paths: set[str]) -> set[str]:
    """Which of ``paths`` some live process still maps."""
    found: set[str] = set()
    for proc in psutil.process_iter():
        try:
            found.update(m.path for m in proc.memory_maps(grouped=True) if m.path in paths)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def cleanup_stale() -> list[Path]:
    """Remove ``morphocam_<pid>_*`` segments whose creating process is gone and nobody maps any more."""
    stale = []
    for path in SHM_DIR.glob(f"{PREFIX}*_*"):
        try:
            pid = int(path.name[len(PREFIX):].split("_")[0])
        except ValueError:
            continue
        if not psutil.pid_exists(pid):
            stale.append(path)
    if not stale:
        return []
    mapped = _mapped({str(p) for p in stale})
    return remove(p for p in stale if str(p) not in mapped)
