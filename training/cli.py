"""Console entry points: ``morphocam-train`` and ``morphocam-evaluate``."""

from __future__ import annotations

import json
import sys

from morphocam.config import parse_config

from .checkpoint import CheckpointError
from .config import EvaluateConfig, TrainConfig
from .data import DatasetError


def train_main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, "Train a morphocam classifier (paper recipe) and evaluate it.",
                       prog="morphocam-train")
    from .trainer import train

    try:
        train(cfg)
    except (DatasetError, CheckpointError, FileNotFoundError) as exc:
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
