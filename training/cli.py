"""Console entry points: ``morphocam-train`` and ``morphocam-evaluate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from morphocam.config import parse_config

from .checkpoint import CheckpointError
from .config import EvaluateConfig, TrainConfig
from .data import DatasetError
from .state_carry import CarryError


def resume_argv(argv: list[str]) -> list[str]:
    """``--resume RUN_DIR`` alone means ``--config RUN_DIR/config.yaml --resume RUN_DIR``: the stopped
    run's own recipe, so that the continued run is the same run."""
    for i, arg in enumerate(argv):
        run_dir = argv[i + 1] if arg == "--resume" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--resume=") else None)
        if run_dir and "--config" not in argv and not any(a.startswith("--config=") for a in argv):
            return ["--config", str(Path(run_dir) / "config.yaml"), *argv]
    return argv


def train_main(argv: list[str] | None = None) -> int:
    argv = resume_argv(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_config(TrainConfig, argv, "Train a morphocam classifier (paper recipe) and evaluate it.",
                       prog="morphocam-train")
    from .trainer import train

    try:
        train(cfg)
    except (DatasetError, CheckpointError, CarryError, FileNotFoundError, ValueError) as exc:
        print(f"morphocam-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    args = parse_config(EvaluateConfig, argv, "Score a checkpoint on its own seeded split of a dataset.",
                        prog="morphocam-evaluate")
    from .trainer import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.output_dir, args.split)
    except (DatasetError, CheckpointError, FileNotFoundError) as exc:
        print(f"morphocam-evaluate: error: {exc}", file=sys.stderr)
        return 2
    summary = {k: result[k] for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95", "macro_auc_ovr")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
