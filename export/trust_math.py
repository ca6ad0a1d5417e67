"""The numbers behind "know when not to answer": temperature, conformal sets, out-of-domain score.

Plain numpy (+ scipy / scikit-learn for the fits), so that the unit tests check them on small known
cases and the exported graph (:mod:`morphocam.export.trust_graph`) is checked against them.

- **Temperature scaling** (Guo et al. 2017): one scalar ``T`` minimising the validation NLL of
  ``softmax(logits / T)``; the argmax never changes.
- **Split-conformal prediction sets, RAPS** (Angelopoulos et al. 2021; APS when ``lam = 0``),
  non-randomised (APS' ``U = 0`` form). For a frame with calibrated probabilities ``p``, the mass
  *strictly above* class ``k`` is ``c_k = sum_j p_j [p_j > p_k]`` and its rank is
  ``o_k = 1 + #{j: p_j > p_k}``; its score is ``E_k = c_k + lam * max(0, o_k - k_reg)`` and the set
  is ``{k : E_k <= qhat}`` — "sort descending, cumulative sum, include classes until the (penalised)
  sum passes qhat", written without a sort (a K x K comparison), so it exports to any engine as
  elementwise ops and ties are treated alike. ``qhat`` is the ``ceil((n+1)(1-alpha))/n`` empirical
  quantile of the true classes' ``E_y`` on ``n`` calibration frames: the standard split-conformal
  argument gives coverage >= 1 - alpha for exchangeable frames, for any ``lam``. The top class is
  always in the set (``E = 0``). Including the class's own mass in the score (the other textbook
  form) is valid too but over-covers badly when the set rule cannot randomise (0.995 for a
  nominal 0.90 in the unit test). The rank penalty keeps the sets small when label smoothing +
  MixUp leave probability spread over the classes.
- **Out-of-domain score**: Mahalanobis distance (Lee et al. 2018) on the L2-normalised pooled
  features, class means and one shared covariance fitted on the training split, with Ledoit-Wolf
  shrinkage (1280 dimensions, 150-2000 training images: the plain covariance is singular). The
  score is the distance to the nearest class mean. Measured against energy, max-softmax and
  feature kNN in ``morphocam-bench trust`` (README): raw-feature Mahalanobis misses blank frames
  (their features are small, so close to every mean), normalising fixes that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ------------------------------------------------------------------ calibration


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    p = softmax(logits, temperature)
    return float(-np.log(p[np.arange(len(labels)), labels].clip(1e-12)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T minimising the NLL of softmax(logits / T) (bounded search over log T in [-3, 3])."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        raise ValueError("temperature scaling needs at least one labelled frame")
    res = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=(-3.0, 3.0),
                          method="bounded")
    return float(np.exp(res.x))


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


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict]:
    """Per confidence bin: count, mean confidence, accuracy (the points of a reliability diagram)."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    out = []
    edges = np.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            out.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "confidence": float(conf[m].mean()),
                        "accuracy": float(correct[m].mean())})
    return out


# ------------------------------------------------------------------ conformal (APS)


def mass_above(probs: np.ndarray) -> np.ndarray:
    """c[n, k] = sum_j p[n, j] * [p[n, j] > p[n, k]]: probability mass ranked strictly above class k."""
    p = np.asarray(probs, np.float64)
    return (p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1)


def rank_of(probs: np.ndarray) -> np.ndarray:
    """o[n, k] = 1 + number of classes with a strictly higher probability (1 = top class)."""
    p = np.asarray(probs, np.float64)
    return 1 + (p[:, None, :] > p[:, :, None]).sum(-1)


def set_scores(probs: np.ndarray, lam: float = 0.0, k_reg: int = 1) -> np.ndarray:
    """[N, K] penalised mass above each class; class k is in the set iff this is <= qhat."""
    return mass_above(probs) + lam * np.maximum(0, rank_of(probs) - k_reg)


def raps_scores(probs: np.ndarray, labels: np.ndarray, lam: float = 0.0, k_reg: int = 1) -> np.ndarray:
    """Nonconformity score of each labelled frame: the set score of its true class."""
    return set_scores(probs, lam, k_reg)[np.arange(len(labels)), labels]


