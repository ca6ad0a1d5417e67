"""Grad-CAM++ on a morphocam checkpoint, standalone: the engine of the ``<model>_explain`` Triton model.

Copied unchanged by the exporter into ``<model>_explain/1/`` beside ``model.py`` and
``morphocam_net.py``; the project uses it through :mod:`morphocam.serving.explain` (faithfulness
checks, benchmarks, tests), so the served heatmaps and the checked heatmaps are one computation.

Rules for this file: imports only the standard library, numpy, torch, grad-cam (``pytorch_grad_cam``),
Pillow and its sibling ``morphocam_net``; never ``morphocam``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

try:  # in the project: morphocam.serving.triton_models.explain_core
    from .morphocam_net import load_checkpoint, verify_sha256
except ImportError:  # in a model's version folder, which Triton's stub puts on sys.path: a top-level module
    from morphocam_net import load_checkpoint, verify_sha256


def normalise(frames: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, ImageNet-style; the same arithmetic as ``morphocam.preprocess.normalise``
    (which this file cannot import; tests/test_serving_models.py compares the two)."""
    x = frames.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class PredictedClass:
    """Grad-CAM target = the model's own top class (computed from the same forward pass)."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim == 1:
            return output[int(output.argmax())]
        return output[:, output.argmax(dim=-1)]


def target_layer(model: nn.Module) -> nn.Module:
    """The CBAM output (``model.attention``); for a baseline without CBAM, the backbone's final features."""
    attention = getattr(model, "attention", None)
    if attention is not None and not isinstance(attention, nn.Identity):
        return attention
    return model.features


class Explainer:
    """Grad-CAM++ (``pytorch_grad_cam.GradCAMPlusPlus``) for a loaded MorphoNet and its checkpoint metadata,
    on ``device`` (``"cpu"`` or e.g. ``"cuda:0"`` for a KIND_GPU instance)."""

    def __init__(self, model: nn.Module, meta: dict, device: str = "cpu"):
        from pytorch_grad_cam import GradCAMPlusPlus

        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.meta = meta
        c = meta["contract"]
        self.classes = tuple(c["classes"])
        self.height, self.width = int(c["height"]), int(c["width"])
        self.mean, self.std = tuple(c["mean"]), tuple(c["std"])
        self.cam = GradCAMPlusPlus(model=self.model, target_layers=[target_layer(self.model)])

    @classmethod
    def from_checkpoint(cls, path: Path, expected_sha256: str | None = None, device: str = "cpu") -> "Explainer":
        verify_sha256(Path(path), expected_sha256 or None)  # parameter first, else the sidecar
        model, meta = load_checkpoint(Path(path), verify=False)
        return cls(model, meta, device)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_targets(self, targets: np.ndarray | None, n: int) -> np.ndarray:
        """Per-frame target classes (int, -1 = predicted); raises ValueError naming the valid range."""
        if targets is None:
            return np.full(n, -1, np.int64)
        t = np.asarray(targets).reshape(-1).astype(np.int64)
        if t.size == 1 and n > 1:
            t = np.repeat(t, n)
        if t.size != n:
            raise ValueError(f"TARGET_CLASS has {t.size} values for {n} frames (give one per frame)")
        bad = t[(t < -1) | (t >= self.num_classes)]
        if bad.size:
            names = ", ".join(f"{i}={c}" for i, c in enumerate(self.classes))
            raise ValueError(f"TARGET_CLASS {int(bad[0])} out of range: valid classes are 0..{self.num_classes - 1} "
                             f"({names}) or -1 for the predicted class")
        return t

    def explain(self, frames: np.ndarray, targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """uint8 [n,H,W,3] -> probabilities [n,K], logits [n,K], heatmap [n,H,W] float32 in [0,1], target used [n]."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        t = self.check_targets(targets, frames.shape[0])
        x = torch.from_numpy(normalise(frames, self.mean, self.std)).to(self.device)
        cam_targets = [PredictedClass() if c < 0 else ClassifierOutputTarget(int(c)) for c in t]
        heat = self.cam(input_tensor=x, targets=cam_targets)
        logits = self.cam.outputs.detach().cpu()
        probs = torch.softmax(logits.float(), dim=-1).numpy().astype(np.float32)
        used = np.where(t < 0, probs.argmax(axis=1), t).astype(np.int32)
        heat = np.nan_to_num(np.asarray(heat, np.float32), nan=0.0)
        return {"probabilities": probs, "logits": logits.numpy().astype(np.float32),
                "heatmap": np.clip(heat, 0.0, 1.0), "target": used}

    @torch.no_grad()
    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalise(frames, self.mean, self.std)).to(self.device)
        return torch.softmax(self.model(x).float(), dim=-1).cpu().numpy()


def overlay_png(frame: np.ndarray, heatmap: np.ndarray) -> bytes:
    """The heatmap (jet colour map, half weight) over the uint8 RGB frame, PNG-encoded."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = frame.astype(np.float32) / 255.0
    over = show_cam_on_image(rgb, heatmap.astype(np.float32), use_rgb=True)
    buf = io.BytesIO()
    Image.fromarray(over, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
