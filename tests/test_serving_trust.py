"""The trust outputs through the real Triton server (session server of conftest.py, HuSHem model).

Blank, noise and other-dataset frames must come back ``IN_DOMAIN = false``; the checkpoint's own test
frames mostly ``true``; every prediction set holds the predicted class; a client that asks only for
PROBABILITIES gets exactly what it got before the trust outputs existed (the same tensor).
"""

from __future__ import annotations

import numpy as np
import pytest

from morphocam.contract import model_name_for
from morphocam.preprocess import is_image_path, load_frame

grpcclient = pytest.importorskip("tritonclient.grpc")

from conftest import datasets_root  # noqa: E402
from test_serving import infer, real_frames  # noqa: E402

MODEL = model_name_for("hushem")
TRUST = ("PROBABILITIES", "OOD_SCORE", "IN_DOMAIN", "PREDICTION_SET")


def _ask(client, frames, batch: int = 16):
    parts = []
    for i in range(0, len(frames), batch):  # within the model's max_batch_size
        res = infer(client, frames[i:i + batch], outputs=[grpcclient.InferRequestedOutput(n) for n in TRUST])
        parts.append({n: res.as_numpy(n) for n in TRUST})
    return {n: np.concatenate([p[n] for p in parts]) for n in TRUST}


def test_test_split_frames_are_in_domain_and_sets_hold_the_prediction(client, contract):
    frames, _ = real_frames(contract, 33)
    out = _ask(client, frames)
    assert out["IN_DOMAIN"].shape == (len(frames), 1) and out["IN_DOMAIN"].dtype == np.bool_
    assert out["PREDICTION_SET"].shape == (len(frames), contract.num_classes)
    np.testing.assert_array_equal(out["IN_DOMAIN"][:, 0], out["OOD_SCORE"][:, 0] <= 1.0)
    rate = out["IN_DOMAIN"].mean()
    print(f"in-domain test frames: {rate:.3f} of {len(frames)}")
    assert rate >= 0.85  # threshold at 95% of the validation frames
    top = out["PROBABILITIES"].argmax(1)
    assert out["PREDICTION_SET"][np.arange(len(frames)), top].all()


def test_blank_and_noise_frames_are_out_of_domain(client, contract):
    rng = np.random.default_rng(0)
    shape = (contract.height, contract.width, 3)
    frames = np.stack([np.zeros(shape, np.uint8), np.full(shape, 128, np.uint8), np.full(shape, 255, np.uint8),
                       rng.integers(0, 256, shape).astype(np.uint8),
                       np.clip(rng.normal(128, 40, shape), 0, 255).astype(np.uint8)])
    out = _ask(client, frames)
    print("OOD_SCORE of blank/noise frames:", out["OOD_SCORE"][:, 0].round(2).tolist())
    assert not out["IN_DOMAIN"].any()
    assert (out["OOD_SCORE"] > 1.0).all()


def test_other_dataset_frames_are_mostly_out_of_domain(client, contract):
    root = datasets_root() / "smids"
    if not root.is_dir():
        pytest.skip(f"SMIDS dataset not found at {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_path(p))
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:32]]
    out = _ask(client, np.stack([load_frame(p, contract.height, contract.width) for p in files]))
    rate = 1 - out["IN_DOMAIN"].mean()
    print(f"SMIDS frames flagged by the HuSHem model: {rate:.3f}")
    assert rate >= 0.7  # benchmark: AUROC 0.99, ~80-95% flagged at the 95% threshold


def test_probabilities_only_clients_get_the_same_tensor(client, contract):
    frames, _ = real_frames(contract, 4)
    alone = infer(client, frames, outputs=[grpcclient.InferRequestedOutput("PROBABILITIES")])
    everything = infer(client, frames)
    np.testing.assert_array_equal(alone.as_numpy("PROBABILITIES"), everything.as_numpy("PROBABILITIES"))
    assert alone.as_numpy("OOD_SCORE") is None
