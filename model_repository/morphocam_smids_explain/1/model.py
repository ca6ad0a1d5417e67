"""Triton Python-backend model: Grad-CAM++ explanations (copied as ``<model>_explain/1/model.py``).

Runs PyTorch on the same checkpoint the classifier was exported from (``checkpoint`` parameter,
verified against ``checkpoint_sha256``), in its own stub process and instance group so that it
never slows the classifier. Inputs: ``IMAGES`` uint8 [n,H,W,3], optional ``TARGET_CLASS`` int32
[n,1] (-1 or absent = the predicted class). Outputs: ``PROBABILITIES`` [n,K], ``HEATMAP`` [n,H,W]
float32 in [0,1], ``OVERLAY_PNG`` [n,1] bytes, ``TARGET_CLASS_USED`` int32 [n,1].

The tensor names below are the roles this code fills; their data types and shapes come from the
model's ``config.pbtxt`` (read with ``pb_utils.get_*_config_by_name``, as Triton's examples do), and
loading fails with a clear message when the config and the checkpoint disagree.

Self-contained: beside this file in the version folder are ``explain_core.py`` and ``morphocam_net.py``
(the network and checkpoint reader); the morphocam project need not be installed.

Errors (bad dtype/shape, target out of range) come back inside the request's own response.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

IMAGES = "IMAGES"
TARGET = "TARGET_CLASS"
OUTPUTS = ("PROBABILITIES", "HEATMAP", "OVERLAY_PNG", "TARGET_CLASS_USED")


def _param(config: dict, name: str, default: str) -> str:
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    return value if value not in ("", None) else default


def _tensor_config(config: dict, kind: str, name: str) -> dict:
    found = (pb_utils.get_input_config_by_name if kind == "input" else pb_utils.get_output_config_by_name)(config, name)
    if found is None:
        raise pb_utils.TritonModelException(f"config.pbtxt has no {kind} named {name}")
    return found


def _dims(tensor_config: dict) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor_config["dims"])  # Triton's JSON config spells int64 dims as strings


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", config.get("name", "morphocam_explain"))
        self.max_batch = int(config.get("max_batch_size", 0)) or None
        images = _tensor_config(config, "input", IMAGES)
        self.image_type = images["data_type"].removeprefix("TYPE_")
        self.image_dtype = pb_utils.triton_string_to_numpy(images["data_type"])
        self.image_dims = _dims(images)
        self.output_dtype = {name: pb_utils.triton_string_to_numpy(_tensor_config(config, "output", name)["data_type"])
                             for name in OUTPUTS}
        threads = int(_param(config, "threads", "1"))
        import torch

        torch.set_num_threads(max(threads, 1))  # leave the cores to the classifier
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        os.environ.setdefault("OMP_NUM_THREADS", str(max(threads, 1)))

        from explain_core import Explainer, overlay_png  # a sibling in this version folder

        device = "cpu"
        if args.get("model_instance_kind") == "GPU":  # the GPU repository's explainer (instance_group KIND_GPU)
            if not torch.cuda.is_available():
                raise pb_utils.TritonModelException(f"{self.model_name}: a KIND_GPU instance, but this torch sees no "
                                                    f"CUDA device (install a CUDA build of torch)")
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        version_dir = Path(args["model_repository"]) / args["model_version"]
        checkpoint = version_dir / _param(config, "checkpoint", "model.safetensors")
        try:
            self.explainer = Explainer.from_checkpoint(checkpoint, _param(config, "checkpoint_sha256", "") or None,
                                                       device)
        except Exception as exc:  # surface the reason in the server log and the load error
            raise pb_utils.TritonModelException(f"{self.model_name}: cannot load {checkpoint}: {exc}") from exc
        self._overlay = overlay_png
        e = self.explainer
        expected = {IMAGES: (e.height, e.width, 3), "PROBABILITIES": (e.num_classes,), "HEATMAP": (e.height, e.width)}
        actual = {IMAGES: self.image_dims, "PROBABILITIES": _dims(_tensor_config(config, "output", "PROBABILITIES")),
                  "HEATMAP": _dims(_tensor_config(config, "output", "HEATMAP"))}
        wrong = [f"{n} dims {list(actual[n])} (checkpoint needs {list(want)})" for n, want in expected.items()
                 if actual[n] != want]
        if wrong:
            raise pb_utils.TritonModelException(f"{self.model_name}: config.pbtxt does not fit {checkpoint.name}: "
                                                + "; ".join(wrong))
        pb_utils.Logger.log_info(f"{self.model_name}: Grad-CAM++ on {checkpoint.name}, classes {list(e.classes)}, "
                                 f"device {device}, torch threads {torch.get_num_threads()}")

    def _one(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, IMAGES)
        if tensor is None:
            raise ValueError(f"missing input {IMAGES}")
        x = tensor.as_numpy()
        if x.dtype != self.image_dtype:
            raise ValueError(f"{IMAGES} must be {self.image_type} RGB pixels, got {x.dtype}")
        if x.ndim != 1 + len(self.image_dims) or x.shape[1:] != self.image_dims:
            raise ValueError(f"{IMAGES} must have shape [n,{','.join(map(str, self.image_dims))}], got {list(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{IMAGES} holds 0 frames: send at least one frame")
        if self.max_batch and x.shape[0] > self.max_batch:
            raise ValueError(f"{IMAGES} holds {x.shape[0]} frames, more than max_batch_size {self.max_batch}")
        t = pb_utils.get_input_tensor_by_name(request, TARGET)
        targets = None if t is None else t.as_numpy()
        out = self.explainer.explain(x, targets)  # ValueError names the valid class range
        pngs = [[self._overlay(f, h)] for f, h in zip(x, out["heatmap"])]
        values = {"PROBABILITIES": out["probabilities"], "HEATMAP": out["heatmap"], "OVERLAY_PNG": pngs,
                  "TARGET_CLASS_USED": out["target"].reshape(-1, 1)}
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.asarray(values[name], dtype=self.output_dtype[name])) for name in OUTPUTS])

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
