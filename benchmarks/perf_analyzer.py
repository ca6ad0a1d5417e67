"""Triton's own load generator, ``perf_analyzer``, on the same server and model as our client.

Current tritonclient wheels ship no ``perf_analyzer``; the 2.50.0 wheel does and runs here (see the
README for the three commands that unpack it). Point ``--perf-analyzer`` or ``$MORPHOCAM_PERF_ANALYZER``
at the binary; its ``LD_LIBRARY_PATH`` needs ``libb64.so.0d`` and ``libcudart.so.12`` (symlinks to
the copies in ``nvidia_pytriton.libs`` work; :func:`library_dir` makes them).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def find(explicit: Path | None = None) -> Path | None:
    for candidate in (explicit, os.environ.get("MORPHOCAM_PERF_ANALYZER"), shutil.which("perf_analyzer")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def library_dir() -> Path:
    """A folder of the two sonames perf_analyzer 2.50 wants, linked to nvidia-pytriton's copies."""
    from morphocam.serving.launcher import TritonInstall

    libs = TritonInstall.find().libs
    out = Path(tempfile.gettempdir()) / "morphocam-perf-analyzer-libs"
    out.mkdir(exist_ok=True)
    for soname, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        matches = sorted(libs.glob(pattern))
        link = out / soname
        if matches and not link.exists():
            link.symlink_to(matches[0])
    return out


def run(binary: Path, url: str, model: str, concurrency: int, shape: tuple[int, ...],
        batch: int = 1, seconds: float = 5.0, stability: int = 50) -> dict:
    """One ``perf_analyzer`` measurement at a fixed concurrency; returns img/s and latency percentiles (ms).

    ``stability``: perf_analyzer's --stability-percentage (how far three consecutive windows may differ
    in throughput and p99). Its default of 10 fails on a 2-core box where client and server share the
    cores ("Failed to obtain stable measurement within 10 measurement windows"); 50 passes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pa.csv"
        cmd = [str(binary), "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
               "--concurrency-range", f"{concurrency}:{concurrency}", "--shape",
               "IMAGES:" + ",".join(map(str, shape)), "--measurement-interval", str(int(seconds * 1000)),
               "--percentile", "99", "--stability-percentage", str(stability), "--max-trials", "10",
               "-f", str(report)]
        env = dict(os.environ, LD_LIBRARY_PATH=f"{library_dir()}:{os.environ.get('LD_LIBRARY_PATH', '')}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds * 20 + 60)
        if proc.returncode != 0 or not report.is_file():
            raise RuntimeError(f"perf_analyzer failed ({proc.returncode}): {proc.stdout[-800:]}{proc.stderr[-800:]}")
        row = next(csv.DictReader(report.open()))
    us = lambda key: float(row[key]) / 1e3  # noqa: E731 - microseconds -> ms
    return {"tool": "perf_analyzer 2.50", "concurrency": concurrency, "frames_per_request": batch,
            "stability_percentage": stability,
            "images_per_s": float(row["Inferences/Second"]), "p50_ms": us("p50 latency"),
            "p95_ms": us("p95 latency"), "p99_ms": us("p99 latency"), "command": " ".join(cmd[:-2])}
