"""Per-process facts from Linux ``/proc`` for the benchmarks: the server's process tree, RSS and CPU time.

No psutil dependency: the server and its Python-backend stubs are plain children of the launcher's
``tritonserver`` process, and ``/proc/<pid>/stat`` and ``/status`` hold all we need.
"""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_mib(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_table(server) -> dict[str, int]:
    """{"tritonserver": pid, "stub:<model>:<pid>": pid, ...} for the server and its backend stubs."""
    from morphocam.serving.processes import descendants

    table = {"tritonserver": server.pid}
    for child in descendants(server.pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"triton_python_backend_stub"):
            model = Path(cmd[1].decode()).parent.parent.name if len(cmd) > 1 else str(child)
            table[f"stub:{model}:{child}"] = child
    return table


def tree_cpu_seconds(pids) -> float:
    return sum(cpu_seconds(p) for p in pids)
