"""The one Wilson interval and the one macro-F1 (morphocam.stats) against textbook values and sklearn."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from morphocam.stats import macro_f1, wilson_interval


def test_wilson_interval_textbook_values():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval):
    # 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605; 0/20 -> 0-0.1611; 1/29 -> 0.0061-0.1718.
    for (k, n), (lo_ref, hi_ref) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                                     (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(lo_ref, abs=1e-4) and hi == pytest.approx(hi_ref, abs=1e-4), (k, n)
    lo, hi = wilson_interval(5, 100)  # 2.15% - 11.18%
    assert lo == pytest.approx(0.02154, abs=1e-4) and hi == pytest.approx(0.11175, abs=1e-4)


def test_wilson_interval_edges():
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_macro_f1_hand_computed_and_equal_to_sklearn():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0, 2])
    # F1 per class: a 2/3, b 1/2, c 1
    assert macro_f1(y, pred, 3) == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        y = rng.integers(0, k, 50)
        pred = rng.integers(0, k, 50)
        assert macro_f1(y, pred, k) == pytest.approx(f1_score(y, pred, average="macro"))


def test_macro_f1_counts_classes_absent_from_the_split():
    # class 2 never occurs and is never predicted: it scores 0 and still counts in the mean
    y = np.array([0, 1, 0, 1])
    assert macro_f1(y, y, 3) == pytest.approx(2 / 3)
    assert macro_f1(y, y, 2) == pytest.approx(1.0)


def test_stats_import_stays_light():
    # the client's report uses the Wilson interval; importing it must not pull in scikit-learn
    code = "import sys, morphocam.stats; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
