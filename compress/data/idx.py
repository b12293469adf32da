"""The IDX format of MNIST-style datasets (LeCun et al., http://yann.lecun.com/exdb/mnist/), plain or .gz.

A file is two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
dimension, then the data (big-endian) and nothing else. The length must match the header
exactly: a short file is reported as truncated, never half-read.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from compress.data.module import DataError
from compress.io import atomic_write_bytes

# type code -> numpy dtype (multi-byte types are big-endian on disk)
DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
          0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IMAGES_MAGIC = 0x00000803   # uint8, 3 dims (N, H, W)
LABELS_MAGIC = 0x00000801   # uint8, 1 dim (N,)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's content, gunzipped when the name ends in .gz."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if path.suffix != ".gz":
        return data
    # zlib directly: faster than the gzip module, and it tells a truncated stream from a bad one
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data) + inflater.flush()
    except zlib.error as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc})") from None
    if not inflater.eof:
        raise DataError(f"{path}: truncated gzip file ({len(data)} bytes; the stream ends early)")
    return out


def parse_idx(data: bytes, path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Parse IDX bytes (read from `path`, named in errors); `magic` pins type and rank."""
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    found = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if magic is not None and found != magic:
        raise DataError(f"{path}: bad IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    if data[:2] != b"\0\0" or code not in DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic 0x{found:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, header needs {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected:
        raise DataError(f"{path}: truncated IDX file: header says shape {dims} ({expected} bytes), "
                        f"file has {len(data)} bytes")
    if len(data) > expected:
        raise DataError(f"{path}: {len(data) - expected} unexpected bytes after the IDX data of shape {dims}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: str | os.PathLike, magic: int | None = None, md5: str | None = None) -> np.ndarray:
    """Read an IDX file (plain or .gz); optionally check the MD5 of its decompressed bytes."""
    data = read_bytes(path)
    array = parse_idx(data, path, magic)
    if md5 is not None and (digest := hashlib.md5(data).hexdigest()) != md5:
        raise DataError(f"{path}: checksum mismatch (MD5 of the decompressed data is {digest}, expected {md5}); "
                        f"the file is corrupt or not the expected dataset")
    return array


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike,
                  md5: tuple[str | None, str | None] = (None, None)) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from an MNIST-style pair of IDX files."""
    images = read_idx(images_path, IMAGES_MAGIC, md5[0])
    labels = read_idx(labels_path, LABELS_MAGIC, md5[1])
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels, but {images_path} has {len(images)} images")
    return images[:, None], labels.astype(np.int64)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write `array` as an IDX file (gzipped when the name ends in .gz), atomically."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of {sorted(str(d) for d in codes)}")
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
    if Path(path).suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    return atomic_write_bytes(path, data)
