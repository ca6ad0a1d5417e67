"""Class-per-folder datasets: scanning, duplicate grouping, seeded splits, cached decoded images.

A dataset is ``root/<class name>/<image files>``. Pixel-identical images (SMIDS has 49 pairs) are
grouped so that a group never straddles train/validation/test; groups whose members carry
different labels (SMIDS has 4) are dropped by default, since no label of theirs can be trusted.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphocam.preprocess import ImageDecodeError, decode_image, is_image_path, resize_rgb


class DatasetError(ValueError):
    """The dataset on disk cannot be used as asked; the message says why and where."""


@dataclass
class Sample:
    path: Path
    label: int
    pixel_hash: str = ""


@dataclass
class ImageFolder:
    root: Path
    classes: tuple[str, ...]
    samples: list[Sample]
    images: np.ndarray | None = None  # N x H x W x 3 uint8, aligned with samples
    dropped_conflicts: list[str] = field(default_factory=list)
    merged_groups: int = 0

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def fingerprint(self) -> str:
        """sha256 over (class, relative path, pixel hash) of every kept sample."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: str(s.path)):
            h.update(f"{self.classes[s.label]}|{s.path.relative_to(self.root)}|{s.pixel_hash}\n".encode())
        return h.hexdigest()


def scan_folder(root: Path, classes: tuple[str, ...] | None = None,
                limit_per_class: int | None = None, seed: int = 0) -> tuple[tuple[str, ...], list[Sample]]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = tuple(found)
    missing = [c for c in classes if c not in found]
    if missing:
        raise DatasetError(f"{root}: class folders {missing} not found (have {found})")
    if len(classes) < 2:
        raise DatasetError(f"{root}: need at least 2 class folders, found {found}")
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and is_image_path(p))
        if not files:
            raise DatasetError(f"{root / name}: class folder holds no BMP/PNG/JPEG/TIFF images")
        if limit_per_class is not None and len(files) > limit_per_class:
            keep = sorted(rng.choice(len(files), size=limit_per_class, replace=False))
            files = [files[i] for i in keep]
        samples += [Sample(p, label) for p in files]
    return classes, samples


def pixel_hash(rgb: np.ndarray) -> str:
    """sha256 of decoded uint8 RGB pixels and their shape: an image's identity for duplicate grouping and
    the data fingerprint (file bytes would differ between pixel-identical BMP/PNG/WebP copies)."""
    return hashlib.sha256(np.ascontiguousarray(rgb).tobytes() + str(rgb.shape).encode()).hexdigest()


def load_images(root: Path, classes: tuple[str, ...] | None, size: int,
                limit_per_class: int | None = None, seed: int = 0,
                drop_conflicts: bool = True, progress: bool = True) -> ImageFolder:
    """Scan, decode (naming any unreadable file), hash pixels, group duplicates, resize."""
    classes, samples = scan_folder(root, classes, limit_per_class, seed)
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    iterator = enumerate(samples)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(samples), desc=f"decode {Path(root).name}", leave=False)
    for i, s in iterator:
        try:
            rgb = decode_image(s.path)
        except ImageDecodeError as exc:
            raise DatasetError(f"unreadable image in dataset: {exc}") from None
        s.pixel_hash = pixel_hash(rgb)
        images[i] = resize_rgb(rgb, size, size)
    folder = ImageFolder(Path(root), classes, samples, images)
    return group_duplicates(folder, drop_conflicts)


