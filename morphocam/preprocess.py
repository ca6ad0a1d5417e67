"""Torch-free preprocessing: decode a frame, make it RGB, resize it to the model's input.

This is the single definition of the input contract's pixel side. Training caches its images
through it, export parity checks and the served models' warm-up use it, and the clients call it
before sending uint8 frames. Normalisation (mean/std) is *not* done here: it lives inside the
exported graph so that clients send raw uint8 pixels.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")

# A microscope frame is at most a few megapixels; refuse anything that declares more so that a
# decompression bomb is rejected from its header, before any pixel is allocated.
MAX_PIXELS = 50_000_000
# Files bigger than this are refused before they are read at all.
MAX_FILE_BYTES = 64 * 1024 * 1024

ImageSource = Union[str, Path, bytes, bytearray, memoryview, np.ndarray]


class ImageDecodeError(ValueError):
    """A frame that cannot be turned into a model input; the message names the reason."""


def _open_image(data: bytes, name: str) -> Image.Image:
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise ImageDecodeError(f"{name}: {len(data)} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise ImageDecodeError(
                f"{name}: declared size {width}x{height} exceeds the {MAX_PIXELS}-pixel limit"
            )
        img.load()  # decodes fully: truncated files fail here, not later
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{name}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({exc})") from None
    return img


def _pil_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow mode (1, L, P, I;16, I, F, RGBA, LA, CMYK, YCbCr...) -> uint8 RGB HxWx3."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Deep greyscale: scale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white, like a slide viewer would, rather than keeping arbitrary RGB under alpha=0.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def array_to_rgb(frame: np.ndarray, name: str = "frame") -> np.ndarray:
    """Normalise an in-memory frame (grey, RGB, RGBA; uint8, uint16 or float in [0, 1]) to uint8 RGB."""
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"{name}: expected HxW, HxWx1, HxWx3 or HxWx4, got shape {frame.shape}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) * 255 + 32767) // 65535
        arr = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ImageDecodeError(f"{name}: float frame contains NaN or Inf")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageDecodeError(f"{name}: float frame must lie in [0, 1], got [{arr.min()}, {arr.max()}]")
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        raise ImageDecodeError(f"{name}: unsupported dtype {arr.dtype} (use uint8, uint16 or float)")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        rgb = arr[:, :, :3].astype(np.float32)
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = np.clip(rgb * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def decode_image(source: ImageSource, name: str | None = None) -> np.ndarray:
    """Decode a file path, encoded bytes or an array into uint8 RGB HxWx3 at its own size."""
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, name or "frame")
    if isinstance(source, (str, Path)):
        path = Path(source)
        label = name or str(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageDecodeError(f"{label}: cannot read ({exc.strerror})") from None
        if size > MAX_FILE_BYTES:
            raise ImageDecodeError(f"{label}: {size} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"{label}: cannot read ({exc.strerror})") from None
        return _pil_to_rgb_array(_open_image(data, label))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _pil_to_rgb_array(_open_image(bytes(source), name or "bytes"))
    raise TypeError(f"cannot decode a {type(source).__name__}; give a path, bytes or a numpy array")


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 RGB to (height, width) with Pillow's antialiased bilinear filter."""
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return np.ascontiguousarray(rgb)
    img = Image.fromarray(rgb, mode="RGB").resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_frame(source: ImageSource, height: int, width: int, name: str | None = None) -> np.ndarray:
    """Decode + RGB + resize: the model input for one frame, uint8 HxWx3."""
    return resize_rgb(decode_image(source, name), height, width)


def normalise(batch_uint8: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW normalised; the reference the in-graph normalisation must match."""
    x = batch_uint8.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
