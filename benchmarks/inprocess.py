"""The in-process ceiling: the exported graph run by the engine factory with no server in between.

Every engine is built by :mod:`morphocam.engines` (the factory the served classifier uses) from one
:class:`~morphocam.engines.EngineSettings`; only engine and precision vary: ONNX Runtime FP32,
OpenVINO FP32 and, on CPUs with native BF16, OpenVINO bf16.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from morphocam.contract import InputContract
from morphocam.engines import EngineSettings, make_runner
from morphocam.export.engines import openvino_bf16_supported
from morphocam.preprocess import is_image_path, load_frame

# result key -> (engine, precision); ``ceiling`` matches a served precision by the key's suffix
ENGINES = {"onnxruntime_fp32": ("onnxruntime", "fp32"), "openvino_fp32": ("openvino", "fp32"),
           "openvino_bf16": ("openvino", "bf16")}


def load_images(folder: Path, contract: InputContract, count: int = 64) -> np.ndarray:
    """``count`` real frames from ``folder`` at the model's input size (repeated when fewer)."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_path(p))
    if not paths:
        raise FileNotFoundError(f"no images under {folder}")
    frames = [load_frame(p, contract.height, contract.width) for p in paths[:count]]
    while len(frames) < count:
        frames += frames[: count - len(frames)]
    return np.stack(frames)


def _time_loop(fn, seconds: float, per_call: int) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += per_call
    return n / (time.perf_counter() - t0)


def inprocess(onnx_path: Path, frames: np.ndarray, batches, seconds: float,
              settings: EngineSettings = EngineSettings()) -> dict:
    """Images per second of each engine on ``onnx_path`` at each batch size: ``{key: {batch: img/s}}``."""
    bf16 = openvino_bf16_supported()
    out: dict = {}
    for key, (engine, precision) in ENGINES.items():
        if precision == "bf16" and not bf16:
            print("[inprocess] openvino_bf16 skipped: this CPU has no native BF16 (it would silently run f32)")
            continue
        try:
            run = make_runner(onnx_path, dataclasses.replace(settings, engine=engine, precision=precision))
        except RuntimeError as exc:  # the engine cannot compile this graph on this CPU
            print(f"[inprocess] {key} unavailable: {exc}")
            continue
        for b in batches:
            batch = frames[:b]
            out.setdefault(key, {})[str(b)] = _time_loop(lambda: run(batch), seconds, b)
            print(f"[inprocess] {key:18s} batch {b:3d}: {out[key][str(b)]:7.1f} img/s", flush=True)
    return out


def ceiling(inprocess_rows: dict, precision: str | None) -> tuple[float, str]:
    """(img/s, "file:engine@batch") of the fastest in-process engine at the served ``precision``.

    The served model is compared with engines computing the same numbers: a bf16 engine is faster
    but is not the released FP32 model (the exporter keeps it out when it costs accuracy).
    ``precision=None``: the fastest engine of any precision.
    """
    rows = [(v, f"{f}:{e}@{b}") for f, engines in inprocess_rows.items() for e, per_b in engines.items()
            for b, v in per_b.items() if precision is None or e.endswith(f"_{precision}")]
    if not rows:
        raise ValueError(f"no in-process measurement at precision {precision!r}: {list(inprocess_rows)}")
    return max(rows)
