"""Explanation benchmark: Grad-CAM++ faithfulness on the test split, and its cost per image.

For each checkpoint (e.g. the CBAM model and the plain EfficientNet baseline) it re-derives the
test split, explains every test frame, and reports the target-probability drop when the top 20%
attributed pixels are deleted vs a random 20%, the centre-vs-border mass, and ms per explanation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from morphocam import plotting
from morphocam.atomic import atomic_write_text
from morphocam.config import option


@dataclass
class ExplanationsConfig:
    """Options of ``morphocam-bench explanations``."""

    checkpoint: list[Path] = option("checkpoint file(s), e.g. the CBAM model and the plain baseline; repeat "
                                    "the flag for several", [], repeat=True, required=True)
    data_dir: Optional[Path] = option("class-per-folder dataset root the checkpoints were trained on", None,
                                      required=True)
    output_dir: Path = option("results folder", Path("results/benchmarks/explanations"))
    limit: Optional[int] = option("at most this many test frames per checkpoint", None)
    frac: float = option("fraction of pixels deleted by the faithfulness test", 0.2)


def test_frames(checkpoint: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    from morphocam.training.checkpoint import read_metadata
    from morphocam.training.trainer import checkpoint_split

    meta = read_metadata(checkpoint)
    _, folder, split = checkpoint_split(meta, data_dir)
    return folder.images[split.test], folder.labels[split.test], meta


def run(checkpoints: list[Path], data_dir: Path, output_dir: Path, frac: float = 0.2, limit: int | None = None) -> dict:
    from morphocam.serving.explain import Explainer
    from morphocam.serving.faithfulness import evaluate

    rows = {}
    for ckpt in checkpoints:
        frames, _, meta = test_frames(ckpt, data_dir)
        if limit:
            frames = frames[:limit]
        explainer = Explainer.from_checkpoint(ckpt)
        explainer.explain(frames[:1])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(frames), 8):
            explainer.explain(frames[i:i + 8])
        ms_batch8 = 1e3 * (time.perf_counter() - t) / len(frames)
        t = time.perf_counter()
        for f in frames[:8]:
            explainer.explain(f[None])
        ms_batch1 = 1e3 * (time.perf_counter() - t) / min(8, len(frames))
        report = evaluate(explainer, frames, frac=frac).to_dict()
        name = f"{meta['contract'].get('dataset', '')}:{meta['arch']}{'+cbam' if meta['use_cbam'] else ''}"
        rows[name] = {**report, "ms_per_image_batch1": ms_batch1, "ms_per_image_batch8": ms_batch8,
                      "checkpoint": str(ckpt), "weights": meta.get("weights")}
        print(f"{name}: delete top {frac:.0%} -> prob drop {report['drop_top']:.3f} vs random {report['drop_random']:.3f}; "
              f"centre mass {report['centre_mass_fraction']:.2f} (uniform 0.25); "
              f"{ms_batch1:.0f} ms/image (batch 1), {ms_batch8:.0f} ms/image (batch 8)", flush=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "explanations.json", json.dumps(rows, indent=2) + "\n")
    _plot(rows, output_dir / "explanations.png", frac)
    return rows


def run_all(cfg: ExplanationsConfig) -> dict:
    """``morphocam-bench explanations``."""
    return run(cfg.checkpoint, cfg.data_dir, cfg.output_dir, frac=cfg.frac, limit=cfg.limit)


def _plot(rows: dict, path: Path, frac: float) -> None:
    names = list(rows)
    x = np.arange(len(names))
    fig, ax = plotting.subplots(figsize=(max(5, 2.5 * len(names)), 4))
    ax.bar(x - 0.2, [rows[n]["drop_top"] for n in names], 0.4, label=f"delete top {frac:.0%} (Grad-CAM++)")
    ax.bar(x + 0.2, [rows[n]["drop_random"] for n in names], 0.4, label=f"delete random {frac:.0%}")
    ax.set_xticks(x, names, rotation=10)
    ax.set_ylabel("drop of target-class probability")
    ax.legend(fontsize=8)
    plotting.save(fig, path)
