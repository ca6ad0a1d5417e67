"""Carry a stopped run's ``train_state.pt`` through git, so a fresh clone resumes it.

A workspace that does not outlive its session (a CI runner, a lent machine, a clean checkout) keeps
only what was committed. ``train_state.pt`` (~73 MB for Lite0 + CBAM: model, EMA, best weights,
AdamW moments) is over the 25 MB this repository commits per file and is git-ignored, so a long cell
(a SMIDS fold: ~2.8 h on 2 cores) would restart from epoch 1 in every session. :func:`pack` writes it
as ``<run>/train_state.carry/part-000 ...`` (each under the limit) plus ``manifest.json`` (size,
sha256, epoch); :func:`restore` joins the parts back into ``train_state.pt`` -- checked against the
sha256, written atomically -- when the run folder has no state of its own. The bytes are the state
itself, so a carried run continues exactly as an uninterrupted one (nothing is re-quantised).

The trainer discards the carry when the run completes (``metrics.json`` is the marker then); the
parts stay in git history, which is the price of resuming across sessions: pack at the end of a
session, not every epoch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from morphocam.atomic import atomic_write_bytes, atomic_write_text

from .run_state import STATE_FILE, parse_state

CARRY_DIR = "train_state.carry"
MANIFEST = "manifest.json"
PART_BYTES = 20_000_000  # under the repository's 25 MB per file


class CarryError(RuntimeError):
    """The carried parts do not add up to the state their manifest describes."""


def _manifest(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CARRY_DIR / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def pack(run_dir: Path, part_bytes: int = PART_BYTES) -> Path | None:
    """Write ``run_dir/train_state.pt`` as committable parts; the carry folder, or None when the run
    has no state. Packing the same state twice rewrites nothing."""
    run_dir = Path(run_dir)
    state = run_dir / STATE_FILE
    if not state.is_file():
        return None
    data = state.read_bytes()  # one read: the trainer replaces the file atomically, never edits it
    digest = hashlib.sha256(data).hexdigest()
    carry = run_dir / CARRY_DIR
    old = _manifest(run_dir)
    if old is not None and old["sha256"] == digest:
        return carry
    epoch = parse_state(data)["run"].epoch  # from the bytes packed: the file may be replaced meanwhile
    shutil.rmtree(carry, ignore_errors=True)
    carry.mkdir()
    parts = []
    for i in range(0, len(data), part_bytes):
        name = f"part-{i // part_bytes:03d}"
        (carry / name).write_bytes(data[i:i + part_bytes])
        parts.append(name)
    # The manifest last: parts without one are an interrupted pack, which restore() ignores.
    atomic_write_text(carry / MANIFEST, json.dumps(
        {"file": STATE_FILE, "size": len(data), "sha256": digest, "epoch": epoch, "parts": parts}, indent=2) + "\n")
    return carry


def restore(run_dir: Path) -> bool:
    """Join the carried parts into ``run_dir/train_state.pt`` when the folder has no state file of its
    own (a state there is at least as new: the carry was packed from it). True when a state file is
    there afterwards."""
    run_dir = Path(run_dir)
    state = run_dir / STATE_FILE
    if state.is_file():
        return True
    manifest = _manifest(run_dir)
    if manifest is None:
        return False
    carry = run_dir / CARRY_DIR
    data = b"".join((carry / name).read_bytes() for name in manifest["parts"])
    if len(data) != manifest["size"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise CarryError(f"{carry}: the parts do not match {MANIFEST} (size {len(data)} vs {manifest['size']} "
                         "or sha256 differs): a partial checkout or an edited part; restore them from git")
    atomic_write_bytes(state, data)
    print(f"[carry] {state}: restored from {len(manifest['parts'])} committed parts (epoch {manifest['epoch']})",
          flush=True)
    return True


def discard(run_dir: Path) -> None:
    """Remove the carry of a completed run."""
    shutil.rmtree(Path(run_dir) / CARRY_DIR, ignore_errors=True)


def pack_all(root: Path, part_bytes: int = PART_BYTES) -> list[dict]:
    """Pack every stopped run under ``root``; one row per run: folder, epoch, parts."""
    rows = []
    for state in sorted(Path(root).rglob(STATE_FILE)):
        carry = pack(state.parent, part_bytes)
        manifest = _manifest(state.parent)
        rows.append({"run": str(state.parent), "carry": str(carry), "epoch": manifest["epoch"],
                     "parts": len(manifest["parts"]), "bytes": manifest["size"]})
    return rows
