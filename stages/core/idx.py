"""The IDX format of MNIST-style files: gzip-compressed, big-endian header, uint8 payload."""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

from stages.core.common import StageError
from stages.core.dataset import IMAGE_SHAPE

IMAGE_MAGIC = 0x00000803  # uint8, 3 dimensions: (N, rows, cols)
LABEL_MAGIC = 0x00000801  # uint8, 1 dimension: (N,)


class IdxError(StageError):
    """An IDX file is corrupt or not what its name promises."""


def decompress(path: Path) -> bytes:
    """Return the decompressed bytes of a gzip file, or raise IdxError naming the file."""
    try:
        return gzip.decompress(Path(path).read_bytes())
    except EOFError:
        raise IdxError(f"{path.name}: truncated gzip (the download was cut short)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise IdxError(f"{path.name}: not a valid gzip file ({exc})") from None


def sha256(data: bytes) -> str:
    """Return the hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Return the array in decompressed IDX bytes: (N, 28, 28) images or (N,) labels, uint8."""
    is_images = "images" in name
    expected_magic, ndim = (IMAGE_MAGIC, 3) if is_images else (LABEL_MAGIC, 1)
    header_size = 4 + 4 * ndim
    if len(data) < 4:
        raise IdxError(f"{name}: only {len(data)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise IdxError(
            f"{name}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images' if is_images else 'labels'} file)"
        )
    if len(data) < header_size:
        raise IdxError(f"{name}: only {len(data)} bytes, too short for an IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if is_images and shape[1:] != IMAGE_SHAPE:
        raise IdxError(
            f"{name}: wrong image dimensions {shape[1]}x{shape[2]}, expected "
            f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}"
        )
    expected_bytes = header_size + int(np.prod(shape))
    if len(data) != expected_bytes:
        raise IdxError(
            f"{name}: header promises {shape[0]} items ({expected_bytes} bytes), "
            f"file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """Return the array stored in a gzip IDX file."""
    path = Path(path)
    return parse_idx(decompress(path), path.name)
