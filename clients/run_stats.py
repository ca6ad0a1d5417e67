"""Counters and latencies of one streaming run, and their summary line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunStats:
    frames: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    retries: int = 0
    batches: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def summary(self) -> dict:
        wall = (self.ended or time.monotonic()) - self.started
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = (lambda q: float(np.percentile(lat, q)) if lat.size else None)
        return {"frames": self.frames, "classified": self.ok, "errors": self.errors, "skipped": self.skipped,
                "batches": self.batches, "retries": self.retries, "wall_s": round(wall, 3),
                "frames_per_s": round(self.frames / wall, 2) if wall > 0 else None,
                "latency_ms_mean": float(lat.mean()) if lat.size else None,
                "latency_ms_p50": pct(50), "latency_ms_p99": pct(99)}
