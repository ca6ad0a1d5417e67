"""Triton Python-backend model: the morphocam classifier on the CPU (copied as ``<model>/1/model.py``).

The exported ONNX graph does all the pixel work (uint8 NHWC -> normalise -> NCHW -> network ->
LOGITS, PROBABILITIES), so this file only runs an in-process engine on the whole dynamic batch.
The engine session comes from ``morphocam_engines.py`` beside this file (the exporter copies the
project's one engine factory, ``morphocam/engines.py``, there), with the served settings: no
spinning, sequential execution. Config ``parameters``:

- ``engine``: ``onnxruntime`` (graph optimisation ALL; the FP32 reference) or ``openvino``
  (``precision`` bf16 -> INFERENCE_PRECISION_HINT bf16, else f32; LATENCY hint);
- ``threads``: intra-op threads per instance, ``0`` = all CPU cores available to the server
  (instances time-share the cores: on 2 cores, 2 instances x 2 threads served 398 img/s at 16 in
  flight against 276 for 2 x 1 with OpenVINO bf16);
- ``model_file``: the graph in the version folder (``model.onnx``, ``model_int8.onnx`` ...);
  when the exporter wrote a ``<model_file>.sha256`` sidecar, the file must match it or the model
  refuses to load (a tampered or truncated graph is never served).

Tensor names, dtypes and the frame shape come from the model config (as Triton's python_backend
examples read them), and the graph's outputs are fetched by the config's output names.

``execute`` concatenates every valid request of the dynamic batch into one inference, splits the
result back and returns exactly one response per request; a bad request gets a ``TritonError``
in its own response and never fails its neighbours. Nothing is raised out of ``execute``.

Self-contained on purpose (numpy, the engine and the factory beside it): the same folder runs in
any Triton container.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from morphocam_engines import EngineSettings, make_runner


def _param(config: dict, name: str, default: str) -> str:
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    return value if value not in ("", None) else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", config.get("name", "morphocam"))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.max_batch = int(config.get("max_batch_size", 0)) or None

        # The one input (uint8 frames [H, W, 3]) and the outputs, by name and dtype, from the config.
        (input_config,) = config["input"]
        self.input_name = input_config["name"]
        self.input_type = input_config["data_type"].replace("TYPE_", "")
        self.input_dtype = pb_utils.triton_string_to_numpy(input_config["data_type"])
        self.frame_shape = tuple(int(d) for d in input_config["dims"])
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

        settings = EngineSettings(engine=_param(config, "engine", "onnxruntime").lower(),
                                  precision=_param(config, "precision", "fp32").lower(),
                                  threads=int(_param(config, "threads", "0")))
        model_file = version_dir / _param(config, "model_file", "model.onnx")
        if not model_file.is_file():
            raise pb_utils.TritonModelException(f"{self.model_name}: model file {model_file} not found")
        self._verify_digest(model_file)
        try:
            self._runner = make_runner(model_file, settings, outputs=[name for name, _ in self.outputs])
        except ValueError as exc:  # unknown engine or precision, an output the graph lacks
            raise pb_utils.TritonModelException(f"{self.model_name}: {exc}") from None
        self.threads = self._runner.threads
        pb_utils.Logger.log_info(f"{self.model_name}: {settings.describe()} file={model_file.name}")

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

    # ------------------------------------------------------------------ hot path
    def _check(self, tensor) -> tuple[np.ndarray | None, str | None]:
        name = self.input_name
        if tensor is None:
            return None, f"missing input {name}"
        x = tensor.as_numpy()
        if x.dtype != self.input_dtype:
            return None, f"{name} must be {self.input_type} RGB pixels, got {x.dtype}"
        if x.ndim != 1 + len(self.frame_shape) or x.shape[1:] != self.frame_shape:
            shape = ",".join(str(d) for d in self.frame_shape)
            return None, (f"{name} must have shape [n,{shape}] ({self.input_type} RGB frames resized "
                          f"to the model input), got {list(x.shape)}")
        if x.shape[0] == 0:
            return None, f"{name} holds 0 frames: send at least one frame"
        if self.max_batch and x.shape[0] > self.max_batch:
            return None, f"{name} holds {x.shape[0]} frames, more than max_batch_size {self.max_batch}"
        return x, None

    def execute(self, requests):
        responses = [None] * len(requests)
        good, arrays = [], []
        for i, request in enumerate(requests):
            try:
                x, err = self._check(pb_utils.get_input_tensor_by_name(request, self.input_name))
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
                x, err = None, f"cannot read {self.input_name}: {exc}"
            if err is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(err))
            else:
                good.append(i)
                arrays.append(x)
        if good:
            try:
                batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
                results = self._runner(batch)
                start = 0
                for i, x in zip(good, arrays):
                    end = start + x.shape[0]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(name, np.ascontiguousarray(result[start:end], dtype))
                        for (name, dtype), result in zip(self.outputs, results)])
                    start = end
            except Exception as exc:  # noqa: BLE001
                err = pb_utils.TritonError(f"{self.model_name}: inference failed: {exc}")
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(error=err)
        return responses

    def finalize(self):
        self._runner = None
