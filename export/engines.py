"""In-process CPU engines for the exported graph, and how they are measured.

:class:`OrtRunner` is ONNX Runtime with graph optimisation level ALL (the FP32 reference);
:class:`OpenVinoRunner` compiles the same ONNX file with OpenVINO at f32 or bf16 (bf16 is
OpenVINO's default on CPUs with AVX512-BF16/AMX; it is forced explicitly both ways here).
The serving ``model.py`` creates the same sessions from the config's ``engine``/``precision``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morphocam.contract import INPUT_NAME, OUTPUT_LOGITS, OUTPUT_PROBABILITIES
from morphocam.stats import macro_f1


def cpu_threads(requested: int = 0) -> int:
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


class OrtRunner:
    engine = "onnxruntime"

    def __init__(self, model_file: Path, threads: int = 0, precision: str = "fp32"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = cpu_threads(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.precision = precision
        self.session = ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = self.session.run([OUTPUT_LOGITS, OUTPUT_PROBABILITIES], {INPUT_NAME: images})
        return logits, probs


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo) recorded beside every speed measurement."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def openvino_bf16_supported() -> bool:
    try:
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return "BF16" in [str(c).upper() for c in caps]
    except Exception:  # noqa: BLE001 - no OpenVINO or no CPU plugin: simply not a candidate
        return False


class OpenVinoRunner:
    engine = "openvino"

    def __init__(self, model_file: Path, threads: int = 0, precision: str = "fp32"):
        import openvino as ov

        hint = {"bf16": "bf16", "fp32": "f32", "int8": "f32"}[precision]
        self.precision = precision
        self.compiled = ov.Core().compile_model(str(model_file), "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": cpu_threads(threads)})
        self.request = self.compiled.create_infer_request()
        names = [o.get_any_name() for o in self.compiled.outputs]
        self._li, self._pi = names.index(OUTPUT_LOGITS), names.index(OUTPUT_PROBABILITIES)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self.request.infer({0: images})
        return np.array(res[self._li]), np.array(res[self._pi])


def make_runner(engine: str, model_file: Path, precision: str, threads: int = 0):
    if engine == "onnxruntime":
        return OrtRunner(model_file, threads, precision)
    if engine == "openvino":
        return OpenVinoRunner(model_file, threads, precision)
    raise ValueError(f"unknown engine {engine!r}")


def predict(runner, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    logits, probs = [], []
    for i in range(0, len(images), batch):
        lo, pr = runner(np.ascontiguousarray(images[i:i + batch]))
        logits.append(lo)
        probs.append(pr)
    return np.concatenate(logits), np.concatenate(probs)


def throughput(runner, frame_pool: np.ndarray, batch: int = 8, seconds: float = 3.0) -> float:
    """Images per second at a fixed batch: one warm-up call, then as many calls as fit in ``seconds``."""
    reps = int(np.ceil(batch / len(frame_pool)))
    x = np.ascontiguousarray(np.concatenate([frame_pool] * reps)[:batch])
    runner(x)
    n, t0 = 0, time.perf_counter()
    while True:
        runner(x)
        n += batch
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 2 * batch:
            return n / dt


@dataclass
class Measurement:
    engine: str
    precision: str
    model_file: str
    images_per_second: float
    accuracy: float
    macro_f1: float
    agreement_with_fp32: float
    max_abs_prob_diff_vs_fp32: float
    n: int

    def to_dict(self) -> dict:
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def measure(runner, model_file: str, images: np.ndarray, labels: np.ndarray, ref_probs: np.ndarray | None,
            k: int, batch: int = 8, seconds: float = 3.0) -> tuple[Measurement, np.ndarray]:
    """Speed at ``batch`` and test-split accuracy / macro-F1 / argmax agreement with the FP32 reference."""
    _, probs = predict(runner, images)
    pred = probs.argmax(1)
    ref = probs if ref_probs is None else ref_probs
    speed = throughput(runner, images[: max(batch, 1)], batch, seconds)
    m = Measurement(runner.engine, runner.precision, model_file, speed, float(np.mean(pred == labels)),
                    macro_f1(labels, pred, k), float(np.mean(pred == ref.argmax(1))),
                    float(np.max(np.abs(probs - ref))), int(len(labels)))
    return m, probs
