"""Fit the trust outputs of one checkpoint from its own recorded split (a step of ``morphocam-export``).

Re-derives the checkpoint's train / validation / test split from its recipe
(:func:`morphocam.training.trainer.checkpoint_split`), computes the pooled features and logits of
every image once with PyTorch, and fits (maths in :mod:`morphocam.export.trust_math`):

============================  =====================================================================
what                          data
============================  =====================================================================
class means + covariance      the **training** split (what the model learned from), for the final
                              pooled features and for one backbone stage's (``ood_stage``)
temperature T, RAPS lam/k_reg validation half A (NLL; RAPS' own tuning rule); T from the whole
                              validation split where half A has no error (see below)
OOD scales and threshold      the **whole validation split**, at ``acceptance`` (default 95 %) of it
conformal qhat (RAPS)         validation half B, on the T-calibrated probabilities
measurements                  the **test** split only (ECE before/after, coverage, set size, in-domain rate)
============================  =====================================================================

Why this way: the validation split already chose the checkpoint (best epoch by macro-F1) — a
weak, unavoidable selection shared by everything fitted on it. The conformal guarantee needs
calibration frames that nothing fitted *on the probabilities it scores* has seen: ``T`` changes
those probabilities and RAPS' penalty shapes the scores, so ``T``, ``lam``, ``k_reg`` and ``qhat`` get disjoint halves (stratified, seeded, duplicate groups
kept together). The OOD threshold does not touch probabilities or sets, so it uses all of the
validation split (a threshold from 16 HuSHem frames would be mostly noise). The training split is
not used for thresholds or ``qhat``: the model is over-confident and too close to its own training
frames there. Every size, seed and fitted number is returned for the model card.

A half with no misclassified frame has no NLL minimum: the NLL keeps falling as T -> 0, the search stops
at its bound (T = 0.05) and every answer becomes certain, the wrong ones included (HuSHem, 16 frames of
half A all right: test NLL 0.41 at T = 0.05 against 0.10 at the whole validation split's T = 0.26). Then
T is fitted on the whole validation split, which costs half B's strict independence from T (one scalar;
the card says so); if that too has no error, T stays 1 (no rescaling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphocam.contract import (OUTPUT_IN_DOMAIN, OUTPUT_OOD_SCORE, OUTPUT_PREDICTION_SET, OUTPUT_PROBABILITIES,
                                InputContract)
from morphocam.preprocess import normalise

from . import trust_math as TM
from .errors import ExportError

OOD_METHOD = "mahalanobis_l2"
QHAT_ALL = 1e6


@dataclass
class TrustParams:
    """What the exported graph needs (:class:`morphocam.export.onnx_export.DeployableModel`)."""

    temperature: float
    ood: TM.Mahalanobis
    ood_threshold: float  # combined score at the acceptance rate; OOD_SCORE = combined score / threshold
    qhat: float
    coverage: float
    acceptance: float
    lam: float = 0.0
    k_reg: int = 1
    card: dict = field(default_factory=dict)
    # the second score, on one backbone stage's pooled features (export/stage_features.py); None = final only
    ood_stage: int | None = None
    ood_stage_fit: TM.Mahalanobis | None = None
    # each distance is divided by its own validation quantile before the max, so neither scale dominates
    ood_scale: float = 1.0
    ood_stage_scale: float = 1.0

    def ood_combined(self, features: np.ndarray, stage: np.ndarray | None = None) -> np.ndarray:
        """max(final distance / its scale, stage distance / its scale), before the threshold."""
        score = self.ood.distance(features) / self.ood_scale
        if self.ood_stage_fit is not None:
            if stage is None:
                raise ValueError(f"this fit scores stage {self.ood_stage} as well: its pooled features are needed")
            score = np.maximum(score, self.ood_stage_fit.distance(stage) / self.ood_stage_scale)
        return score

    def reference(self, features: np.ndarray, logits: np.ndarray, stage: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The served outputs computed in float64 numpy: what the graph must reproduce."""
        probs = TM.softmax(logits, self.temperature)
        score = self.ood_combined(features, stage) / self.ood_threshold
        return {OUTPUT_PROBABILITIES: probs, OUTPUT_OOD_SCORE: score[:, None], OUTPUT_IN_DOMAIN: score[:, None] <= 1.0,
                OUTPUT_PREDICTION_SET: TM.prediction_sets(probs, self.qhat, self.lam, self.k_reg),
                "SET_SCORES": TM.set_scores(probs, self.lam, self.k_reg)}


