"""Calibration: expected calibration error before and after temperature scaling.

The temperature is fitted on the validation split (NLL), then ECE is measured on the test split,
both re-derived from the checkpoint's own recipe (same seed, same split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from morphocam import plotting
from morphocam.atomic import atomic_write_text
from morphocam.config import option


@dataclass
class CalibrationConfig:
    """Options of ``morphocam-bench calibration``."""

    checkpoint: list[Path] = option("checkpoint file(s); repeat the flag for several", [], repeat=True,
                                    required=True)
    data_dir: Optional[Path] = option("class-per-folder dataset root the checkpoints were trained on", None,
                                      required=True)
    output_dir: Path = option("results folder", Path("results/benchmarks/calibration"))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over confidence bins of |accuracy - confidence| weighted by bin size."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def softmax_t(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    z = log_probs / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = softmax_t(log_probs, float(np.exp(log_t)))
        return float(-np.log(p[np.arange(len(labels)), labels].clip(1e-12)).mean())

    res = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(res.x))


def run(checkpoint: Path, data_dir: Path, output_dir: Path) -> dict:
    import torch

    from morphocam.training.checkpoint import load_checkpoint
    from morphocam.training.trainer import checkpoint_split, predict_probs

    model, meta = load_checkpoint(checkpoint)
    _, folder, split = checkpoint_split(meta, data_dir)
    out = {}
    logp = {}
    for part in ("val", "test"):
        idx = getattr(split, part)
        logp[part] = np.log(predict_probs(model, folder.images[idx], torch.device("cpu")).clip(1e-12))
        out[part] = folder.labels[idx]
    t = fit_temperature(logp["val"], out["val"])
    before = softmax_t(logp["test"], 1.0)
    after = softmax_t(logp["test"], t)
    result = {"checkpoint": str(checkpoint), "dataset": meta["contract"].get("dataset"), "temperature": t,
              "n_val": int(len(out["val"])), "n_test": int(len(out["test"])),
              "ece_test_before": expected_calibration_error(before, out["test"]),
              "ece_test_after": expected_calibration_error(after, out["test"]),
              "accuracy_test": float((before.argmax(1) == out["test"]).mean())}
    output_dir.mkdir(parents=True, exist_ok=True)
    name = f"calibration_{result['dataset']}"
    atomic_write_text(output_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
    _plot(before, after, out["test"], t, output_dir / f"{name}.png", result["dataset"])
    print(f"{result['dataset']}: T={t:.3f}  ECE test {result['ece_test_before']:.4f} -> {result['ece_test_after']:.4f}")
    return result


def run_all(cfg: CalibrationConfig) -> dict:
    """``morphocam-bench calibration``: one calibration run per checkpoint, keyed by checkpoint path."""
    return {str(ckpt): run(ckpt, cfg.data_dir, cfg.output_dir) for ckpt in cfg.checkpoint}


def _plot(before, after, labels, t, path, title, bins=10):
    fig, ax = plotting.subplots(figsize=(4.5, 4))
    edges = np.linspace(0, 1, bins + 1)
    for probs, name in ((before, "T=1"), (after, f"T={t:.2f}")):
        conf, correct = probs.max(1), probs.argmax(1) == labels
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (conf > lo) & (conf <= hi)
            if m.any():
                xs.append(conf[m].mean())
                ys.append(correct[m].mean())
        ax.plot(xs, ys, "o-", label=name)
    ax.plot([0, 1], [0, 1], "k:")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: reliability (test)")
    ax.legend()
    plotting.save(fig, path)
