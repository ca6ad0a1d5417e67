"""Classification metrics with confidence intervals, and the plots that go beside them.

Small test splits (HuSHem: 33 images) make point estimates shaky, so every headline number comes
with a 95% interval: Wilson for accuracy, a percentile bootstrap for macro-F1 and ROC-AUC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_curve

from morphocam import plotting
from morphocam.stats import macro_f1, wilson_interval

__all__ = ["binary_auc", "bootstrap_interval", "classification_metrics", "headline", "macro_auc",
           "macro_f1_of_probs", "plot_confusion", "plot_curves", "plot_roc", "wilson_interval"]


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic with tied scores ranked on average (= roc_auc_score),
    in numpy: the bootstrap calls it thousands of times, where roc_auc_score's checks dominate."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest ROC-AUC over the classes present in y_true (NaN if fewer than 2)."""
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([binary_auc(y_true == c, probs[:, c]) for c in present]))


def bootstrap_interval(fn, y_true: np.ndarray, probs: np.ndarray, n_boot: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = len(y_true)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = fn(y_true[idx], probs[idx])
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return (float(lo), float(hi))


def macro_f1_of_probs(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro-F1 of the argmax predictions: the (labels, probabilities) form the bootstrap resamples."""
    return macro_f1(y_true, probs.argmax(1), probs.shape[1])



def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...],
                           n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1, OvR ROC-AUC, confusion matrix, with 95% CIs."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(y_true) or probs.shape[1] != len(classes):
        raise ValueError(f"probabilities {probs.shape} do not match {len(y_true)} labels x {len(classes)} classes")
    pred = probs.argmax(1)
    labels = np.arange(len(classes))
    correct = int((pred == y_true).sum())
    prec, rec, f1, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "accuracy_ci95": list(wilson_interval(correct, len(y_true))),
        "macro_f1": macro_f1_of_probs(y_true, probs),
        "macro_f1_ci95": list(bootstrap_interval(macro_f1_of_probs, y_true, probs, n_boot, seed)),
        "macro_auc_ovr": macro_auc(y_true, probs),
        "macro_auc_ovr_ci95": list(bootstrap_interval(macro_auc, y_true, probs, n_boot, seed)),
        "per_class": {
            c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
        "classes": list(classes),
    }


def headline(metrics: dict) -> dict:
    """The figures a summary table carries from :func:`classification_metrics`' result."""
    return {"accuracy": metrics["accuracy"], "accuracy_ci95": metrics["accuracy_ci95"], "macro_f1": metrics["macro_f1"],
            "macro_auc_ovr": metrics["macro_auc_ovr"], "n": metrics["n"],
            "per_class_f1": {c: v["f1"] for c, v in metrics["per_class"].items()}}


def plot_confusion(metrics: dict, path: Path, title: str) -> None:
    cm = np.array(metrics["confusion_matrix"])
    classes = metrics["classes"]
    fig, ax = plotting.subplots(figsize=(4 + 0.6 * len(classes), 3.5 + 0.5 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    plotting.save(fig, path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], path: Path, title: str) -> None:
    fig, ax = plotting.subplots(figsize=(5, 4.5))
    for c, name in enumerate(classes):
        if len(np.unique(y_true == c)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {binary_auc(y_true == c, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    plotting.save(fig, path)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plotting.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(ep, [h["train_loss"] for h in history], label="train loss")
    a1.plot(ep, [h["val_loss"] for h in history], label="val loss")
    a2.plot(ep, [h["val_accuracy"] for h in history], label="val accuracy")
    a2.plot(ep, [h["val_macro_f1"] for h in history], label="val macro-F1")
    unfreeze = [h["epoch"] for h in history if h.get("stage") == 2]
    for ax in (a1, a2):
        if unfreeze and unfreeze[0] > ep[0]:
            ax.axvline(unfreeze[0] - 0.5, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    plotting.save(fig, path)
