"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from morphocam.training.metrics import classification_metrics, macro_auc


def test_metrics_match_hand_computed_values():
    y = np.array([0, 0, 0, 1, 1, 2])
    # predictions: 0,0,1 | 1,0 | 2  -> 4 of 6 correct
    probs = np.array([[.8, .1, .1], [.6, .3, .1], [.3, .6, .1], [.2, .7, .1], [.5, .4, .1], [.1, .1, .8]])
    m = classification_metrics(y, probs, ("a", "b", "c"), n_boot=200)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class a: P=2/3 R=2/3 F1=2/3; class b: P=1/2 R=1/2 F1=1/2; class c: P=R=F1=1
    assert m["per_class"]["a"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    lo, hi = m["accuracy_ci95"]
    assert lo < 4 / 6 < hi
    assert m["macro_f1_ci95"][0] <= m["macro_f1"] <= m["macro_f1_ci95"][1]


def test_macro_auc_perfect_and_chance():
    y = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y]
    assert macro_auc(y, perfect) == pytest.approx(1.0)
    # class 0: positives score 0.6 and 0.4, the four negatives 0.5 -> AUC 0.5;
    # classes 1 and 2: both positives (0.4) above every negative (<= 0.3) -> AUC 1
    probs = np.array([[.6, .2, .2], [.5, .4, .1], [.5, .1, .4], [.4, .3, .3], [.5, .4, .1], [.5, .1, .4]])
    assert macro_auc(y, probs) == pytest.approx((0.5 + 1 + 1) / 3)


def test_macro_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    for k in (2, 3, 4):
        y = rng.integers(0, k, 60)
        probs = np.round(rng.dirichlet(np.ones(k), 60), 1)  # rounded: many tied scores
        want = np.mean([roc_auc_score(y == c, probs[:, c]) for c in np.unique(y)])
        assert macro_auc(y, probs) == pytest.approx(want, abs=1e-12)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        classification_metrics(np.array([0, 1]), np.ones((3, 2)) / 2, ("a", "b"))
