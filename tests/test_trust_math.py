"""Calibration, conformal and out-of-domain maths on small known cases (export/trust_math.py, trust_fit.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from morphocam.export import trust_math as TM


def test_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 4))
    true_t = 2.5  # labels drawn from softmax(logits / 2.5): the logits are over-confident by 2.5x
    p = TM.softmax(logits, true_t)
    labels = np.array([rng.choice(4, p=row) for row in p])
    t = TM.fit_temperature(logits, labels)
    assert abs(t - true_t) < 0.2
    assert TM.nll(logits, labels, t) < TM.nll(logits, labels, 1.0)
    # argmax never changes
    assert np.array_equal(TM.softmax(logits, t).argmax(1), logits.argmax(1))


def test_mass_above_rank_and_sets_by_hand():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    np.testing.assert_allclose(TM.mass_above(p), [[0.0, 0.5, 0.8], [0.9, 0.0, 0.6]])
    np.testing.assert_array_equal(TM.rank_of(p), [[1, 2, 3], [3, 1, 2]])
    # APS (lam 0): include classes while the mass ranked above them is at most qhat
    np.testing.assert_array_equal(TM.prediction_sets(p, 0.75), [[True, True, False], [False, True, True]])
    np.testing.assert_array_equal(TM.prediction_sets(p, 0.4), [[True, False, False], [False, True, False]])
    # the top class is always in, even at qhat 0
    assert TM.prediction_sets(p, 0.0).sum(1).tolist() == [1, 1]
    # RAPS penalty lam * (rank - 1): the rank-2 class costs 0.5 + 0.3 = 0.8 > 0.75, so it leaves the set
    np.testing.assert_array_equal(TM.prediction_sets(p, 0.75, lam=0.3), [[True, False, False], [False, True, False]])
    # scores: the set score of the true class (mass above it + penalty)
    np.testing.assert_allclose(TM.raps_scores(p, np.array([1, 0])), [0.5, 0.9])
    np.testing.assert_allclose(TM.raps_scores(p, np.array([1, 0]), lam=0.1), [0.6, 1.1])


def test_conformal_qhat_is_the_finite_sample_quantile():
    scores = np.arange(1, 20) / 20.0  # 19 scores 0.05 .. 0.95
    # ceil((19 + 1) * 0.9) = 18 -> the 18th smallest
    assert TM.conformal_qhat(scores, 0.9) == pytest.approx(0.90)
    # too few frames for the level: every class in every set
    assert math.isinf(TM.conformal_qhat(scores[:5], 0.9))
    with pytest.raises(ValueError):
        TM.conformal_qhat(np.array([]), 0.9)


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_conformal_coverage_holds_on_exchangeable_data(lam):
    """Calibrate on one half of a synthetic task, measure on the other: coverage >= nominal - noise."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, size=(6000, 4))
    p = TM.softmax(logits)
    labels = np.array([rng.choice(4, p=row) for row in p])
    cal, test = slice(0, 3000), slice(3000, None)
    q = TM.conformal_qhat(TM.raps_scores(p[cal], labels[cal], lam), 0.9)
    sets = TM.prediction_sets(p[test], q, lam)
    coverage = sets[np.arange(3000), labels[test]].mean()
    assert 0.88 <= coverage <= 0.92
    assert 1.0 < sets.sum(1).mean() < 4.0


def test_mahalanobis_matches_scikit_learn_and_flags_far_points():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(2)
    d = 8
    means = rng.normal(0, 1, size=(2, d))
    x = np.concatenate([means[0] + 0.1 * rng.normal(size=(200, d)), means[1] + 0.1 * rng.normal(size=(200, d))])
    y = np.repeat([0, 1], 200)
    m = TM.Mahalanobis.fit(x, y, 2)
    xn = TM.l2_normalise(x)
    mu = np.stack([xn[y == k].mean(0) for k in range(2)])
    lw = LedoitWolf(assume_centered=True).fit(xn - mu[y])
    probe = TM.l2_normalise(rng.normal(size=(5, d)))
    want = np.sqrt(np.min([lw.mahalanobis(probe - mu[k]) for k in range(2)], axis=0))
    np.testing.assert_allclose(m.distance(probe), want, rtol=1e-6)
    # training points are close; random directions are far
    assert np.median(m.distance(x)) < np.median(m.distance(probe))
    with pytest.raises(ValueError, match="class"):
        TM.Mahalanobis.fit(x, np.zeros(400, int), 2)


def test_threshold_and_auroc():
    inside = np.arange(100, dtype=float)
    assert TM.acceptance_threshold(inside, 0.95) == pytest.approx(94.05)
    auroc, fpr = TM.auroc_fpr95(inside, inside + 1000)
    assert auroc == 1.0 and fpr == 0.0
    auroc, _ = TM.auroc_fpr95(inside, inside)
    assert auroc == pytest.approx(0.5)


def test_energy_and_knn_by_hand():
    assert TM.energy_score(np.array([[0.0, 0.0]]))[0] == pytest.approx(-math.log(2))
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(TM.knn_distance(np.array([[2.0, 0.0], [1.0, 1.0]]), train, k=1),
                               [0.0, 1 - 1 / math.sqrt(2)])


