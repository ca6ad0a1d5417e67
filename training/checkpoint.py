"""Self-describing checkpoints: safetensors weights with the model's metadata in the file header.

No pickle anywhere: loading a checkpoint cannot execute code. The header carries the input
contract (classes, size, normalisation), the architecture, the weights it started from, the
recipe, metrics, the dataset fingerprint and the code version; a sidecar ``.sha256`` lets the
exporter refuse a file that changed since training.

Writing lives here; reading (:func:`read_metadata`, :func:`verify_sha256`, :func:`load_checkpoint`)
lives in the standalone ``serving/triton_models/morphocam_net.py``, because the served explain model
reads the same checkpoint where the project is not installed: one reader for both.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from safetensors.torch import save_file

from morphocam.atomic import atomic_path
from morphocam.contract import InputContract
from morphocam.serving.triton_models.morphocam_net import (  # noqa: F401 - re-exported reader
    META_KEY, REQUIRED, CheckpointError, file_sha256, load_checkpoint, read_metadata, verify_sha256)

from .model import MorphoNet


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


def contract_of(meta: dict) -> InputContract:
    return InputContract.from_dict(meta["contract"])
