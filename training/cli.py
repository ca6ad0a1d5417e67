"""Console entry points: ``morphocam-train`` and ``morphocam-evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from morphocam.config import parse_config

from .checkpoint import CheckpointError
from .config import TrainConfig
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
    parser = argparse.ArgumentParser(prog="morphocam-evaluate",
                                     description="Score a checkpoint on its own seeded split of a dataset.")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--split", choices=("train", "val", "test"), default="test")
    parser.add_argument("--output-dir", type=Path, default=None, help="write eval_<split>.json and plots here")
    args = parser.parse_args(argv)
    from .trainer import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.output_dir, args.split)
    except (DatasetError, CheckpointError, FileNotFoundError) as exc:
        print(f"morphocam-evaluate: error: {exc}", file=sys.stderr)
        return 2
    summary = {k: result[k] for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95", "macro_auc_ovr")}
    print(json.dumps(summary, indent=2))
    return 0
