"""Are the Grad-CAM++ heatmaps meaningful, not just well shaped?

Two checks from the serving issue, reusable by benchmarks and tests:

- :func:`centre_vs_border`: HuSHem crops are centred on the sperm head, so attribution should fall
  in the central region rather than on the border. Reports the fraction of heatmap mass in the
  central box (half the side, a quarter of the area: 0.25 for a uniform map) and the ratio of mean
  heat in the centre to mean heat on the border (1.0 for a uniform map).
- :func:`deletion_test`: replace the top-``frac`` attributed pixels by the frame's background colour
  (its per-channel median) and measure the drop of the target-class probability; compare with
  deleting a random ``frac`` of pixels. The random mask is drawn at the heatmap's own granularity
  (``random="blocks"``: thresholded smooth noise upsampled from the CAM grid, so both masks are
  blobs of similar size) or as scattered pixels (``random="pixels"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class FaithfulnessReport:
    n: int
    centre_mass_fraction: float  # mean over frames; uniform map = 0.25
    centre_border_ratio: float  # mean heat in centre / mean heat on border; uniform = 1
    frames_centre_gt_border: float  # share of frames whose centre density exceeds the border's
    drop_top: float  # mean drop of target probability after deleting the top-frac pixels
    drop_random: float  # same for a random frac of pixels (mean over `repeats` draws)
    frames_top_gt_random: float  # share of frames where deleting the top pixels hurts more
    frac: float
    random_mode: str

    def to_dict(self) -> dict:
        return asdict(self)


def _centre_mask(h: int, w: int, centre_frac: float = 0.5) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    ch, cw = int(round(h * centre_frac)), int(round(w * centre_frac))
    top, left = (h - ch) // 2, (w - cw) // 2
    mask[top:top + ch, left:left + cw] = True
    return mask


def centre_vs_border(heatmaps: np.ndarray, centre_frac: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: (fraction of mass in the centre box, centre density / border density)."""
    heat = np.asarray(heatmaps, np.float64)
    mask = _centre_mask(heat.shape[1], heat.shape[2], centre_frac)
    total = heat.sum(axis=(1, 2)) + 1e-12
    centre = heat[:, mask].sum(axis=1)
    fraction = centre / total
    dens_c = heat[:, mask].mean(axis=1)
    dens_b = heat[:, ~mask].mean(axis=1) + 1e-12
    return fraction, dens_c / dens_b


def top_mask(heatmap: np.ndarray, frac: float) -> np.ndarray:
    flat = heatmap.reshape(-1)
    k = max(1, int(round(frac * flat.size)))
    idx = np.argpartition(-flat, k - 1)[:k]
    mask = np.zeros(flat.size, bool)
    mask[idx] = True
    return mask.reshape(heatmap.shape)


def random_mask(shape: tuple[int, int], frac: float, rng: np.random.Generator, mode: str = "blocks",
                grid: int = 7) -> np.ndarray:
    if mode == "pixels":
        flat = np.zeros(shape[0] * shape[1], bool)
        flat[rng.choice(flat.size, int(round(frac * flat.size)), replace=False)] = True
        return flat.reshape(shape)
    from PIL import Image

    noise = rng.random((grid, grid)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(noise, mode="F").resize((shape[1], shape[0]), Image.BILINEAR))
    return top_mask(smooth, frac)


def delete(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Replace masked pixels with the frame's background colour (per-channel median)."""
    out = frame.copy()
    out[mask] = np.median(frame.reshape(-1, 3), axis=0).astype(np.uint8)
    return out


def deletion_test(predict, frames: np.ndarray, heatmaps: np.ndarray, targets: np.ndarray, frac: float = 0.2,
                  repeats: int = 3, mode: str = "blocks", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame target-probability drops (top-frac deleted, random-frac deleted, mean over repeats).

    ``predict``: uint8 [n,H,W,3] -> probabilities [n,K] (in-process model or a Triton client call).
    """
    rng = np.random.default_rng(seed)
    n = len(frames)
    rows = np.arange(n)
    base = predict(frames)[rows, targets]
    top = np.stack([delete(f, top_mask(h, frac)) for f, h in zip(frames, heatmaps)])
    drop_top = base - predict(top)[rows, targets]
    drops = []
    for _ in range(repeats):
        rand = np.stack([delete(f, random_mask(f.shape[:2], frac, rng, mode)) for f in frames])
        drops.append(base - predict(rand)[rows, targets])
    return drop_top, np.mean(drops, axis=0)


def evaluate(explainer, frames: np.ndarray, frac: float = 0.2, repeats: int = 3, mode: str = "blocks",
             seed: int = 0, batch: int = 8) -> FaithfulnessReport:
    """Run both checks with an in-process :class:`morphocam.serving.explain.Explainer` on uint8 frames."""
    heat, targets = [], []
    for i in range(0, len(frames), batch):
        out = explainer.explain(frames[i:i + batch])
        heat.append(out["heatmap"])
        targets.append(out["target"])
    heat = np.concatenate(heat)
    targets = np.concatenate(targets).astype(np.int64)

    def predict(x):
        return np.concatenate([explainer.probabilities(x[i:i + batch]) for i in range(0, len(x), batch)])

    fraction, ratio = centre_vs_border(heat)
    drop_top, drop_rand = deletion_test(predict, frames, heat, targets, frac, repeats, mode, seed)
    return FaithfulnessReport(
        n=len(frames), centre_mass_fraction=float(fraction.mean()), centre_border_ratio=float(ratio.mean()),
        frames_centre_gt_border=float((ratio > 1).mean()), drop_top=float(drop_top.mean()),
        drop_random=float(drop_rand.mean()), frames_top_gt_random=float((drop_top > drop_rand).mean()),
        frac=frac, random_mode=mode)
