"""``morphocam-bench carry``: pack the accuracy benchmark's stopped cells for the next session.

Run it (and commit what it lists) before a session ends while ``accuracy_run.sh`` is training: a
fresh clone then resumes each stopped cell from its last finished epoch instead of epoch 1 (see
:mod:`morphocam.training.state_carry`). Safe beside the running trainer: it reads each state file
once, and the trainer replaces that file atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from morphocam.config import option
from morphocam.training.state_carry import PART_BYTES, pack_all


@dataclass
class CarryConfig:
    """What to pack."""

    root: Path = option("folder searched for stopped runs (train_state.pt)", Path("results/benchmarks"))
    part_mb: float = option("size of each committed part in MB (the repository takes files up to 25 MB)",
                            PART_BYTES / 1e6)

    def __post_init__(self) -> None:
        if not 0 < self.part_mb <= 25:
            raise ValueError("part_mb must be in (0, 25]")


def run(cfg: CarryConfig) -> list[dict]:
    rows = pack_all(cfg.root, int(cfg.part_mb * 1e6))
    for row in rows:
        print(f"[carry] {row['carry']}: epoch {row['epoch']}, {row['parts']} parts, {row['bytes'] / 1e6:.1f} MB")
    if not rows:
        print(f"[carry] no stopped run under {cfg.root}")
    else:
        print("commit them: git add " + " ".join(row["carry"] for row in rows))
    return rows
