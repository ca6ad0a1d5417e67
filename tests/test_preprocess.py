"""The torch-free input contract: decoding every kind of frame a lab sends, and refusing bad ones."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from morphocam.contract import DATASET_CLASSES, InputContract
from morphocam.preprocess import ImageDecodeError, decode_image, load_frame, normalise


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_real_dataset_images_decode_to_rgb_at_the_model_size(hushem_dir, smids_dir):
    for path in [next((hushem_dir / "Normal").glob("*.BMP")), next((smids_dir / "Non-Sperm").glob("*.png"))]:
        frame = load_frame(path, 224, 224)
        assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "1"])
def test_other_modes_are_converted_not_crashed(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "I;16" else Image.fromarray(
        (np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode in ("I;16",) else "PNG")
    out = decode_image(_encode(img, fmt))
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8


def test_sixteen_bit_grey_is_scaled_not_clipped():
    img = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert decode_image(_encode(img, "TIFF")).max() == 255
    img = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert decode_image(_encode(img, "TIFF")).max() == 128


def test_corrupt_truncated_and_empty_inputs_name_the_problem():
    good = _encode(Image.new("RGB", (64, 64), (10, 20, 30)), "PNG")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", "zero.png")
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b"this is not an image", "junk.png")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(_encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "cut.jpg")
    assert decode_image(good).shape == (64, 64, 3)


def test_png_bomb_is_refused_from_its_header():
    # A valid PNG header declaring 100000 x 100000 pixels with a tiny compressed body.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(ImageDecodeError, match="bomb|exceeds"):
        decode_image(png, "bomb.png")


def test_arrays_are_accepted_in_common_layouts_and_bad_ones_refused():
    assert decode_image(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert decode_image(np.ones((5, 6, 4), np.float32)).max() == 255
    with pytest.raises(ImageDecodeError, match="NaN or Inf"):
        decode_image(np.full((5, 6, 3), np.nan, np.float32))
    with pytest.raises(ImageDecodeError, match="shape"):
        decode_image(np.zeros((2, 5, 6, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match="dtype"):
        decode_image(np.zeros((5, 6, 3), np.int64))


def test_normalise_matches_the_contract():
    c = InputContract(classes=DATASET_CLASSES["hushem"])
    batch = np.full((1, 2, 2, 3), 255, np.uint8)
    out = normalise(batch, c.mean, c.std)
    assert out.shape == (1, 3, 2, 2)
    assert out[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229)
    with pytest.raises(KeyError, match="unknown class 'Round'"):
        c.class_index("Round")
    with pytest.raises(ValueError):
        InputContract(classes=("only",))