def test_fit_from_features_uses_disjoint_data_and_records_it():
    """Temperature from val_a, qhat from val_b, OOD statistics from train; the card says so."""
    from morphocam.export.trust_fit import SplitFeatures, fit_from_features

    rng = np.random.default_rng(3)
    k, d = 3, 16
    centres = rng.normal(0, 1, size=(k, d))
    w = centres * 3

    def part(n):
        y = rng.integers(0, k, n)
        f = centres[y] + 0.3 * rng.normal(size=(n, d))
        return SplitFeatures(f, f @ w.T, y)

    parts = {"train": part(300), "val_a": part(200), "val_b": part(200), "test": part(300)}
    parts["val_a"].labels[:10] = (parts["val_a"].labels[:10] + 1) % k  # some errors: T has an NLL minimum
    params = fit_from_features(parts, k, coverage=0.9, acceptance=0.95)
    assert params.temperature == pytest.approx(TM.fit_temperature(parts["val_a"].logits, parts["val_a"].labels))
    assert params.card["temperature"]["fitted_on"].startswith("validation half A (200")
    scores = TM.raps_scores(TM.softmax(parts["val_b"].logits, params.temperature), parts["val_b"].labels,
                            params.lam, params.k_reg)
    assert params.qhat == pytest.approx(TM.conformal_qhat(scores, 0.9))
    test = params.card["test"]
    assert test["conformal_coverage"] >= 0.85
    assert 0.85 <= test["in_domain_rate"] <= 1.0
    far = params.reference(rng.normal(0, 1, size=(20, d)) * 5, np.zeros((20, k)))
    assert not far["IN_DOMAIN"].any()
    assert "training split (300" in params.card["ood"]["fitted_on"]
    assert "half B (200" in params.card["conformal"]["fitted_on"]


def test_stage_distance_flags_what_the_final_features_miss_and_keeps_the_acceptance():
    """With a backbone stage, OOD_SCORE is the larger of two distances each scaled by its validation quantile:
    frames whose final features look in-domain but whose stage features do not (an acquisition shift) are
    flagged, and the combined threshold still accepts the asked share of validation frames."""
    from morphocam.export.trust_fit import SplitFeatures, fit_from_features

    rng = np.random.default_rng(5)
    k, d, ds = 3, 16, 8
    centres, stage_centres = rng.normal(0, 1, size=(k, d)), rng.normal(0, 1, size=(k, ds))

    def part(n, stage_shift=0.0):
        y = rng.integers(0, k, n)
        f = centres[y] + 0.3 * rng.normal(size=(n, d))
        st = stage_centres[y] + 0.3 * rng.normal(size=(n, ds)) + stage_shift
        return SplitFeatures(f, f @ (3 * centres).T, y, stage=st)

    parts = {"train": part(300), "val_a": part(200), "val_b": part(200)}
    shifted = part(100, stage_shift=rng.normal(0, 3, size=ds))
    final_only = fit_from_features(parts, k, acceptance=0.95)
    both = fit_from_features(parts, k, acceptance=0.95, stage=2)
    val_f = np.concatenate([parts["val_a"].features, parts["val_b"].features])
    val_s = np.concatenate([parts["val_a"].stage, parts["val_b"].stage])
    accepted = np.mean(both.ood_combined(val_f, val_s) / both.ood_threshold <= 1.0)
    assert accepted == pytest.approx(0.95, abs=0.01)
    assert np.mean(final_only.reference(shifted.features, shifted.logits)["IN_DOMAIN"]) > 0.8
    assert not both.reference(shifted.features, shifted.logits, shifted.stage)["IN_DOMAIN"].any()
    assert both.card["ood"]["stage"] == 2 and "stage 2" in both.card["ood"]["description"]
    with pytest.raises(ValueError, match="stage 2"):
        both.reference(shifted.features, shifted.logits)


def test_temperature_is_not_fitted_on_a_half_without_errors():
    """A validation half with no misclassified frame has no NLL minimum (T would run to the search bound and make
    every answer certain): T then comes from the whole validation split, or stays 1 when that has no error either."""
    from morphocam.export.trust_fit import SplitFeatures, fit_from_features

    rng = np.random.default_rng(4)
    k, d = 3, 8
    centres = rng.normal(0, 1, size=(k, d))

    def part(n, wrong=0):
        y = rng.integers(0, k, n)
        f = centres[y] + 0.1 * rng.normal(size=(n, d))
        y[:wrong] = (y[:wrong] + 1) % k
        return SplitFeatures(f, f @ (3 * centres).T, y)

    parts = {"train": part(200), "val_a": part(40), "val_b": part(40, wrong=3), "test": part(50)}
    assert (parts["val_a"].logits.argmax(1) == parts["val_a"].labels).all()  # half A: no error
    params = fit_from_features(parts, k)
    both = [np.concatenate([parts["val_a"].logits, parts["val_b"].logits]),
            np.concatenate([parts["val_a"].labels, parts["val_b"].labels])]
    assert params.temperature == pytest.approx(TM.fit_temperature(*both)) and params.temperature > 2 * math.exp(-3)
    assert params.card["temperature"]["fitted_on"].startswith("whole validation split (80")
    parts["val_b"] = part(40)
    params = fit_from_features(parts, k)
    assert params.temperature == 1.0 and params.card["temperature"]["fitted_on"].startswith("not fitted")
