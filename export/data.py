"""Real images for the export checks: the checkpoint's own test split and its non-test images.

``test_predictions.npz`` beside a checkpoint (written by training) lists the test split's paths
relative to the dataset root, their labels and the PyTorch probabilities. Calibration uses images
that are *not* in that list (the training + validation part of the split), or a folder given by the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morphocam.contract import InputContract
from morphocam.datasets import dataset_dir
from morphocam.preprocess import is_image_path, load_frame

from .errors import ExportError
from .config import PROJECT_ROOT


@dataclass
class TestSplit:
    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray | None  # PyTorch probabilities recorded at training time


def dataset_root(meta: dict, override: Path | None, contract: InputContract) -> Path:
    """Where the checkpoint's dataset lives: flag > recipe data_dir > $MORPHOCAM_DATA > ../shared/datasets."""
    name = contract.dataset or meta.get("recipe", {}).get("dataset", "")
    candidates: list[Path] = []
    if override is not None:
        override = Path(override)
        candidates += [override / name, override] if name else [override]
    data_dir = meta.get("recipe", {}).get("data_dir")
    if data_dir:
        candidates += [Path(data_dir), PROJECT_ROOT / data_dir]
    candidates.append(dataset_dir(name))
    for c in candidates:
        if c.is_dir() and all((c / cls).is_dir() for cls in contract.classes):
            return c
    raise ExportError(f"dataset {name!r} not found (tried {[str(c) for c in candidates]}); pass --data-root")


def load_test_split(checkpoint: Path) -> TestSplit | None:
    npz = Path(checkpoint).with_name("test_predictions.npz")
    if not npz.is_file():
        return None
    with np.load(npz, allow_pickle=False) as d:
        probs = d["probs"] if "probs" in d else None
        return TestSplit([str(p) for p in d["paths"]], d["labels"].astype(np.int64), probs)


def load_images(root: Path, rel_paths: list[str], contract: InputContract) -> np.ndarray:
    out = np.empty((len(rel_paths), contract.height, contract.width, 3), np.uint8)
    for i, p in enumerate(rel_paths):
        out[i] = load_frame(Path(root) / p, contract.height, contract.width)
    return out


def list_dataset(root: Path, contract: InputContract) -> list[tuple[str, int]]:
    items = []
    for label, cls in enumerate(contract.classes):
        for p in sorted((Path(root) / cls).iterdir()):
            if p.is_file() and is_image_path(p):
                items.append((f"{cls}/{p.name}", label))
    return items


def sample_paths(items: list[tuple[str, int]], n: int, seed: int = 0) -> list[tuple[str, int]]:
    """A seeded, class-balanced (round-robin) sample of ``n`` items."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    pools = [list(np.asarray(v, dtype=object)[rng.permutation(len(v))]) for _, v in sorted(by_class.items())]
    chosen = []
    while len(chosen) < n and any(pools):
        for pool in pools:
            if pool and len(chosen) < n:
                path, label = pool.pop()
                chosen.append((str(path), int(label)))
    return chosen


def calibration_images(root: Path, contract: InputContract, test: TestSplit | None, n: int,
                       folder: Path | None = None) -> tuple[np.ndarray, str]:
    """Real non-test images for INT8 calibration; returns (images, description)."""
    if folder is not None:
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_path(p))
        if not files:
            raise ExportError(f"calibration folder {folder} holds no images")
        rng = np.random.default_rng(0)
        files = [files[i] for i in sorted(rng.permutation(len(files))[:n])]
        imgs = np.stack([load_frame(p, contract.height, contract.width) for p in files])
        return imgs, f"{len(files)} images from {folder}"
    exclude = set(test.paths) if test is not None else set()
    items = [it for it in list_dataset(root, contract) if it[0] not in exclude]
    chosen = sample_paths(items, n, seed=0)
    if not chosen:
        raise ExportError(f"no calibration images found under {root}")
    what = "non-test (training/validation)" if test is not None else "dataset (no test split recorded)"
    return load_images(root, [p for p, _ in chosen], contract), f"{len(chosen)} {what} images of {root}, class-balanced"