def pooled_features(net, images: np.ndarray, contract: InputContract, batch: int = 64,
                    stage: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(pooled features [N, D], logits [N, K], pooled features of backbone ``stage`` [N, D_s] or None) of
    uint8 NHWC frames, the graph's own path in PyTorch."""
    import torch

    from .stage_features import forward_with_stage

    feats, logits, staged = [], [], []
    net.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(normalise(images[i:i + batch], contract.mean, contract.std))
            x = x.contiguous(memory_format=torch.channels_last)
            if stage is None:
                f = torch.flatten(net.pool(net.forward_features(x)), 1)
            else:
                f, tapped = forward_with_stage(net, x, stage)
                staged.append(tapped.float().numpy())
            feats.append(f.float().numpy())
            logits.append(net.head(f).float().numpy())
    if not feats:
        return (np.zeros((0, net.head.in_features), np.float32), np.zeros((0, net.head.out_features), np.float32),
                None)
    return np.concatenate(feats), np.concatenate(logits), (np.concatenate(staged) if staged else None)


def halve(indices: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into two halves, stratified by label where every class allows it, keeping
    duplicate groups (pixel-identical images) on one side."""
    from sklearn.model_selection import train_test_split

    gids, first = np.unique(groups[indices], return_index=True)
    glabels = labels[indices][first]
    counts = np.bincount(glabels)
    strat = glabels if counts[counts > 0].min() >= 2 else None
    a, b = train_test_split(gids, test_size=0.5, stratify=strat, random_state=seed)
    return indices[np.isin(groups[indices], a)], indices[np.isin(groups[indices], b)]


@dataclass
class SplitFeatures:
    """Features, logits and labels of one part of the checkpoint's split."""

    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    images: np.ndarray | None = None  # kept for the test split only (the benchmark corrupts them)
    stage: np.ndarray | None = None  # pooled features of the tapped backbone stage, when one is tapped


def split_features(net, meta: dict, root: Path, contract: InputContract, seed_offset: int = 0,
                   log=print, stage: int | None = None) -> tuple[dict[str, SplitFeatures], dict]:
    """Features of train / val_a / val_b / test (val halved as the module docstring says) + a description."""
    from morphocam.training.data import group_ids
    from morphocam.training.trainer import checkpoint_split

    if not meta.get("recipe"):
        raise ExportError("the checkpoint records no training recipe, so its split cannot be re-derived and the "
                          "calibration / OOD / conformal outputs cannot be fitted (export with --trust false)")
    meta = {**meta, "recipe": {**meta["recipe"], "input_size": contract.height}}
    cfg, folder, split = checkpoint_split(meta, root)
    groups = group_ids(folder.samples)
    labels = folder.labels
    val_a, val_b = halve(np.asarray(split.val), labels, groups, cfg.seed + seed_offset)
    parts = {"train": split.train, "val_a": val_a, "val_b": val_b, "test": split.test}
    out = {}
    for name, idx in parts.items():
        idx = np.sort(np.asarray(idx))
        log(f"  trust: features of {name} ({len(idx)} images)")
        f, lo, st = pooled_features(net, folder.images[idx], contract, stage=stage)
        out[name] = SplitFeatures(f, lo, labels[idx], folder.images[idx] if name == "test" else None, st)
    desc = {"source": "checkpoint_split() of the checkpoint's recipe (seed, fractions, fold)",
            "root": str(root), "seed": int(cfg.seed), "fold": cfg.fold,
            "fingerprint_matches": folder.fingerprint() == meta.get("data_fingerprint"),
            "sizes": {k: int(len(v)) for k, v in parts.items()},
            "validation_halves": f"stratified by class, duplicate groups kept together, seed {cfg.seed + seed_offset}"}
    return out, desc


def _temperature(va: SplitFeatures, vb: SplitFeatures) -> tuple[float, np.ndarray, np.ndarray, str]:
    """T, the logits and labels it was fitted on, and where from (module docstring: a half without errors)."""
    if (va.logits.argmax(1) != va.labels).any():
        return TM.fit_temperature(va.logits, va.labels), va.logits, va.labels, \
            f"validation half A ({len(va.labels)} images), NLL"
    lo, y = np.concatenate([va.logits, vb.logits]), np.concatenate([va.labels, vb.labels])
    if (lo.argmax(1) != y).any():
        return TM.fit_temperature(lo, y), lo, y, \
            (f"whole validation split ({len(y)} images), NLL: half A ({len(va.labels)} images) has no misclassified "
             "frame, so its NLL has no minimum; half B, which calibrates the conformal sets, shares this one scalar")
    return 1.0, lo, y, (f"not fitted (T = 1): none of the {len(y)} validation images is misclassified, so the NLL "
                        "has no minimum")


def fit_from_features(parts: dict[str, SplitFeatures], num_classes: int, coverage: float = 0.9,
                      acceptance: float = 0.95, stage: int | None = None) -> TrustParams:
    """The fits of the module docstring on precomputed features (unit-testable without a network).

    With a ``stage`` (its features in every part), the OOD score is the larger of two distances, the final
    features' and the stage's, each divided by its own validation quantile at ``acceptance``; the threshold
    is then that combined score's quantile at ``acceptance``, so the share of validation frames accepted
    stays the one asked for."""
    tr, va, vb = parts["train"], parts["val_a"], parts["val_b"]
    temperature, t_logits, t_labels, t_source = _temperature(va, vb)
    ood = TM.Mahalanobis.fit(tr.features, tr.labels, num_classes)
    val_dist = ood.distance(np.concatenate([va.features, vb.features]))
    scale, stage_fit, stage_scale = 1.0, None, 1.0
    if stage is not None:
        stage_fit = TM.Mahalanobis.fit(tr.stage, tr.labels, num_classes)
        scale = TM.acceptance_threshold(val_dist, acceptance)
        stage_scale = TM.acceptance_threshold(stage_fit.distance(np.concatenate([va.stage, vb.stage])), acceptance)
        val_dist = np.maximum(val_dist / scale,
                              stage_fit.distance(np.concatenate([va.stage, vb.stage])) / stage_scale)
    threshold = TM.acceptance_threshold(val_dist, acceptance)
    k_reg = 1
    lam = TM.tune_raps(TM.softmax(va.logits, temperature), va.labels, coverage, k_reg)
    qhat = TM.conformal_qhat(TM.raps_scores(TM.softmax(vb.logits, temperature), vb.labels, lam, k_reg), coverage)
    # too few calibration frames for the level: every class in every set (a finite stand-in for inf)
    qhat = min(qhat, QHAT_ALL)
    card = {
        "temperature": {"value": temperature, "fitted_on": t_source,
                        "nll_before": TM.nll(t_logits, t_labels), "nll_after": TM.nll(t_logits, t_labels, temperature)},
        "ood": {"method": OOD_METHOD if stage is None else f"{OOD_METHOD} + stage {stage}",
                "description": ("distance to the nearest class mean, Mahalanobis with one shared Ledoit-Wolf covariance, "
                                "on L2-normalised pooled features; OOD_SCORE = distance / threshold, IN_DOMAIN = OOD_SCORE <= 1"
                                if stage is None else
                                "distance to the nearest class mean, Mahalanobis with one shared Ledoit-Wolf covariance, "
                                f"on L2-normalised pooled features, computed twice: on the final features and on backbone "
                                f"stage {stage}'s globally pooled activations; each divided by its own validation quantile "
                                "at the acceptance rate, the larger taken; OOD_SCORE = that / threshold, "
                                "IN_DOMAIN = OOD_SCORE <= 1"),
                "fitted_on": f"training split ({len(tr.labels)} images)", "shrinkage": ood.shrinkage,
                "threshold": threshold, "acceptance": acceptance,
                "threshold_fitted_on": f"whole validation split ({len(val_dist)} images) at {acceptance:.0%} acceptance",
                "stage": stage,
                **({"final_scale": scale, "stage_scale": stage_scale, "stage_shrinkage": stage_fit.shrinkage,
                    "stage_dim": int(tr.stage.shape[1])} if stage is not None else {})},
        "conformal": {"method": "split-conformal RAPS, non-randomised: class k is in the set iff the calibrated "
                                "probability mass ranked strictly above it + lam * max(0, rank_k - k_reg) <= qhat; "
                                "the top class always",
                      "coverage": coverage, "qhat": qhat, "lam": lam, "k_reg": k_reg,
                      "lam_tuned_on": f"validation half A ({len(va.labels)} images): smallest mean set size over a grid "
                                      "(k_reg fixed at 1)",
                      "fitted_on": f"validation half B ({len(vb.labels)} images), probabilities after temperature"},
    }
    params = TrustParams(temperature, ood, threshold, qhat, coverage, acceptance, lam, k_reg, card,
                         stage, stage_fit, scale, stage_scale)
    if "test" in parts and len(parts["test"].labels):
        card["test"] = measure(params, parts["test"])
    return params


def measure(params: TrustParams, part: SplitFeatures) -> dict:
    """Test-split figures recorded in the model card: ECE, coverage, set size, in-domain rate."""
    ref = params.reference(part.features, part.logits, part.stage)
    y = part.labels
    sets = ref[OUTPUT_PREDICTION_SET]
    before = TM.softmax(part.logits)
    return {"images": int(len(y)),
            "accuracy": float(np.mean(before.argmax(1) == y)),
            "ece_before": TM.expected_calibration_error(before, y),
            "ece_after": TM.expected_calibration_error(ref[OUTPUT_PROBABILITIES], y),
            "nll_before": TM.nll(part.logits, y), "nll_after": TM.nll(part.logits, y, params.temperature),
            "conformal_coverage": float(np.mean(sets[np.arange(len(y)), y])),
            "mean_set_size": float(sets.sum(1).mean()),
            "singleton_share": float(np.mean(sets.sum(1) == 1)),
            "in_domain_rate": float(np.mean(ref[OUTPUT_IN_DOMAIN]))}


def fit_trust(net, meta: dict, root: Path, contract: InputContract, coverage: float = 0.9,
              acceptance: float = 0.95, log=print, ood_stage: int | None = None
              ) -> tuple[TrustParams, dict[str, SplitFeatures]]:
    """Checkpoint + its recorded split -> :class:`TrustParams` (with the model-card section). ``ood_stage``
    (None or negative: final features only) is dropped for backbones without addressable stages."""
    from .stage_features import resolve_stage

    stage = resolve_stage(net, ood_stage)
    parts, desc = split_features(net, meta, root, contract, log=log, stage=stage)
    params = fit_from_features(parts, contract.num_classes, coverage, acceptance, stage)
    params.card["data"] = desc
    return params, parts
