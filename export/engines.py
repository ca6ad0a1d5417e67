"""The exporter's engine measurements: speed and accuracy of each CPU variant of the exported graph.

Sessions come from :mod:`morphocam.engines`, the one factory the served classifier and the serving
benchmark also use, with its default (served) settings: ONNX Runtime with graph optimisation ALL
(the FP32 reference) or OpenVINO at f32 / bf16 (forced explicitly both ways: bf16 is OpenVINO's
default on CPUs with AVX512-BF16/AMX), no spinning, sequential execution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morphocam.contract import OUTPUT_LOGITS, OUTPUT_PROBABILITIES
from morphocam.engines import EngineSettings, Runner, make_runner as _factory
from morphocam.stats import macro_f1


def make_runner(engine: str, model_file: Path, precision: str, threads: int = 0) -> Runner:
    """A runner whose call returns ``(logits, probabilities)``, built with the served settings."""
    return _factory(model_file, EngineSettings(engine=engine, precision=precision, threads=threads),
                    outputs=(OUTPUT_LOGITS, OUTPUT_PROBABILITIES))


def reference_runner(model_file: Path, threads: int = 0) -> Runner:
    """ONNX Runtime FP32: the reference every other variant is compared with."""
    return make_runner("onnxruntime", model_file, "fp32", threads)


def all_outputs_runner(model_file: Path, threads: int = 0) -> Runner:
    """ONNX Runtime FP32 returning every output of the graph in graph order (``runner.output_names``):
    LOGITS, PROBABILITIES and, for a graph exported with them, the trust outputs — as the served
    classifier asks for every output its config declares."""
    return _factory(model_file, EngineSettings(threads=threads))


def run_named(runner: Runner, images: np.ndarray) -> dict[str, np.ndarray]:
    """One call of ``runner`` as {output name: array}."""
    return dict(zip(runner.output_names, runner(np.ascontiguousarray(images))))


def openvino_bf16_supported() -> bool:
    try:
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return "BF16" in [str(c).upper() for c in caps]
    except Exception:  # noqa: BLE001 - no OpenVINO or no CPU plugin: simply not a candidate
        return False


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