def group_duplicates(folder: ImageFolder, drop_conflicts: bool = True) -> ImageFolder:
    """Attach group ids; drop groups whose members disagree on the label (if asked)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(folder.samples):
        by_hash[s.pixel_hash].append(i)
    keep = np.ones(len(folder.samples), dtype=bool)
    dropped: list[str] = []
    merged = 0
    for members in by_hash.values():
        if len(members) < 2:
            continue
        merged += 1
        labels = {folder.samples[i].label for i in members}
        if len(labels) > 1 and drop_conflicts:
            for i in members:
                keep[i] = False
                dropped.append(str(folder.samples[i].path.relative_to(folder.root)))
    samples = [s for s, k in zip(folder.samples, keep) if k]
    images = folder.images[keep] if folder.images is not None else None
    return ImageFolder(folder.root, folder.classes, samples, images, dropped, merged)


def group_ids(samples: list[Sample]) -> np.ndarray:
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(s.pixel_hash, len(ids)) for s in samples], dtype=np.int64)


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _group_labels(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, first = np.unique(groups, return_index=True)
    return uniq, labels[first]


def _expand(groups: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(groups, chosen))


def _check_enough(glabels: np.ndarray, parts: int, what: str) -> None:
    counts = Counter(glabels.tolist())
    short = {k: v for k, v in counts.items() if v < parts}
    if short:
        raise DatasetError(f"too few images for {what}: each class needs at least {parts} distinct "
                           f"images, have {dict(sorted(counts.items()))}")


def split_indices(labels: np.ndarray, groups: np.ndarray, seed: int, val_frac: float = 0.15,
                  test_frac: float = 0.15) -> Split:
    """Seeded, stratified train/val/test split over duplicate groups."""
    from sklearn.model_selection import train_test_split

    gids, glabels = _group_labels(labels, groups)
    _check_enough(glabels, 3, "a train/validation/test split")
    rest, test = train_test_split(gids, test_size=test_frac, stratify=glabels, random_state=seed)
    rest_labels = glabels[np.searchsorted(gids, rest)]
    train, val = train_test_split(rest, test_size=val_frac / (1.0 - test_frac), stratify=rest_labels,
                                  random_state=seed)
    return Split(_expand(groups, train), _expand(groups, val), _expand(groups, test))


def kfold_indices(labels: np.ndarray, groups: np.ndarray, seed: int, folds: int, fold: int,
                  val_frac: float = 0.15) -> Split:
    """Fold ``fold`` of a stratified k-fold over groups; validation is carved from the training part."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if not 0 <= fold < folds:
        raise DatasetError(f"fold {fold} out of range for {folds} folds")
    gids, glabels = _group_labels(labels, groups)
    _check_enough(glabels, folds + 1, f"{folds}-fold cross-validation")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    rest_idx, test_idx = list(skf.split(gids, glabels))[fold]
    rest, test = gids[rest_idx], gids[test_idx]
    train, val = train_test_split(rest, test_size=val_frac, stratify=glabels[rest_idx], random_state=seed)
    return Split(_expand(groups, train), _expand(groups, val), _expand(groups, test))


def member_indices(labels: np.ndarray, groups: np.ndarray, seed: int, members: int, member: int,
                   val_frac: float = 0.15, test_frac: float = 0.15) -> Split:
    """Member ``member`` of a ``members``-model ensemble on the single split (a cross-validated ensemble).

    The single split (:func:`split_indices`) is kept whole around the ensemble: its test images are
    scored once, as a single released model's are, and its validation images are held out from every
    member, so that the ensemble as a whole still has unseen data to be chosen over the single model
    on and to fit its temperature, OOD threshold and conformal sets on. The single split's training
    groups are re-divided into ``members`` stratified folds: fold ``member`` validates this member
    (early stopping), the others train it; each training image thus trains ``members - 1`` members.
    """
    from sklearn.model_selection import StratifiedKFold

    if not 0 <= member < members:
        raise DatasetError(f"member {member} out of range for {members} members")
    base = split_indices(labels, groups, seed, val_frac, test_frac)
    gids, glabels = _group_labels(labels[base.train], groups[base.train])
    _check_enough(glabels, members, f"a {members}-member ensemble")
    skf = StratifiedKFold(n_splits=members, shuffle=True, random_state=seed)
    train_idx, val_idx = list(skf.split(gids, glabels))[member]
    return Split(_expand(groups, gids[train_idx]), _expand(groups, gids[val_idx]), base.test)
