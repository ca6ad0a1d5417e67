"""Dataset scanning, duplicate grouping, seeded splits and the errors a lab user will hit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from morphocam.training.data import (DatasetError, group_ids, kfold_indices, load_images, member_indices, scan_folder,
                                     split_indices)


def _write(path: Path, value: int, size=(20, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for c, name in enumerate(["A", "B", "C"]):
        for i in range(10):
            _write(root / name / f"img_{i}.png", 100 * c + i)
    # a pixel-identical copy inside class A (same group) saved as BMP, and a cross-class conflict
    shutil.copy(root / "A" / "img_0.png", root / "A" / "copy_of_0.png")
    Image.open(root / "A" / "img_1.png").save(root / "A" / "img_1_again.bmp")
    Image.open(root / "B" / "img_2.png").save(root / "C" / "conflict.png")
    return root


def test_duplicates_are_grouped_and_conflicts_dropped(tiny_dataset):
    folder = load_images(tiny_dataset, None, 16, progress=False)
    assert folder.classes == ("A", "B", "C")
    assert folder.merged_groups == 3  # two within-class pairs, one cross-class pair
    assert sorted(folder.dropped_conflicts) == ["B/img_2.png", "C/conflict.png"]
    assert len(folder.samples) == 33 - 2
    assert folder.images.shape == (31, 16, 16, 3)
    kept = load_images(tiny_dataset, None, 16, drop_conflicts=False, progress=False)
    assert len(kept.samples) == 33 and kept.dropped_conflicts == []


def test_split_is_seeded_stratified_and_keeps_duplicate_groups_together(tiny_dataset):
    folder = load_images(tiny_dataset, None, 16, progress=False)
    labels, groups = folder.labels, group_ids(folder.samples)
    a = split_indices(labels, groups, seed=7)
    b = split_indices(labels, groups, seed=7)
    c = split_indices(labels, groups, seed=8)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(a, part), getattr(b, part))
    assert not all(np.array_equal(getattr(a, p), getattr(c, p)) for p in ("train", "test"))
    parts = [set(a.train), set(a.val), set(a.test)]
    assert sum(map(len, parts)) == len(labels) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    for part in parts:  # every group lies wholly inside one part
        for g in {groups[i] for i in part}:
            assert set(np.flatnonzero(groups == g)) <= part
    for part in (a.val, a.test):  # stratified: every class present
        assert set(labels[part]) == {0, 1, 2}


def test_hushem_split_matches_the_papers_sizes(hushem_dir):
    _, samples = scan_folder(hushem_dir)
    labels = np.array([s.label for s in samples])
    split = split_indices(labels, np.arange(len(labels)), seed=42)
    assert split.counts() == {"train": 150, "val": 33, "test": 33}  # paper: 150 training, 33 test images


def test_kfold_folds_partition_the_data(tiny_dataset):
    folder = load_images(tiny_dataset, None, 16, progress=False)
    labels, groups = folder.labels, group_ids(folder.samples)
    tests = [set(kfold_indices(labels, groups, 0, folds=3, fold=f).test) for f in range(3)]
    assert set().union(*tests) == set(range(len(labels)))
    assert sum(map(len, tests)) == len(labels)
    with pytest.raises(DatasetError, match="out of range"):
        kfold_indices(labels, groups, 0, folds=3, fold=3)


def test_ensemble_members_share_the_single_split_and_partition_its_training_part(hushem_dir):
    _, samples = scan_folder(hushem_dir)
    labels = np.array([s.label for s in samples])
    groups = np.arange(len(labels))
    single = split_indices(labels, groups, seed=42)
    members = [member_indices(labels, groups, 42, members=5, member=m) for m in range(5)]
    rest = set(single.train)
    for m in members:
        assert list(m.test) == list(single.test)  # scored on the released model's test images, nothing else
        assert set(m.train) | set(m.val) == rest and not set(m.train) & set(m.val)
        # the single split's validation images stay unseen by every member: the ensemble's own validation
        assert not (set(m.train) | set(m.val)) & set(single.val)
    vals = [set(m.val) for m in members]
    assert set().union(*vals) == rest and sum(map(len, vals)) == len(rest)  # each image validates once
    for m in members:  # stratified: every class validates every member
        assert set(labels[m.val]) == set(labels)
    with pytest.raises(DatasetError, match="out of range"):
        member_indices(labels, groups, 42, members=5, member=5)


def test_empty_class_folder_is_named(tmp_path):
    _write(tmp_path / "A" / "x.png", 1)
    (tmp_path / "B").mkdir()
    with pytest.raises(DatasetError, match="B: class folder holds no"):
        scan_folder(tmp_path)


def test_unreadable_image_is_named(tiny_dataset):
    (tiny_dataset / "B" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_images(tiny_dataset, None, 16, progress=False)


def test_too_few_images_for_a_split(tmp_path):
    for name in ("A", "B"):
        for i in range(2):
            _write(tmp_path / name / f"{i}.png", hash((name, i)) % 1000)
    folder = load_images(tmp_path, None, 8, progress=False)
    with pytest.raises(DatasetError, match="too few images"):
        split_indices(folder.labels, group_ids(folder.samples), seed=0)


def test_missing_class_folder_for_known_dataset(tmp_path):
    _write(tmp_path / "Normal" / "x.png", 1)
    with pytest.raises(DatasetError, match="not found"):
        scan_folder(tmp_path, ("Normal", "Tapered"))
