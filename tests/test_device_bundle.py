"""The device bundle (datasets as lossless WebP + weights) and offline weights from $MORPHOCAM_WEIGHTS_DIR.

What matters on the GPU machine: after ``unpack`` the training computes the same data fingerprint, hence
the same seeded split, as here; a damaged bundle is refused with the file named; an oversized one is
never written.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from morphocam.training.bundle import (MANIFEST, BundleError, PackConfig, UnpackConfig, _zip_entry, pack,
                                       unpack)
from morphocam.training.bundle_cli import main as bundle_main
from morphocam.training.data import group_ids, load_images, split_indices
from morphocam.training.model import build_model
from morphocam.training.pretrained import (LITE_FILES, LITE_PACKAGES, WEIGHTS_DIR_ENV, lite_package_file,
                                           load_backbone_weights)
from morphocam.training.tree_size import TreeConfig, measure


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hushem_bundle(tmp_path_factory, hushem_dir) -> Path:
    """HuSHem alone, packed with two worker processes (the parallel path the GPU machine takes)."""
    out = tmp_path_factory.mktemp("bundle") / "device_bundle"
    pack(PackConfig(output_dir=out, data_root=hushem_dir.parent, datasets=("hushem",), weights=("none",),
                    workers=2))
    return out


def _tiny_root(root: Path) -> Path:
    """Two small class-per-folder datasets: PNG and BMP images, a duplicate, a CSV beside them."""
    rng = np.random.default_rng(0)
    for dataset, suffix, count in (("small", ".png", 3), ("large", ".bmp", 6)):
        for cls in ("A", "B"):
            for i in range(count):
                folder = root / dataset / cls
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img_{i}{suffix}")
        shutil.copy(root / dataset / "A" / f"img_0{suffix}", root / dataset / "B" / f"copy{suffix}")
        (root / dataset / "NOTES.csv").write_text("file,label\n")
    return root


def test_hushem_round_trip_gives_the_same_fingerprint_and_split(hushem_bundle, hushem_dir, tmp_path):
    manifest = json.loads((hushem_bundle / MANIFEST).read_text())
    result = unpack(UnpackConfig(bundle=hushem_bundle, data_root=tmp_path / "data", workers=2))
    restored = tmp_path / "data" / "hushem"
    original = load_images(hushem_dir, None, 32, progress=False)
    rebuilt = load_images(restored, None, 32, progress=False)
    assert rebuilt.fingerprint() == original.fingerprint() == manifest["datasets"]["hushem"]["fingerprint"]
    assert result["fingerprints"]["hushem"] == original.fingerprint()
    for seed in (0, 42):  # same fingerprint -> same seeded split, image for image
        a = split_indices(original.labels, group_ids(original.samples), seed)
        b = split_indices(rebuilt.labels, group_ids(rebuilt.samples), seed)
        for part in ("train", "val", "test"):
            assert np.array_equal(getattr(a, part), getattr(b, part))
    # original names and formats; HuSHem's BMPs and its non-image files come back byte for byte
    originals = sorted(p.relative_to(hushem_dir) for p in hushem_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(restored) for p in restored.rglob("*") if p.is_file() and p.name[0] != ".") == originals
    assert all(_sha(hushem_dir / rel) == _sha(restored / rel) for rel in originals)
    # WebP is what travels
    with zipfile.ZipFile(hushem_bundle / "hushem.zip") as zf:
        names = zf.namelist()
    assert sum(n.endswith(".webp") for n in names) == 216 and "SHA256SUMS" in names
    assert manifest["total_bytes"] == sum(p.stat().st_size for p in hushem_bundle.iterdir())


def _rewrite_member(archive: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members.update(replace)
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(_zip_entry(name), data)


def test_a_corrupted_file_is_caught_and_nothing_is_unpacked(hushem_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(hushem_bundle, bundle)
    archive = bundle / "hushem.zip"
    with zipfile.ZipFile(archive) as zf:
        webp = zf.read("Normal/image_001.BMP.webp")
    img = np.array(Image.open(io.BytesIO(webp)))
    img[0, 0] ^= 1  # one pixel off: a valid image, the wrong one
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "WEBP", lossless=True)
    _rewrite_member(archive, {"Normal/image_001.BMP.webp": buf.getvalue(),
                              "Tapered/image_002.BMP.webp": webp[: len(webp) // 2],  # truncated
                              "SOURCE_MAP.csv": b"edited\n"})
    with pytest.raises(BundleError) as caught:
        unpack(UnpackConfig(bundle=bundle, data_root=tmp_path / "data", workers=1))
    message = str(caught.value)
    assert "3 file(s) of hushem failed verification" in message
    assert "hushem/Normal/image_001.BMP: pixel hash" in message
    assert "hushem/Tapered/image_002.BMP" in message and "SOURCE_MAP.csv: sha256" in message
    assert not (tmp_path / "data" / "hushem").exists()
    assert not any((tmp_path / "data").glob(".hushem*"))  # the staging folder is gone too


def test_unpack_never_replaces_a_folder_it_did_not_write(hushem_bundle, tmp_path):
    (tmp_path / "data" / "hushem").mkdir(parents=True)
    (tmp_path / "data" / "hushem" / "mine.txt").write_text("keep")
    with pytest.raises(BundleError, match="not written by unpack"):
        unpack(UnpackConfig(bundle=hushem_bundle, data_root=tmp_path / "data", workers=1))
    assert (tmp_path / "data" / "hushem" / "mine.txt").read_text() == "keep"


def test_over_budget_is_refused_with_the_parts_to_drop(tmp_path):
    root = _tiny_root(tmp_path / "datasets")
    out = tmp_path / "device_bundle"
    cfg = PackConfig(output_dir=out, data_root=root, datasets=("small", "large"), weights=("none",),
                     budget_mib=0.001, workers=1)
    with pytest.raises(BundleError) as caught:
        pack(cfg)
    message = str(caught.value)
    assert "over --budget-mib 0.001" in message and "dataset large" in message and "dataset small" in message
    assert "--datasets small" in message  # drop the largest dataset
    assert not out.exists() and not any(tmp_path.glob(".device_bundle*"))
    # the same from the command line: exit status 2 and the reason on stderr
    assert bundle_main(["pack", "--output-dir", str(out), "--data-root", str(root), "--datasets", "small,large",
                        "--weights", "none", "--budget-mib", "0.001", "--workers", "1"]) == 2
    assert not out.exists()


def test_tiny_bundle_with_weights_round_trips_and_checks_the_weights(tmp_path):
    root = _tiny_root(tmp_path / "datasets")
    out = tmp_path / "device_bundle"
    manifest = pack(PackConfig(output_dir=out, data_root=root, datasets=("small", "large"), weights=("lite0",),
                               workers=1))
    entry = manifest["datasets"]["large"]
    assert sum("same_as" in e for e in entry["images"]) == 1  # the pixel-identical copy is stored once
    assert [f["path"] for f in entry["files"]] == ["NOTES.csv"]
    result = unpack(UnpackConfig(bundle=out, data_root=tmp_path / "data", weights_dir=tmp_path / "weights",
                                 workers=1))
    weights = tmp_path / "weights" / LITE_FILES["lite0"]
    assert result["weights"] == [str(weights)]
    # the package's file minus its ImageNet classifier: every backbone tensor bit for bit, and nothing else gone
    from morphocam.training.bundle import tensors_digest

    package = torch.load(lite_package_file("lite0"), map_location="cpu", weights_only=True)
    carried = torch.load(weights, map_location="cpu", weights_only=True)
    assert sorted(set(package) - set(carried)) == manifest["weights"][0]["dropped_keys"] == ["_fc.bias", "_fc.weight"]
    assert tensors_digest(carried) == manifest["weights"][0]["backbone_tensors_sha256"]
    assert all(torch.equal(carried[k], package[k]) for k in carried)
    assert manifest["weights"][0]["source_sha256"] == _sha(lite_package_file("lite0"))
    for name in ("small", "large"):
        assert (load_images(tmp_path / "data" / name, None, 16, progress=False).fingerprint()
                == load_images(root / name, None, 16, progress=False).fingerprint()
                == result["fingerprints"][name])
    # unpacking again replaces its own folders; a weights file that does not decode to its sha256 is refused
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["weights"][0]["sha256"] = "0" * 64
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="sha256 differs"):
        unpack(UnpackConfig(bundle=out, data_root=tmp_path / "data", weights_dir=tmp_path / "weights2", workers=1))


@pytest.mark.parametrize("carried", ["package file", "bundle's backbone-only file"])
def test_weights_come_from_the_weights_dir_without_the_package(tmp_path, monkeypatch, carried):
    from morphocam.training.bundle import backbone_only

    arch = LITE_PACKAGES["lite0"][0]
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    package_file = lite_package_file("lite0")
    from_package = build_model(arch, 4, use_cbam=True, dropout=0.2, pretrained_timm=False)
    expected = load_backbone_weights(from_package, arch, "lite0")

    if carried == "package file":
        shutil.copy(package_file, tmp_path / LITE_FILES["lite0"])
    else:
        (tmp_path / LITE_FILES["lite0"]).write_bytes(backbone_only(package_file)[0])
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, LITE_PACKAGES["lite0"][1], None)  # as on the GPU machine: not installed
    assert lite_package_file("lite0") == tmp_path / LITE_FILES["lite0"]
    model = build_model(arch, 4, use_cbam=True, dropout=0.2, pretrained_timm=False)  # as build_for does
    assert load_backbone_weights(model, arch, "lite0") == expected  # results compare across machines
    for key, value in from_package.features.state_dict().items():
        assert torch.equal(value, model.features.state_dict()[key]), key

    (tmp_path / LITE_FILES["lite0"]).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_DIR_ENV):
        lite_package_file("lite0")


def test_tree_size_counts_tracked_untracked_and_carried_files(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    (repo / "big").mkdir(parents=True)
    (repo / "big" / "a.bin").write_bytes(b"x" * 3000)
    (repo / "small.txt").write_bytes(b"y" * 10)
    (repo / ".gitignore").write_text("/device_bundle/\n")
    (repo / "device_bundle").mkdir()
    (repo / "device_bundle" / "d.zip").write_bytes(b"z" * 500)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "big", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    result = measure(TreeConfig(repo=repo, carry=("device_bundle",), top=2, limit_mib=0.003))
    assert result["by_kind"] == {"tracked": 3000 + 16, "untracked": 10, "carry device_bundle": 500}
    assert result["total_bytes"] == 3526 and result["over"]  # 0.003 MiB = 3145 B
    assert [f["path"] for f in result["largest"]] == ["big/a.bin", "device_bundle/d.zip"]
