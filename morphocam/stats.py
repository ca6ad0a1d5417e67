"""The project's statistics, defined once: the Wilson interval and macro-F1.

Torch-free and light: the client's per-sample report needs the Wilson interval without pulling in
scikit-learn, so scikit-learn is imported only when macro-F1 is asked for.
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
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), average="macro",
                          labels=np.arange(num_classes), zero_division=0))
