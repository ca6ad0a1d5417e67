"""Everything a training run needs to continue after it was stopped: ``<run>/train_state.pt``.

Written atomically at the end of every epoch (temporary file + ``os.replace``), so a run killed at
any moment leaves either the previous epoch's state or this one's, never half a file. It holds the
model, EMA, optimiser and scheduler state, the position (stage, epoch), the history, the best
weights so far and every random-number state that the next epoch draws from (torch's global
generator for augmentation/dropout/MixUp, the loader's shuffling generator, numpy, random), so that
a resumed run continues exactly as an uninterrupted one would.

Loaded with ``weights_only=True``: only tensors and plain containers, no arbitrary unpickling.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

STATE_FILE = "train_state.pt"


@dataclass
class RunState:
    """Where a run is: the next (stage, epoch-in-stage) to train, and what it has learnt so far."""

    stage_index: int = 0
    epoch_in_stage: int = 0
    epoch: int = 0  # epochs completed in total
    global_step: int = 0  # optimiser steps in total (drives the EMA warm-up)
    history: list = field(default_factory=list)
    best_macro_f1: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_state: Optional[dict] = None
    seconds: float = 0.0  # training wall time accumulated over all sessions of this run


def capture_rng(loader_generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "loader": loader_generator.get_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def restore_rng(rng: dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    loader_generator.set_state(rng["loader"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(run_dir: Path, run: RunState, model: torch.nn.Module, ema, optimizer, scheduler,
               loader_generator: torch.Generator) -> Path:
    """Atomically write ``run_dir/train_state.pt``."""
    payload = {"run": asdict(run), "model": model.state_dict(),
               "ema": ema.module.state_dict() if ema is not None else None,
               "optimizer": optimizer.state_dict() if optimizer is not None else None,
               "scheduler": scheduler.state_dict() if scheduler is not None else None,
               "rng": capture_rng(loader_generator)}
    target = Path(run_dir) / STATE_FILE
    fd, tmp = tempfile.mkstemp(prefix=".train_state.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_state(run_dir: Path) -> dict[str, Any]:
    """The saved payload; ``payload['run']`` is turned back into a :class:`RunState`."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: nothing to resume (the run never finished an epoch)")
    return parse_state(path.read_bytes())


def parse_state(data: bytes) -> dict[str, Any]:
    """A state file's bytes as :func:`load_state` returns them (for a caller that already holds them)."""
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    payload["run"] = RunState(**payload["run"])
    return payload