def conformal_qhat(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n+1) * coverage) / n empirical quantile; above 1 when n is too small (every class in)."""
    n = len(scores)
    if n == 0:
        raise ValueError("conformal calibration needs at least one labelled frame")
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    rank = math.ceil((n + 1) * coverage)
    if rank > n:
        return float("inf")  # the finite-sample rule demands every class in every set
    return float(np.sort(scores)[rank - 1])


def prediction_sets(probs: np.ndarray, qhat: float, lam: float = 0.0, k_reg: int = 1) -> np.ndarray:
    """Boolean [N, K]: class k is in the set iff its penalised mass above is at most qhat."""
    return set_scores(probs, lam, k_reg) <= qhat


def tune_raps(probs: np.ndarray, labels: np.ndarray, coverage: float, k_reg: int = 1,
              lams=(0.0, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)) -> float:
    """RAPS' lam tuning on a split that is *not* the calibration split: the grid value giving the
    smallest mean set size when qhat is the plain ``coverage`` quantile of the same frames (ties: the
    smallest lam). The plain quantile, not the finite-sample one: on 16 HuSHem frames the latter is
    the maximum, and one hard frame then decides.

    ``k_reg`` stays 1 (penalise every class after the top one): RAPS' rule for it (the coverage
    quantile of the true class's rank) is meant for 1000 classes; with 3-4 classes and 16
    tuning frames one hard frame moved it to 3, which switches the penalty off."""
    best = None
    for lam in lams:
        q = float(np.quantile(raps_scores(probs, labels, lam, k_reg), coverage))
        size = float(prediction_sets(probs, q, lam, k_reg).sum(1).mean())
        if best is None or size < best[0] - 1e-12:
            best = (size, lam)
    return float(best[1])


# ------------------------------------------------------------------ out-of-domain score


def l2_normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, np.float64)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


@dataclass
class Mahalanobis:
    """Class means and the Cholesky factor L of the shared precision (P = L L^T), normalised-feature space."""

    means: np.ndarray  # [K, D]
    whitener: np.ndarray  # [D, D], lower-triangular; (x - mu)^T P (x - mu) = ||(x - mu) @ L||^2
    shrinkage: float

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, num_classes: int) -> "Mahalanobis":
        from sklearn.covariance import LedoitWolf

        x = l2_normalise(features)
        missing = [k for k in range(num_classes) if not np.any(labels == k)]
        if missing:
            raise ValueError(f"no training frames of class(es) {missing}: cannot fit their feature means")
        means = np.stack([x[labels == k].mean(0) for k in range(num_classes)])
        lw = LedoitWolf(assume_centered=True).fit(x - means[labels])
        whitener = np.linalg.cholesky(lw.precision_)
        return cls(means, whitener, float(lw.shrinkage_))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Distance of each frame to its nearest class mean (not squared)."""
        g = l2_normalise(features) @ self.whitener
        m = self.means @ self.whitener
        d2 = ((g[:, None, :] - m[None, :, :]) ** 2).sum(-1)
        return np.sqrt(d2.min(1))


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-T logsumexp(logits / T) (Liu et al. 2020): higher = less like the training data."""
    from scipy.special import logsumexp

    return -temperature * logsumexp(np.asarray(logits, np.float64) / temperature, axis=1)


def knn_distance(features: np.ndarray, train_features: np.ndarray, k: int = 1) -> np.ndarray:
    """Cosine distance to the k-th nearest training frame (Sun et al. 2022) on normalised features."""
    d = 1.0 - l2_normalise(features) @ l2_normalise(train_features).T
    return np.sort(d, axis=1)[:, k - 1]


def acceptance_threshold(scores: np.ndarray, acceptance: float) -> float:
    """The score below which ``acceptance`` of the given in-domain frames fall (linear interpolation)."""
    if len(scores) == 0:
        raise ValueError("the OOD threshold needs at least one in-domain frame")
    if not 0 < acceptance <= 1:
        raise ValueError(f"acceptance must be in (0, 1], got {acceptance}")
    return float(np.quantile(np.asarray(scores, np.float64), acceptance))


def auroc_fpr95(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[float, float]:
    """AUROC of telling out-of-domain (positive) from in-domain frames by score, and the share of
    in-domain frames flagged when 95% of the out-of-domain ones are (FPR at 95% TPR)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    s = np.r_[in_scores, out_scores]
    fpr, tpr, _ = roc_curve(y, s)
    return float(roc_auc_score(y, s)), float(fpr[np.searchsorted(tpr, 0.95, side="left")])
