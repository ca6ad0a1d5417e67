"""Frame sources for the CASA client: files, folders, globs, a video, a ``.npy`` stream, an iterator.

Every source yields :class:`Frame` objects in a deterministic order with a stable id:

* an image file: its path as given (folders are walked recursively, names sorted);
* a video: ``<path>#frame=<n>`` (n counts from 0);
* a ``.npy`` stream (stdin) or a Python iterator of arrays: ``<name>#<index>@<unix time>``; the
  part before ``@`` is the stable key used by ``--resume`` (see :func:`resume_key`).

A frame carries its *payload*, not pixels: a path (decoded later in a worker pool) or an array.
Nothing here decodes images, so listing a large folder is cheap and a corrupt file only fails when
the worker decodes it (and then becomes an error record).
"""

from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Union

import numpy as np

from morphocam.preprocess import IMAGE_SUFFIXES

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv")
STREAM_PREFIXES = ("stdin#", "stream#")

Payload = Union[str, Path, np.ndarray, bytes]


@dataclass(frozen=True)
class Frame:
    """One frame to classify: a stable id and what to decode (a path, encoded bytes or an array)."""

    id: str
    payload: Payload
    error: str | None = None  # set when the source itself could not produce the frame

    @property
    def key(self) -> str:
        return resume_key(self.id)


def resume_key(frame_id: str) -> str:
    """The part of a frame id that is stable across runs (stream ids drop their ``@timestamp``)."""
    if frame_id.startswith(STREAM_PREFIXES) and "@" in frame_id:
        return frame_id.rsplit("@", 1)[0]
    return frame_id


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _walk_folder(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if is_image_file(p):
                found.append(p)
    return sorted(found, key=lambda p: p.as_posix())


def video_frames(path: Union[str, Path]) -> Iterator[Frame]:
    """Frames of a video file through OpenCV, converted to RGB, id ``<path>#frame=<n>``."""
    import cv2

    path = Path(path)
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        yield Frame(f"{path}#frame=0", b"", error=f"{path}: cannot open as a video")
        return
    try:
        index = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            yield Frame(f"{path}#frame={index}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        cap.release()


def read_video_frame(path: Union[str, Path], index: int) -> np.ndarray:
    """One RGB frame of a video by index (used to reload frames named by id, e.g. for explanations)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"{path}: cannot open as a video")
        cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, bgr = cap.read()
        if not ok:
            raise ValueError(f"{path}: has no frame {index}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


class _ReadOnly:
    """Hide the real file object so numpy reads through ``read()`` (works on pipes)."""

    def __init__(self, fh: BinaryIO):
        self._fh = fh

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self._fh.read()
        chunks = []
        while n > 0:
            chunk = self._fh.read(n)
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)


def npy_stream_frames(stream: BinaryIO, name: str = "stdin", clock=time.time) -> Iterator[Frame]:
    """Frames from concatenated ``.npy`` arrays (``np.save`` called repeatedly on one stream).

    Each array is one frame (HxW, HxWxC) or a batch (NxHxWxC). Ids: ``<name>#<index>@<time>``.
    """
    reader = _ReadOnly(stream)
    index = 0
    while True:
        try:
            magic = reader.read(6)
            if not magic:
                return
            rest = reader.read(2)
            if magic != b"\x93NUMPY" or len(rest) != 2:
                yield Frame(f"{name}#{index}@{clock():.6f}", b"", error=f"{name}: not a .npy stream at frame {index}")
                return
            version = (rest[0], rest[1])
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(reader)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(reader)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            if dtype.hasobject:
                raise ValueError("object arrays are refused")
            count = int(np.prod(shape)) if shape else 1
            data = reader.read(count * dtype.itemsize)
            if len(data) != count * dtype.itemsize:
                yield Frame(f"{name}#{index}@{clock():.6f}", b"", error=f"{name}: stream ended inside frame {index}")
                return
            arr = np.frombuffer(data, dtype=dtype)
            arr = arr.reshape(shape, order="F" if fortran else "C")
        except ValueError as exc:
            yield Frame(f"{name}#{index}@{clock():.6f}", b"", error=f"{name}: bad .npy data at frame {index} ({exc})")
            return
        frames = arr if arr.ndim == 4 else [arr]
        for frame in frames:
            yield Frame(f"{name}#{index}@{clock():.6f}", np.ascontiguousarray(frame))
            index += 1


def iterator_frames(arrays: Iterable, name: str = "stream", clock=time.time) -> Iterator[Frame]:
    """Wrap a Python iterator for :func:`morphocam.clients.streaming.classify_frames`.

    Items may be :class:`Frame` objects (passed through), ``(id, array_or_path)`` pairs, paths,
    or bare arrays/encoded bytes (id ``<name>#<index>@<time>``).
    """
    for index, item in enumerate(arrays):
        if isinstance(item, Frame):
            yield item
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            yield Frame(item[0], item[1])
        elif isinstance(item, (str, Path)):
            yield Frame(str(item), item)
        else:
            yield Frame(f"{name}#{index}@{clock():.6f}", item)


def expand_inputs(inputs: Iterable[str], stdin: BinaryIO | None = None) -> Iterator[Frame]:
    """Frames for command-line inputs in order: files, folders, globs, videos, ``-`` (npy on stdin)."""
    for text in inputs:
        if text == "-":
            yield from npy_stream_frames(stdin if stdin is not None else sys.stdin.buffer, "stdin")
            continue
        path = Path(text)
        if path.is_dir():
            yield from (Frame(str(p), str(p)) for p in _walk_folder(path))
        elif path.is_file() or path.exists():
            if is_video_file(path):
                yield from video_frames(path)
            else:
                # Named explicitly: try to decode whatever it is (an unknown type gives an error record).
                yield Frame(str(path), str(path))
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            for m in matches:
                p = Path(m)
                if p.is_file() and is_image_file(p):
                    yield Frame(str(p), str(p))
                elif p.is_file() and is_video_file(p):
                    yield from video_frames(p)
        else:
            yield Frame(str(path), str(path), error=f"{path}: no such file or folder")


def count_inputs(inputs: Iterable[str]) -> int | None:
    """Number of frames the inputs give, when knowable without decoding (None for videos/stdin)."""
    total = 0
    for text in inputs:
        path = Path(text)
        if text == "-":
            return None
        if path.is_dir():
            total += len(_walk_folder(path))
        elif path.is_file():
            if is_video_file(path):
                return None
            total += 1
        elif glob.has_magic(text):
            for m in glob.glob(text, recursive=True):
                p = Path(m)
                if p.is_file() and is_video_file(p):
                    return None
                total += int(p.is_file() and is_image_file(p))
        else:
            total += 1
    return total


def reload_frame(frame_id: str) -> Payload:
    """Turn a frame id from a results file back into something decodable (file or video frame)."""
    if frame_id.startswith(STREAM_PREFIXES):
        raise ValueError(f"{frame_id}: frames from a live stream cannot be reloaded by id")
    if "#frame=" in frame_id:
        path, _, index = frame_id.rpartition("#frame=")
        return read_video_frame(path, int(index))
    return frame_id
