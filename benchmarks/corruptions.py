"""Synthetic shifts of microscope frames at increasing severity, and frames that hold no cell at all.

Each corruption maps a uint8 RGB frame [H, W, 3] to another at the same size (OpenCV / numpy), with
three severities chosen to span "still readable" to "unusable": the benchmark reports accuracy under
each beside the share the OOD score flags, so one can see whether the flag rises as accuracy falls.
"""

from __future__ import annotations

import cv2
import numpy as np

SEVERITIES = (1, 2, 3)


def _disk(radius: int) -> np.ndarray:
    size = 2 * radius + 1
    yy, xx = np.mgrid[:size, :size] - radius
    k = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float32)
    return k / k.sum()


def defocus_blur(img: np.ndarray, s: int) -> np.ndarray:
    return cv2.filter2D(img, -1, _disk((1, 3, 6)[s - 1]), borderType=cv2.BORDER_REFLECT)


def motion_blur(img: np.ndarray, s: int) -> np.ndarray:
    length = (5, 11, 21)[s - 1]
    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0 / length  # horizontal stage drift
    return cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT)


def overexposure(img: np.ndarray, s: int) -> np.ndarray:
    return np.clip(img.astype(np.float32) * (1.4, 2.0, 3.0)[s - 1], 0, 255).astype(np.uint8)


def underexposure(img: np.ndarray, s: int) -> np.ndarray:
    return (img.astype(np.float32) * (0.6, 0.35, 0.15)[s - 1]).astype(np.uint8)


def gaussian_noise(img: np.ndarray, s: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, (8, 20, 45)[s - 1], img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, s: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, (30, 12, 4)[s - 1]])
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def stain_shift(img: np.ndarray, s: int) -> np.ndarray:
    """Hue rotation (another stain / white balance): OpenCV hue runs 0-179."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + (10, 30, 60)[s - 1]) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def greyscale(img: np.ndarray, s: int) -> np.ndarray:
    """Towards an unstained, monochrome camera: blend with the luminance."""
    grey = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB).astype(np.float32)
    a = (0.5, 0.8, 1.0)[s - 1]
    return (a * grey + (1 - a) * img.astype(np.float32)).round().astype(np.uint8)


CORRUPTIONS = {"defocus_blur": defocus_blur, "motion_blur": motion_blur, "overexposure": overexposure,
               "underexposure": underexposure, "gaussian_noise": gaussian_noise, "jpeg": jpeg,
               "stain_shift": stain_shift, "greyscale": greyscale}


def corrupt(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    fn = CORRUPTIONS[name]
    return np.stack([fn(img, severity) for img in images])


def empty_frames(height: int, width: int, per_kind: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Frames without a cell: blank (black, grey, white), one uniform colour, uniform and Gaussian noise."""
    rng = np.random.default_rng(seed)
    shape = (per_kind, height, width, 3)
    levels = np.linspace(0, 255, per_kind).astype(np.uint8)
    return {
        "blank": np.broadcast_to(levels[:, None, None, None], shape).copy(),
        "uniform_colour": np.broadcast_to(rng.integers(0, 256, (per_kind, 1, 1, 3)), shape).astype(np.uint8),
        "uniform_noise": rng.integers(0, 256, shape).astype(np.uint8),
        "gaussian_noise": np.clip(rng.normal(128, 40, shape), 0, 255).astype(np.uint8),
    }


def write_shifted_sample(clean_dir, out_dir, seed: int = 0) -> list[str]:
    """The frames the demo mixes into the frames of ``clean_dir``: two blank frames, one noise frame and
    three heavily corrupted copies of clean frames (defocus, over-exposure, motion blur at severity 3).

    ``python -m morphocam.benchmarks.corruptions samples/smids samples/smids_shifted`` wrote
    ``samples/smids_shifted/``; the report should exclude these frames as out-of-domain.
    """
    from pathlib import Path

    from PIL import Image

    clean = sorted(p for p in Path(clean_dir).iterdir() if p.suffix.lower() in (".png", ".bmp", ".jpg"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    h, w = np.asarray(Image.open(clean[0]).convert("RGB")).shape[:2]
    rng = np.random.default_rng(seed)
    extra = {"blank_black.png": np.zeros((h, w, 3), np.uint8),
             "blank_grey.png": np.full((h, w, 3), 170, np.uint8),
             "noise.png": rng.integers(0, 256, (h, w, 3)).astype(np.uint8)}
    for i, (fn, name) in enumerate(((defocus_blur, "defocus"), (overexposure, "overexposed"),
                                    (motion_blur, "motion_blur"))):
        src = clean[i * 7 % len(clean)]
        extra[f"{name}_{src.stem}.png"] = fn(np.asarray(Image.open(src).convert("RGB")), 3)
    for name, img in extra.items():
        Image.fromarray(img).save(out / name)
        written.append(name)
    return written


if __name__ == "__main__":
    import sys

    print("\n".join(write_shifted_sample(sys.argv[1], sys.argv[2])))
