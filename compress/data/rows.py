"""Rows of a uint8 (N, C, H, W) array in a .npy file, read on demand: the dataset that is not in memory.

`DiskRows` stands where a loader would put an in-memory array. Selecting with a numpy index
array (the val and test hold-outs) gives another view without reading anything; indexing with a
torch tensor, a slice or an int reads those rows and returns a uint8 tensor (a batch).

Rows are read with positioned reads (`os.preadv`) straight into the batch's buffer, not through
a memory map: pages of a mapped file count towards the reader's resident memory until the
kernel drops them, so an epoch over a mapped file would look like the whole data set in every
DataLoader worker. Read this way, resident memory holds the batches in flight; the kernel's page
cache keeps whatever of the file fits, as it would for any file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

READ_CHUNK = 256   # rows per read when scanning a whole view (histograms, fingerprints)


def write_header(path: Path, shape: tuple[int, ...]) -> int:
    """Create `path` as a .npy file of uint8 `shape` with its space reserved; the data offset.

    The space is allocated now (posix_fallocate), so a full disk fails here with ENOSPC rather
    than later in a worker, and never as a SIGBUS.
    """
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
        offset = f.tell()
        total = offset + int(np.prod(shape, dtype=np.int64))
        try:
            os.posix_fallocate(f.fileno(), 0, total)
        except OSError as exc:
            if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: a file system without it; size it instead
                raise
            f.truncate(total)
    return offset


def write_rows(path: Path, offset: int, start: int, x: np.ndarray) -> None:
    """Write rows `start`.. of the array in `path` (from `write_header`) from the uint8 array `x`."""
    data = memoryview(np.ascontiguousarray(x)).cast("B")
    row_bytes = int(np.prod(x.shape[1:], dtype=np.int64))
    fd = os.open(path, os.O_WRONLY)
    try:
        at, done = offset + start * row_bytes, 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], at + done)
    finally:
        os.close(fd)


class DiskRows:
    """A view of rows of an on-disk uint8 .npy array (see the module docstring for its two kinds of indexing).

    `base_histogram` ((C, 256) pixel counts over the whole file, from the cache manifest) lets
    `histogram()` of a view that keeps most rows count only the rows left out.
    """

    ndim = 4
    dtype = np.dtype(np.uint8)
    device = torch.device("cpu")

    def __init__(self, path: Path | str, rows: np.ndarray | None = None, base_histogram: np.ndarray | None = None):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise ValueError(f"{self.path}: not a uint8 (N, C, H, W) array ({dtype}, {shape})")
        self.base_shape = tuple(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64))
        if size < self.offset + shape[0] * self.row_bytes:
            raise ValueError(f"{self.path}: truncated ({size} bytes, the header promises "
                             f"{self.offset + shape[0] * self.row_bytes})")
        self.rows = np.arange(shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.base_histogram = base_histogram
        self._fd: int | None = None
        self._pid = -1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), *self.base_shape[1:])

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.row_bytes

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"DiskRows({self.path}, {self.shape})"

    def __getstate__(self) -> dict:   # a pickled view (DataLoader workers under spawn) opens its own file
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __getitem__(self, index) -> "DiskRows | torch.Tensor":
        if isinstance(index, np.ndarray):  # a selection: a view, nothing read
            return DiskRows._view(self, self.rows[index])
        if isinstance(index, slice):
            return torch.from_numpy(self._read(self.rows[index]))
        if isinstance(index, torch.Tensor):
            return torch.from_numpy(self._read(self.rows[index.cpu().numpy()]))
        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(self._read(self.rows[[index]]))[0]
        raise TypeError(f"DiskRows index: a numpy array (view), a torch tensor, a slice or an int, not {type(index)}")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self._read(self.rows)
        return x if dtype is None else x.astype(dtype)

    def _view(self, rows: np.ndarray) -> "DiskRows":
        view = object.__new__(DiskRows)
        view.__dict__.update(self.__getstate__())
        view.rows = rows
        return view

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # after a fork, a descriptor of our own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """The rows `rows` of the file, in that order; runs of consecutive rows in one read each."""
        out = np.empty((len(rows), *self.base_shape[1:]), dtype=np.uint8)
        if not len(rows):
            return out
        fd, flat = self._file(), out.reshape(len(rows), -1)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1])
        ends = np.append(starts[1:], len(rows))
        for a, b in zip(starts.tolist(), ends.tolist()):
            buf = memoryview(flat[a:b]).cast("B")
            at, done = self.offset + int(rows[a]) * self.row_bytes, 0
            while done < len(buf):
                n = os.preadv(fd, [buf[done:]], at + done)
                if n == 0:
                    raise OSError(f"{self.path}: file ended early (truncated while in use?)")
                done += n
        return out

    def chunks(self, size: int = READ_CHUNK):
        """The view's rows in order, `size` rows at a time (uint8 numpy arrays)."""
        for start in range(0, len(self.rows), size):
            yield self._read(self.rows[start:start + size])

    def histogram(self) -> np.ndarray:
        """(C, 256) int64 pixel counts per channel of the rows in this view."""
        n = self.base_shape[0]
        if self.base_histogram is not None and len(self.rows) > n // 2:  # count the rows left out, subtract
            mask = np.ones(n, dtype=bool)
            mask[self.rows] = False
            return self.base_histogram - self._view(np.flatnonzero(mask)).histogram()
        hist = np.zeros((self.base_shape[1], 256), dtype=np.int64)
        for x in self.chunks():
            hist += pixel_histogram(x)
        return hist


def pixel_histogram(x: np.ndarray) -> np.ndarray:
    """(C, 256) int64 counts of each uint8 value per channel of (N, C, H, W) images."""
    return np.stack([np.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])]).astype(np.int64)
