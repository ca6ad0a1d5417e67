"""Triton Python-backend model: Grad-CAM++ explanations (copied as ``<model>_explain/1/model.py``).

Runs PyTorch on the same checkpoint the classifier was exported from (``checkpoint`` parameter,
verified against ``checkpoint_sha256``), in its own stub process and instance group so that it
never slows the classifier. Inputs: ``IMAGES`` uint8 [n,H,W,3], optional ``TARGET_CLASS`` int32
[n,1] (-1 or absent = the predicted class). Outputs: ``PROBABILITIES`` [n,K], ``HEATMAP`` [n,H,W]
float32 in [0,1], ``OVERLAY_PNG`` [n,1] bytes, ``TARGET_CLASS_USED`` int32 [n,1].

Errors (bad dtype/shape, target out of range) come back inside the request's own response.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT = "IMAGES"
TARGET = "TARGET_CLASS"


def _param(config: dict, name: str, default: str) -> str:
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    return value if value not in ("", None) else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", config.get("name", "morphocam_explain"))
        self.max_batch = int(config.get("max_batch_size", 0)) or None
        threads = int(_param(config, "threads", "1"))
        import torch

        torch.set_num_threads(max(threads, 1))  # leave the cores to the classifier
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        os.environ.setdefault("OMP_NUM_THREADS", str(max(threads, 1)))

        from morphocam.serving.explain import Explainer, overlay_png

        version_dir = Path(args["model_repository"]) / args["model_version"]
        checkpoint = version_dir / _param(config, "checkpoint", "model.safetensors")
        try:
            self.explainer = Explainer.from_checkpoint(checkpoint, _param(config, "checkpoint_sha256", "") or None)
        except Exception as exc:  # surface the reason in the server log and the load error
            raise pb_utils.TritonModelException(f"{self.model_name}: cannot load {checkpoint}: {exc}") from exc
        self._overlay = overlay_png
        c = self.explainer.contract
        self.height, self.width = c.height, c.width
        pb_utils.Logger.log_info(f"{self.model_name}: Grad-CAM++ on {checkpoint.name}, classes {list(c.classes)}, "
                                 f"torch threads {torch.get_num_threads()}")

    def _one(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
        if tensor is None:
            raise ValueError(f"missing input {INPUT}")
        x = tensor.as_numpy()
        if x.dtype != np.uint8:
            raise ValueError(f"{INPUT} must be UINT8 RGB pixels, got {x.dtype}")
        if x.ndim != 4 or x.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"{INPUT} must have shape [n,{self.height},{self.width},3], got {list(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{INPUT} holds 0 frames: send at least one frame")
        if self.max_batch and x.shape[0] > self.max_batch:
            raise ValueError(f"{INPUT} holds {x.shape[0]} frames, more than max_batch_size {self.max_batch}")
        t = pb_utils.get_input_tensor_by_name(request, TARGET)
        targets = None if t is None else t.as_numpy()
        out = self.explainer.explain(x, targets)  # ValueError names the valid class range
        pngs = np.array([[self._overlay(f, h)] for f, h in zip(x, out["heatmap"])], dtype=np.object_)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("PROBABILITIES", out["probabilities"]),
            pb_utils.Tensor("HEATMAP", out["heatmap"].astype(np.float32)),
            pb_utils.Tensor("OVERLAY_PNG", pngs),
            pb_utils.Tensor("TARGET_CLASS_USED", out["target"].reshape(-1, 1).astype(np.int32)),
        ])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:  # noqa: BLE001 - errors travel in the response, never out of execute
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.model_name}: {exc}")))
        return responses

    def finalize(self):
        self.explainer = None
