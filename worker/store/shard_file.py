"""One array of one shard (an .npy file), read by rows with its size checked on every read.

Shards are read with plain reads, not memory maps: a mapped file that shrinks under a running
worker (truncated by a full disk, a bad copy, a user) kills the process with SIGBUS on the next
access, while a read of a short file can say so. Every check fails with CorruptIndexError,
which tells the user to build the index again.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from worker.errors import CorruptIndexError


class ShardArray:
    """The header of `path` checked against the rows its manifest gives and the file's size."""

    def __init__(self, path: Path, rows: int):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                self.offset = f.tell()
        except (OSError, ValueError) as exc:
            raise self.corrupt(f"its header cannot be read ({str(exc)[:120]})") from None
        if fortran or dtype.hasobject or not shape or shape[0] != rows:
            raise self.corrupt(f"it holds {shape} {dtype} where the manifest says {rows} rows")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._check_size(os.stat(self.path).st_size)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def open_checked(self) -> int:
        """A file descriptor of the array's file, its size checked again (the caller closes it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise self.corrupt(f"it cannot be opened ({exc.strerror})") from None
        try:
            self._check_size(os.fstat(fd).st_size)
        except CorruptIndexError:
            os.close(fd)
            raise
        return fd

    def corrupt(self, why: str) -> CorruptIndexError:
        return CorruptIndexError(f"{self.path} is damaged: {why}; delete the index and build it again")

    def _check_size(self, size: int) -> None:
        if size != self.offset + self.nbytes:
            raise self.corrupt(f"it is {size} bytes where its header says {self.offset + self.nbytes} (truncated?)")

    def read_all(self) -> np.ndarray:
        return self.read_rows(np.arange(self.shape[0]))

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the array in the order asked (repeats allowed), each run of consecutive rows
        in one read."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.empty((0, *self.shape[1:]), self.dtype)
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"rows {rows.min()}..{rows.max()} outside {self.path} ({self.shape[0]} rows)")
        wanted = np.unique(rows)
        runs = np.split(wanted, np.nonzero(np.diff(wanted) != 1)[0] + 1)
        values = np.empty((len(wanted), *self.shape[1:]), self.dtype)
        flat = values.reshape(len(wanted), -1).view(np.uint8).reshape(len(wanted), self.row_bytes)
        fd = self.open_checked()
        try:
            done = 0
            for run in runs:
                length = len(run) * self.row_bytes
                data = os.pread(fd, length, self.offset + int(run[0]) * self.row_bytes)
                if len(data) != length:  # shrunk since the check
                    raise self.corrupt(f"a read of {length} bytes gave {len(data)} (truncated?)")
                flat[done:done + len(run)] = np.frombuffer(data, np.uint8).reshape(len(run), self.row_bytes)
                done += len(run)
        finally:
            os.close(fd)
        if len(wanted) == len(rows) and (wanted == rows).all():
            return values
        return values[np.searchsorted(wanted, rows)]
