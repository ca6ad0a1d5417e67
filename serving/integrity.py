"""Check every model file against its ``.sha256`` sidecar before the server loads it.

The exporter writes ``<file>.sha256`` ("<hex digest>  <file name>") beside each served file
(``model.onnx``, ``model_int8.onnx``, ``model.safetensors``). The Python-backend models check their
own file at load; Triton's ONNX Runtime backend cannot, so the launcher checks every sidecar in the
repository before the server starts (:func:`verify_repository`) and refuses a model whose file was
modified or truncated after export. The sidecars guard integrity, not authenticity: whoever can
write the repository can replace a file and its digest together.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

SIDECAR = ".sha256"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:  # streamed: model files are tens of MB
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_sidecar(sidecar: Path) -> str | None:
    """None when the file the sidecar names matches its digest, else the reason."""
    target = sidecar.with_name(sidecar.name[: -len(SIDECAR)])
    expected = (sidecar.read_text().split() or [""])[0].lower()
    if not target.is_file():
        return f"{target.name} is missing (its sidecar {sidecar.name} is there)"
    actual = file_sha256(target)
    if actual != expected:
        return (f"{target.name} sha256 {actual[:16]}... does not match {sidecar.name} ({expected[:16]}...): "
                f"the file was modified or truncated after export; refusing to load it (re-export the model)")
    return None


def model_folders(repository: Path) -> list[Path]:
    """The model folders of a repository (sub-folders holding a ``config.pbtxt``)."""
    return sorted(p for p in Path(repository).iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())


def verify_model(model_dir: Path) -> str | None:
    """None when every sidecar in the model's version folders matches, else the first reason."""
    for sidecar in sorted(Path(model_dir).glob(f"*/*{SIDECAR}")):
        reason = check_sidecar(sidecar)
        if reason:
            return f"{sidecar.parent.name}/{reason}"
    return None


def verify_repository(repository: Path) -> dict[str, str]:
    """{model name: reason} for every model with a file that does not match its sidecar."""
    bad = {}
    for folder in model_folders(repository):
        reason = verify_model(folder)
        if reason:
            bad[folder.name] = reason
    return bad


def without_models(repository: Path, excluded: set[str], parent: Path | None = None) -> Path:
    """A new repository folder (under ``parent``, default the temp folder) linking every model of
    ``repository`` except ``excluded``: the server then never sees the refused models."""
    farm = Path(tempfile.mkdtemp(prefix="morphocam-verified-repo.", dir=parent))
    for folder in sorted(p for p in Path(repository).iterdir() if p.is_dir()):
        if folder.name not in excluded:
            os.symlink(folder.resolve(), farm / folder.name, target_is_directory=True)
    return farm
