"""ONNX Runtime vs PyTorch on real images: the exported graph must compute what the checkpoint computes.

PyTorch gets the reference preprocessing (:func:`morphocam.preprocess.normalise`) and the bare
network; ONNX Runtime gets the raw uint8 frames and does the normalisation in-graph. The maximum
absolute difference of the probabilities (and logits) over the images is reported; above the
tolerance the export stops.

With trust outputs the reference is the float64 numpy maths of :mod:`morphocam.export.trust_math`
on the PyTorch features and logits (so the graph is checked against the spec, not against its own
wrapper), on the real images plus a blank and a noise frame (so ``IN_DOMAIN = false`` is exercised).
``OOD_SCORE`` must agree within ``tolerance`` relative; a boolean may differ only where the
reference sits within ``BOOL_MARGIN`` of its threshold (float32 rounding), and such frames are counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from morphocam.contract import (OUTPUT_IN_DOMAIN, OUTPUT_LOGITS, OUTPUT_OOD_SCORE, OUTPUT_PREDICTION_SET,
                                OUTPUT_PROBABILITIES, InputContract)
from morphocam.preprocess import normalise

from .errors import ExportError
from .engines import all_outputs_runner, predict, reference_runner, run_named

BOOL_MARGIN = 1e-4


def torch_predict(net: torch.nn.Module, images: np.ndarray, contract: InputContract,
                  batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    logits = []
    net.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(normalise(images[i:i + batch], contract.mean, contract.std))
            logits.append(net(x).float().numpy())
    lo = np.concatenate(logits)
    return lo, torch.softmax(torch.from_numpy(lo), dim=-1).numpy()


def synthetic_frames(contract: InputContract) -> np.ndarray:
    """A blank (mid-grey) frame and a uniform-noise frame at the model's size: clearly not cells."""
    rng = np.random.default_rng(0)
    shape = (contract.height, contract.width, 3)
    return np.stack([np.full(shape, 128, np.uint8), rng.integers(0, 256, shape).astype(np.uint8)])


def check_parity(net: torch.nn.Module, onnx_file: Path, images: np.ndarray, contract: InputContract,
                 tolerance: float, threads: int = 0, trust=None) -> dict:
    """Returns the numbers; raises :class:`ExportError` when max |Δprob| > ``tolerance`` (or, with
    ``trust``, when a trust output disagrees with the numpy reference)."""
    if trust is not None:
        return _check_trust_parity(net, onnx_file, images, contract, tolerance, threads, trust)
    t_logits, t_probs = torch_predict(net, images, contract)
    o_logits, o_probs = predict(reference_runner(onnx_file, threads), images, batch=len(images))
    # batch-size independence: the same frames one at a time
    s_logits, _ = predict(reference_runner(onnx_file, threads), images[:4], batch=1)
    result = {
        "images": int(len(images)),
        "max_abs_prob_diff": float(np.max(np.abs(t_probs - o_probs))),
        "max_abs_logit_diff": float(np.max(np.abs(t_logits - o_logits))),
        "max_abs_logit_diff_batch1_vs_batched": float(np.max(np.abs(s_logits - o_logits[:4]))),
        "argmax_agreement": float(np.mean(t_probs.argmax(1) == o_probs.argmax(1))),
        "tolerance": tolerance,
    }
    if not result["max_abs_prob_diff"] <= tolerance:
        raise ExportError(f"parity check failed: max |Δprob| ONNX Runtime vs PyTorch = "
                          f"{result['max_abs_prob_diff']:.3g} > tolerance {tolerance:g} on {len(images)} real images")
    return result


def _check_trust_parity(net, onnx_file: Path, images: np.ndarray, contract: InputContract, tolerance: float,
                        threads: int, trust) -> dict:
    from .trust_fit import pooled_features

    frames = np.concatenate([images, synthetic_frames(contract)])
    feats, t_logits, staged = pooled_features(net, frames, contract, stage=trust.ood_stage)
    # the bare network must give the same logits as the split forward used for the features
    split_vs_bare = float(np.max(np.abs(torch_predict(net, frames[:4], contract)[0] - t_logits[:4])))
    ref = trust.reference(feats, t_logits, staged)
    runner = all_outputs_runner(onnx_file, threads)
    got = run_named(runner, frames)
    single = run_named(runner, frames[:1])
    ood_rel = np.abs(got[OUTPUT_OOD_SCORE] - ref[OUTPUT_OOD_SCORE]) / np.maximum(1.0, np.abs(ref[OUTPUT_OOD_SCORE]))
    near_ood = np.abs(ref[OUTPUT_OOD_SCORE] - 1.0) < BOOL_MARGIN
    near_set = np.abs(ref["SET_SCORES"] - trust.qhat) < BOOL_MARGIN
    bad_in = (got[OUTPUT_IN_DOMAIN] != ref[OUTPUT_IN_DOMAIN]) & ~near_ood
    bad_set = (got[OUTPUT_PREDICTION_SET] != ref[OUTPUT_PREDICTION_SET]) & ~near_set
    result = {
        "images": int(len(images)), "synthetic_frames": 2,
        "max_abs_prob_diff": float(np.max(np.abs(got[OUTPUT_PROBABILITIES] - ref[OUTPUT_PROBABILITIES]))),
        "max_abs_logit_diff": float(np.max(np.abs(got[OUTPUT_LOGITS] - t_logits))),
        "max_abs_logit_diff_split_vs_bare_forward": split_vs_bare,
        "max_abs_logit_diff_batch1_vs_batched": float(np.max(np.abs(single[OUTPUT_LOGITS] - got[OUTPUT_LOGITS][:1]))),
        "max_rel_ood_score_diff": float(np.max(ood_rel)),
        "in_domain_mismatches": int(np.sum(got[OUTPUT_IN_DOMAIN] != ref[OUTPUT_IN_DOMAIN])),
        "prediction_set_mismatches": int(np.sum(got[OUTPUT_PREDICTION_SET] != ref[OUTPUT_PREDICTION_SET])),
        "synthetic_in_domain": [bool(v) for v in got[OUTPUT_IN_DOMAIN][-2:, 0]],
        "argmax_agreement": float(np.mean(got[OUTPUT_PROBABILITIES].argmax(1) == ref[OUTPUT_PROBABILITIES].argmax(1))),
        "tolerance": tolerance, "bool_margin": BOOL_MARGIN,
        "reference": "float64 numpy (morphocam.export.trust_math) on PyTorch features/logits",
    }
    problems = []
    if not result["max_abs_prob_diff"] <= tolerance:
        problems.append(f"max |Δprob| {result['max_abs_prob_diff']:.3g}")
    if not result["max_abs_logit_diff_split_vs_bare_forward"] <= tolerance:
        problems.append(f"split forward differs from the network's own forward by {split_vs_bare:.3g}")
    if not result["max_rel_ood_score_diff"] <= tolerance:
        problems.append(f"OOD_SCORE relative difference {result['max_rel_ood_score_diff']:.3g}")
    if bad_in.any():
        problems.append(f"IN_DOMAIN differs on {int(bad_in.sum())} frame(s) away from the threshold")
    if bad_set.any():
        problems.append(f"PREDICTION_SET differs in {int(bad_set.sum())} place(s) away from qhat")
    if problems:
        raise ExportError(f"parity check failed (ONNX Runtime vs reference, tolerance {tolerance:g}, "
                          f"{len(frames)} frames): " + "; ".join(problems))
    return result
