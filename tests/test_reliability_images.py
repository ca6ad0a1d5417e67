"""Corrupt and unusual image files through the client path (``clients`` API and the CLI) against the
live server: unusual-but-valid images are converted and classified, broken ones become error
records naming the reason; the stream never crashes and every file gets exactly one record.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.grpc")

from morphocam.clients.sources import expand_inputs  # noqa: E402
from morphocam.clients.streaming import classify_frames  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "morphocam_hushem"


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-looking PNG whose header declares ``width x height`` pixels (10 G pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # a few rows of zeros compress to almost nothing; the declared size is what matters
    idat = zlib.compress(b"\x00" * (1 + 3 * 1000) * 10, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _base_rgb() -> np.ndarray:
    sample = sorted((REPO / "samples" / "hushem").glob("*.BMP"))
    if not sample:
        pytest.skip("samples/hushem missing")
    return np.asarray(Image.open(sample[0]).convert("RGB"))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Files to classify: name -> bytes; which should convert, which should be errors (and why)."""
    rgb = _base_rgb()
    img = Image.fromarray(rgb)
    gray16 = (np.asarray(img.convert("L")).astype(np.uint16) * 257)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    jpeg = _save(img, "JPEG", quality=90)
    converted = {
        "a_rgb.png": _save(img, "PNG"),
        "b_grayscale.png": _save(img.convert("L"), "PNG"),
        "c_gray16.png": _save(Image.fromarray(gray16), "PNG"),
        "d_gray16.tif": _save(Image.fromarray(gray16), "TIFF"),
        "e_cmyk.jpg": _save(img.convert("CMYK"), "JPEG", quality=90),
        "f_cmyk.tif": _save(img.convert("CMYK"), "TIFF"),
        "g_rgba.png": _save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "h_palette.png": _save(img.convert("P"), "PNG"),
        "i_gray_alpha.png": _save(img.convert("LA"), "PNG"),
        "j_bilevel.bmp": _save(img.convert("1"), "BMP"),
        "k_tiny_1x1.png": _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "l_extreme_aspect.png": _save(Image.new("L", (4000, 2), 90), "PNG"),
        "m_jpeg_named.png": jpeg,  # wrong extension: the content decides
    }
    broken = {
        "n_zero_bytes.png": (b"", "0 bytes"),
        "o_truncated.jpg": (jpeg[: len(jpeg) // 3], "truncated"),
        "p_png_bomb.png": (png_bomb(), "decompression bomb"),  # 10 G pixels: Pillow's own guard
        "p_png_bomb_64mpx.png": (png_bomb(8000, 8000), "pixel limit"),  # under Pillow's, over the project's
        "q_garbage.bmp": (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a recognised"),
        "r_text.jpg": (b"patient: J. Doe, not an image\n", "not a recognised"),
        "s_header_only.png": (_save(img, "PNG")[:33], "not a recognised"),
    }
    folder = tmp_path_factory.mktemp("odd_images")
    for name, data in converted.items():
        (folder / name).write_bytes(data)
    for name, (data, _) in broken.items():
        (folder / name).write_bytes(data)
    return folder, converted, {k: why for k, (_, why) in broken.items()}


def test_odd_and_broken_images_through_the_client_api(triton_server, image_folder):
    folder, converted, broken = image_folder
    frames = list(expand_inputs([str(folder)]))
    assert len(frames) == len(converted) + len(broken)
    out = list(classify_frames(frames, [triton_server.grpc_url], MODEL, batch_size=4, max_wait_ms=10,
                               max_in_flight=2, timeout_s=30, retry_deadline_s=30))
    assert [r["frame_id"] for r in out] == [f.id for f in frames]  # one record per file, in order
    by_name = {Path(r["frame_id"]).name: r for r in out}
    for name in converted:
        r = by_name[name]
        assert r["status"] == "ok", (name, r)
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-3
    for name, why in broken.items():
        r = by_name[name]
        assert r["status"] == "error", (name, r)
        print(f"{name}: {r['error']}")
        assert why.lower() in r["error"].lower(), (name, r["error"])
        assert name in r["error"] or name in r["frame_id"]
    # the grayscale copy of a frame classifies like its RGB original (same pixels after conversion)
    assert by_name["b_grayscale.png"]["predicted_class"] == by_name["i_gray_alpha.png"]["predicted_class"]


def test_odd_and_broken_images_through_the_cli(triton_server, image_folder, tmp_path):
    folder, converted, broken = image_folder
    out = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, "-m", "morphocam.clients.classify_cli", "--no-progress", "--url",
                           triton_server.grpc_url, "--model", MODEL, "--output", str(out), "--timeout", "30",
                           "--retry-deadline", "30", str(folder)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(converted) + len(broken)
    errors = {Path(r["frame_id"]).name for r in records if r["status"] == "error"}
    assert errors == set(broken)
    assert f"{len(broken)} errors" in proc.stderr
