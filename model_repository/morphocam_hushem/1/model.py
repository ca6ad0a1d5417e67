"""Triton Python-backend model: the morphocam classifier on the CPU (copied as ``<model>/1/model.py``).

The exported ONNX graph does all the pixel work (uint8 NHWC -> normalise -> NCHW -> network ->
LOGITS, PROBABILITIES), so this file only runs an in-process engine on the whole dynamic batch:

- ``engine`` parameter ``onnxruntime`` (graph optimisation ALL; the FP32 reference) or ``openvino``
  (``precision`` bf16 -> INFERENCE_PRECISION_HINT bf16, else f32; LATENCY hint);
- ``threads`` parameter: intra-op threads per instance, ``0`` = all CPU cores available to the server
  (instances time-share the cores: on 2 cores, 2 instances x 2 threads served 398 img/s at 16 in
  flight against 276 for 2 x 1 with OpenVINO bf16);
- ``model_file`` parameter: the graph in the version folder (``model.onnx``, ``model_int8.onnx`` ...);
  when the exporter wrote a ``<model_file>.sha256`` sidecar, the file must match it or the model
  refuses to load (a tampered or truncated graph is never served).

``execute`` concatenates every valid request of the dynamic batch into one inference, splits the
result back and returns exactly one response per request; a bad request gets a ``TritonError``
in its own response and never fails its neighbours. Nothing is raised out of ``execute``.

Self-contained on purpose (numpy + the engine only): the same file runs in any Triton container.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT = "IMAGES"


def _param(config: dict, name: str, default: str) -> str:
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    return value if value not in ("", None) else default


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", config.get("name", "morphocam"))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        contract = json.loads((version_dir / "contract.json").read_text())
        self.height, self.width = int(contract["height"]), int(contract["width"])
        self.num_classes = len(contract["classes"])
        self.max_batch = int(config.get("max_batch_size", 0)) or None

        self.engine = _param(config, "engine", "onnxruntime").lower()
        self.precision = _param(config, "precision", "fp32").lower()
        model_file = version_dir / _param(config, "model_file", "model.onnx")
        if not model_file.is_file():
            raise pb_utils.TritonModelException(f"{self.model_name}: model file {model_file} not found")
        self._verify_digest(model_file)
        threads = int(_param(config, "threads", "0"))
        if threads <= 0:
            threads = _cores()
        self.threads = threads

        if self.engine == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # No busy-waiting between ops: the server, the stub and often the client share the cores,
            # and spinning threads starved them (served p95 at 4 in flight: 519 ms spinning, 32 ms not).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(str(model_file), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
            self._outputs = [o.name for o in self._session.get_outputs()]
            self._run = self._run_ort
        elif self.engine == "openvino":
            import openvino as ov

            hint = {"bf16": "bf16", "fp16": "f16"}.get(self.precision, "f32")
            core = ov.Core()
            self._compiled = core.compile_model(str(model_file), "CPU", {
                "INFERENCE_PRECISION_HINT": hint,
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",
            })
            self._request = self._compiled.create_infer_request()
            self._ov_outputs = {o.get_any_name(): o for o in self._compiled.outputs}
            self._run = self._run_ov
        else:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: unknown engine {self.engine!r} (use 'onnxruntime' or 'openvino')")
        pb_utils.Logger.log_info(f"{self.model_name}: engine={self.engine} precision={self.precision} "
                                 f"threads={threads} file={model_file.name}")

    def _verify_digest(self, model_file: Path) -> None:
        sidecar = model_file.with_name(model_file.name + ".sha256")
        if not sidecar.is_file():
            return
        expected = (sidecar.read_text().split() or [""])[0].lower()
        h = hashlib.sha256()
        with open(model_file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != expected:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: {model_file.name} sha256 {h.hexdigest()[:16]}... does not match "
                f"{sidecar.name} ({expected[:16]}...): the file was modified or truncated after export; "
                "refusing to load it (re-export the repository)")

    # ------------------------------------------------------------------ engines
    # Every output the graph has (LOGITS, PROBABILITIES and whatever a later graph adds), by name.
    def _run_ort(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self._session.run(self._outputs, {self._input: batch})))

    def _run_ov(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        result = self._request.infer({0: batch})
        return {name: np.array(result[port]) for name, port in self._ov_outputs.items()}

    # ------------------------------------------------------------------ hot path
    def _check(self, tensor) -> tuple[np.ndarray | None, str | None]:
        if tensor is None:
            return None, f"missing input {INPUT}"
        x = tensor.as_numpy()
        if x.dtype != np.uint8:
            return None, f"{INPUT} must be UINT8 RGB pixels, got {x.dtype}"
        if x.ndim != 4 or x.shape[1:] != (self.height, self.width, 3):
            return None, (f"{INPUT} must have shape [n,{self.height},{self.width},3] (uint8 RGB frames resized "
                          f"to the model input), got {list(x.shape)}")
        if x.shape[0] == 0:
            return None, f"{INPUT} holds 0 frames: send at least one frame"
        if self.max_batch and x.shape[0] > self.max_batch:
            return None, f"{INPUT} holds {x.shape[0]} frames, more than max_batch_size {self.max_batch}"
        return x, None

    def execute(self, requests):
        responses = [None] * len(requests)
        good, arrays = [], []
        for i, request in enumerate(requests):
            try:
                x, err = self._check(pb_utils.get_input_tensor_by_name(request, INPUT))
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
                x, err = None, f"cannot read {INPUT}: {exc}"
            if err is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(err))
            else:
                good.append(i)
                arrays.append(x)
        if good:
            try:
                batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
                outputs = self._run(batch)
                start = 0
                for i, x in zip(good, arrays):
                    end = start + x.shape[0]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(name, np.ascontiguousarray(value[start:end]))
                        for name, value in outputs.items()])
                    start = end
            except Exception as exc:  # noqa: BLE001
                err = pb_utils.TritonError(f"{self.model_name}: inference failed: {exc}")
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(error=err)
        return responses

    def finalize(self):
        self._session = self._compiled = self._request = None
