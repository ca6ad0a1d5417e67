"""Self-describing checkpoints: safetensors weights with the model's metadata in the file header.

No pickle anywhere: loading a checkpoint cannot execute code. The header carries the input
contract (classes, size, normalisation), the architecture, the weights it started from, the
recipe, metrics, the dataset fingerprint and the code version; a sidecar ``.sha256`` lets the
exporter refuse a file that changed since training.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from morphocam.atomic import atomic_path
from morphocam.contract import InputContract

from .model import MorphoNet, build_model

META_KEY = "morphocam"
REQUIRED = ("contract", "arch", "use_cbam")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from morphocam import __version__

    return __version__


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model: MorphoNet, meta: dict, path: Path) -> str:
    """Write weights + metadata atomically; returns the file's sha256 (also written to ``.sha256``)."""
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"metadata lacks {missing}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    digest = file_sha256(path)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

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
    path = Path(path)
    meta = read_metadata(path)
    if verify:
        verify_sha256(path)
    contract = InputContract.from_dict(meta["contract"])
    model = build_model(meta["arch"], contract.num_classes, use_cbam=meta["use_cbam"],
                        dropout=meta.get("dropout", 0.2), cbam_reduction=meta.get("cbam_reduction", 16))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from None
    head = state.get("head.weight")
    if head is None or head.shape[0] != contract.num_classes:
        shape = None if head is None else tuple(head.shape)
        raise CheckpointError(f"{path}: head weight {shape} does not match the {contract.num_classes} "
                              f"classes in its metadata {list(contract.classes)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {meta['arch']!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    model.eval()
    return model, meta


def contract_of(meta: dict) -> InputContract:
    return InputContract.from_dict(meta["contract"])

