"""The one factory for in-process CPU inference sessions (ONNX Runtime, OpenVINO) on an exported graph.

Used by the served classifier (Triton ``model.py``), the exporter's engine measurements and the
serving benchmark's in-process ceiling, so all three build the same session from the same settings.

Standalone on purpose: it imports only the standard library, numpy and the engine itself, because
the exporter copies this file beside the classifier's ``model.py`` (as :data:`VERSION_FOLDER_NAME`)
and the Triton Python-backend stub imports it from the version folder, where the project is not
installed. Edit it here only; a test checks that every copy equals this file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# The name of the copy in a model's version folder (distinct, so it shadows nothing on sys.path).
VERSION_FOLDER_NAME = "morphocam_engines.py"

ENGINES = ("onnxruntime", "openvino")
EXECUTION_MODES = ("sequential", "parallel")
# OpenVINO's INFERENCE_PRECISION_HINT per precision; int8 graphs carry their own Q/DQ nodes, so the
# float parts run in f32 like the FP32 reference.
_OV_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


def affinity_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which a container or ``taskset`` narrows;
    ``os.cpu_count()`` would count the whole machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EngineSettings:
    """How a session is built. The defaults are the served model's settings.

    ``threads`` 0 means one intra-op thread per core in this process's affinity mask.
    ``spinning`` off: the server, the stub and often the client share the cores, and busy-waiting
    threads between ops starved them (served p95 at 4 in flight: 519 ms spinning, 32 ms not).
    ``execution_mode`` is ONNX Runtime's (``sequential`` runs one op at a time, each over all threads).
    OpenVINO has neither knob; it always gets the LATENCY performance hint.
    """

    engine: str = "onnxruntime"
    precision: str = "fp32"
    threads: int = 0
    spinning: bool = False
    execution_mode: str = "sequential"

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r} (use one of {', '.join(ENGINES)})")
        if self.execution_mode not in EXECUTION_MODES:
            raise ValueError(f"unknown execution mode {self.execution_mode!r} (use one of {', '.join(EXECUTION_MODES)})")
        if self.precision not in _OV_HINT:
            raise ValueError(f"unknown precision {self.precision!r} (use one of {', '.join(_OV_HINT)})")
        if self.engine == "onnxruntime" and self.precision in ("bf16", "fp16"):
            raise ValueError(f"onnxruntime runs the graph as stored; precision {self.precision!r} needs openvino")

    def resolved_threads(self) -> int:
        return self.threads if self.threads > 0 else affinity_cores()

    def describe(self) -> dict:
        """The settings as used (threads resolved), for logs and result files."""
        return {**asdict(self), "threads": self.resolved_threads()}


class Runner:
    """A compiled session: ``runner(batch)`` returns the requested outputs, in the requested order."""

    def __init__(self, model_file: Path, settings: EngineSettings, outputs: Optional[Sequence[str]] = None):
        self.settings = settings
        self.engine, self.precision = settings.engine, settings.precision
        self.threads = settings.resolved_threads()
        self.model_file = Path(model_file)
        build = _build_ort if settings.engine == "onnxruntime" else _build_openvino
        self._run, graph_outputs = build(self.model_file, settings, self.threads)
        self.output_names = tuple(outputs) if outputs is not None else tuple(graph_outputs)
        missing = [n for n in self.output_names if n not in graph_outputs]
        if missing:
            raise ValueError(f"{self.model_file.name} has no output(s) {missing} (it has {list(graph_outputs)})")

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return self._run(batch, self.output_names)


def _build_ort(model_file: Path, settings: EngineSettings, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if settings.execution_mode == "sequential"
                           else ort.ExecutionMode.ORT_PARALLEL)
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    session = ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(batch, names):
        return tuple(session.run(list(names), {input_name: batch}))

    return run, [o.name for o in session.get_outputs()]


def _build_openvino(model_file: Path, settings: EngineSettings, threads: int):
    import openvino as ov

    compiled = ov.Core().compile_model(str(model_file), "CPU", {
        "INFERENCE_PRECISION_HINT": _OV_HINT[settings.precision],
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
    })
    request = compiled.create_infer_request()
    ports = {o.get_any_name(): o for o in compiled.outputs}

    def run(batch, names):
        result = request.infer({0: batch})
        return tuple(np.array(result[ports[n]]) for n in names)  # copies: the request reuses its buffers

    return run, list(ports)


def make_runner(model_file: Path, settings: EngineSettings = EngineSettings(),
                outputs: Optional[Sequence[str]] = None) -> Runner:
    """A :class:`Runner` for ``model_file`` built with ``settings``; ``outputs`` (default: all, in graph
    order) fixes which outputs a call returns and in what order."""
    return Runner(model_file, settings, outputs)
