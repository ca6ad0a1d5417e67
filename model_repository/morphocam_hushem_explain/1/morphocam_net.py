"""The morphocam network and its checkpoint reader, standalone: the one definition, shipped in every explain model folder.

The ``<model>_explain`` Triton model runs PyTorch on the checkpoint, inside a Python-backend stub
where the morphocam project is not installed (a stock NGC Triton container has only the pip
packages the README lists). So the network definition cannot live in the project alone: this file
*is* the definition. The exporter copies it unchanged into ``<model>_explain/1/`` beside
``model.py``, and ``morphocam.training.model`` / ``morphocam.training.checkpoint`` import it from here,
so training, export and serving build the very same network from the very same code
(tests/test_serving_models.py checks that every copied file equals this source and that a
checkpoint gives identical logits through the training path and the copied file).

Rules for this file: imports only the standard library, torch, timm and safetensors; never
``morphocam`` (it must import as a top-level module from a model's version folder).

Shape shared by every network here, so that export and Grad-CAM++ treat them alike:
``features`` (backbone, B x C x h x w) -> ``attention`` (CBAM or identity) -> global average
pool -> dropout -> ``head`` (linear). ``attention`` is the Grad-CAM++ target layer.

Checkpoints are safetensors files (no pickle: loading cannot execute code) whose header carries the
metadata under ``"morphocam"``: the input contract (classes, size, normalisation), ``arch``,
``use_cbam`` and more; a sidecar ``<file>.sha256`` records the digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

META_KEY = "morphocam"
REQUIRED = ("contract", "arch", "use_cbam")


class ChannelAttention(nn.Module):
    """CBAM channel attention Mc: shared MLP over avg- and max-pooled descriptors, then sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + mx)  # B x C x 1 x 1


class SpatialAttention(nn.Module):
    """CBAM spatial attention Ms: 7x7 conv over the channel-mean and channel-max maps, then sigmoid."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(desc))  # B x 1 x h x w


class CBAM(nn.Module):
    """Woo et al. 2018: F' = Mc(F) * F, F'' = Ms(F') * F'."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel(x) * x
        return self.spatial(x) * x


class SimpleCNN(nn.Module):
    """The paper's from-scratch baseline: four conv-BN-ReLU-pool blocks."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in widths:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.num_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MorphoNet(nn.Module):
    """features -> attention -> pool -> dropout -> head."""

    def __init__(self, features: nn.Module, num_features: int, num_classes: int,
                 use_cbam: bool = True, dropout: float = 0.2, cbam_reduction: int = 16):
        super().__init__()
        self.features = features
        self.attention = CBAM(num_features, cbam_reduction) if use_cbam else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.features(x))

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.flatten(self.pool(fmap), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def body_parameters(self):
        """Everything stage 1 of freeze-then-unfreeze keeps frozen: backbone and CBAM."""
        yield from self.features.parameters()
        yield from self.attention.parameters()


SIMPLECNN = "simplecnn"


def build_model(arch: str, num_classes: int, use_cbam: bool = True, dropout: float = 0.2,
                pretrained_timm: bool = False, cbam_reduction: int = 16) -> MorphoNet:
    """Build a network by name: ``simplecnn`` or any timm backbone name (e.g. ``efficientnet_b0``).

    ``pretrained_timm`` asks timm to download ImageNet weights from its hub (needs a network);
    offline weights are loaded afterwards (``morphocam.training.pretrained``).
    """
    if arch == SIMPLECNN:
        body = SimpleCNN()
        return MorphoNet(body, body.num_features, num_classes, use_cbam, dropout, cbam_reduction)
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"unknown backbone {arch!r}: not {SIMPLECNN!r} and not a timm model name "
                         f"(e.g. efficientnet_b0, tf_efficientnet_lite0; see timm.list_models())")
    # num_classes=0 + global_pool='' makes timm return the final feature map (B x 1280 x 7 x 7 for B0).
    body = timm.create_model(arch, pretrained=pretrained_timm, num_classes=0, global_pool="")
    return MorphoNet(body, body.num_features, num_classes, use_cbam, dropout, cbam_reduction)


# ----------------------------------------------------------------------------- checkpoints (reading)
class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: Path) -> dict:
    """The checkpoint's morphocam metadata (header only; no weights are read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    if META_KEY not in header:
        raise CheckpointError(f"{path}: checkpoint has no morphocam metadata")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: morphocam metadata is not valid JSON ({exc})") from None
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {missing}")
    return meta


def verify_sha256(path: Path, expected: str | None = None) -> str:
    """Compare the file with ``expected`` or its ``.sha256`` sidecar (if present); returns the digest."""
    path = Path(path)
    digest = file_sha256(path)
    if expected is None:
        side = path.with_name(path.name + ".sha256")
        if side.is_file():
            expected = side.read_text().split()[0]
    if expected is not None and digest != expected:
        raise CheckpointError(f"{path}: sha256 {digest[:12]}… does not match the recorded {expected[:12]}…")
    return digest


def load_checkpoint(path: Path, verify: bool = True) -> tuple[MorphoNet, dict]:
    """Rebuild the network from its metadata and load the weights strictly; eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    if verify:
        verify_sha256(path)
    classes = meta["contract"].get("classes") if isinstance(meta["contract"], dict) else None
    if not isinstance(classes, list) or len(classes) < 2:
        raise CheckpointError(f"{path}: metadata contract has no class list of at least 2 classes ({classes!r})")
    model = build_model(meta["arch"], len(classes), use_cbam=meta["use_cbam"],
                        dropout=meta.get("dropout", 0.2), cbam_reduction=meta.get("cbam_reduction", 16))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from None
    head = state.get("head.weight")
    if head is None or head.shape[0] != len(classes):
        shape = None if head is None else tuple(head.shape)
        raise CheckpointError(f"{path}: head weight {shape} does not match the {len(classes)} "
                              f"classes in its metadata {classes}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {meta['arch']!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    model.eval()
    return model, meta
