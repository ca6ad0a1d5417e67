"""ONNX Runtime vs PyTorch on real images: the exported graph must compute what the checkpoint computes.

PyTorch gets the reference preprocessing (:func:`morphocam.preprocess.normalise`) and the bare
network; ONNX Runtime gets the raw uint8 frames and does the normalisation in-graph. The maximum
absolute difference of the probabilities (and logits) over the images is reported; above the
tolerance the export stops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from morphocam.contract import InputContract
from morphocam.preprocess import normalise

from .errors import ExportError
from .engines import predict, reference_runner


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


def check_parity(net: torch.nn.Module, onnx_file: Path, images: np.ndarray, contract: InputContract,
                 tolerance: float, threads: int = 0) -> dict:
    """Returns the numbers; raises :class:`ExportError` when max |Δprob| > ``tolerance``."""
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
