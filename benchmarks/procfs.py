"""Per-process facts for the benchmarks, through psutil: the server's process tree, RSS and CPU time.

The server's Python-backend stubs are children of the launcher's ``tritonserver`` process; a
process that has gone away reads as "no RSS" / "no more CPU" rather than as an error, because the
benchmarks sample processes that may exit (or be restarted) under them.
"""

from __future__ import annotations

from pathlib import Path

import psutil

STUB_BINARY = "triton_python_backend_stub"


def rss_mib(pid: int) -> float | None:
    """Resident set size in MiB, None once the process is gone."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def process_table(server) -> dict[str, int]:
    """{"tritonserver": pid, "stub:<model>:<pid>": pid, ...} for the server and its backend stubs.

    ``server``: anything with a ``pid`` (the launcher's server or its ``Popen``).
    """
    table = {"tritonserver": server.pid}
    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.Error:
        return table
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].endswith(STUB_BINARY):
            # the stub's first argument is <repository>/<model>/<version>/model.py
            model = Path(cmd[1]).parent.parent.name if len(cmd) > 1 else str(child.pid)
            table[f"stub:{model}:{child.pid}"] = child.pid
    return table


def tree_cpu_seconds(pids) -> float:
    return sum(cpu_seconds(p) for p in pids)
