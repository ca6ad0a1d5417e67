"""The project's statistics, defined once: the Wilson interval and macro-F1.

Torch-free and light (numpy only): the client's per-sample report needs the Wilson interval, and the
bootstrap intervals call macro-F1 a thousand times per figure, where scikit-learn's input validation
cost ~10 ms a call (minutes per training run); the values are scikit-learn's (tests compare them).
"""

from __future__ import annotations

import math

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, as fractions in [0, 1].

    ``n == 0`` gives the uninformative (0, 1). At 0 and ``n`` successes the bound on that side is
    exactly 0 or 1 (the closed form leaves a rounding residue there).
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n], got {successes} of {n}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over all ``num_classes`` classes.

    A class with no true and no predicted frame scores 0 (it is still averaged in), so a model that
    never predicts a class is not rewarded for the small test splits that lack it.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    tp = np.bincount(y_true[y_true == y_pred], minlength=num_classes)[:num_classes]
    true = np.bincount(y_true, minlength=num_classes)[:num_classes]
    pred = np.bincount(y_pred, minlength=num_classes)[:num_classes]
    denom = true + pred  # = 2TP + FP + FN; F1 = 2TP / that, 0 where the class is absent from both
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
    return float(f1.mean())
