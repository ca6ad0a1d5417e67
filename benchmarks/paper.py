"""The paper's reported numbers (test split), for side-by-side tables."""

from __future__ import annotations

# config name -> dataset -> (accuracy, macro-F1)
PAPER_TABLE: dict[str, dict[str, tuple[float, float]]] = {
    "simplecnn": {"smids": (0.8267, 0.830), "hushem": (0.7273, 0.695)},
    "efficientnet": {"smids": (0.8800, 0.883), "hushem": (0.6364, 0.684)},
    "cbam": {"smids": (0.8822, 0.885), "hushem": (0.7980, 0.776)},
    "freeze_unfreeze": {"smids": (0.8816, 0.883), "hushem": (0.8940, 0.882)},
    "full": {"smids": (0.9021, 0.913), "hushem": (0.9394, 0.948)},
}
# dataset -> mean one-vs-rest ROC-AUC of the full model
PAPER_AUC: dict[str, float] = {"smids": 0.965, "hushem": 0.991}
# dataset -> (mean, std) of the best published k-fold cross-validation accuracy the issue compares with:
# HuSHem 5-fold, an ensemble of ImageNet CNNs re-run by Spencer et al. 2022 (no published SMIDS CV).
PUBLISHED_CV: dict[str, tuple[float, float]] = {"hushem": (0.941, 0.037)}
