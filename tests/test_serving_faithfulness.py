"""Grad-CAM++ heatmaps are meaningful on real HuSHem test images (serving issue, faithfulness).

Uses the released HuSHem checkpoint when present, else the development one; the frames are the
checkpoint's own test split. Centre vs border: HuSHem crops are centred on the sperm head.
Deletion: removing the top-20% attributed pixels must lower the target probability more than
removing a random 20% (random blobs at the CAM's granularity, mean of 3 draws).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import datasets_root, missing_data, serving_checkpoint_path


@pytest.fixture(scope="module")
def report():
    import torch

    from morphocam.preprocess import load_frame
    from morphocam.serving.explain import Explainer
    from morphocam.serving.faithfulness import evaluate

    checkpoint = serving_checkpoint_path()
    npz = checkpoint.parent / "test_predictions.npz"
    root = datasets_root() / "hushem"
    for path in (checkpoint, npz, root):
        if not path.exists():
            missing_data(f"{path} not found (needs the released HuSHem checkpoint, its test_predictions.npz "
                         "and the dataset)")
    torch.set_num_threads(1)
    explainer = Explainer.from_checkpoint(checkpoint)
    c = explainer.contract
    frames = np.stack([load_frame(root / str(p), c.height, c.width) for p in np.load(npz)["paths"]][:33])
    rep = evaluate(explainer, frames, frac=0.2, repeats=3, mode="blocks", seed=0)
    print(f"\n{checkpoint}: {rep.to_dict()}")
    return rep


def test_heatmap_mass_on_centre_not_border(report):
    assert report.centre_border_ratio > 1.0
    assert report.centre_mass_fraction > 0.25  # a uniform map puts 0.25 in the central box
    assert report.frames_centre_gt_border >= 0.5


def test_deleting_top_pixels_hurts_more_than_random(report):
    assert report.drop_top > report.drop_random
