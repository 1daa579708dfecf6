"""One array of one shard (an .npy file), read by rows with its size checked on every read.

Shards are read with plain reads, not memory maps: a mapped file that shrinks under a running
worker (truncated by a full disk, a bad copy, a user) kills the process with SIGBUS on the next
access, while a read of a short file can say so. Every check fails with CorruptIndexError,
which tells the user to index the rasters again: the run makes again what the damage lost.
"""

from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from worker.errors import STORAGE_ERRNOS, CorruptIndexError, InputError, StorageError
from worker.store.format import RECORD_DTYPE


# what a damaged shard or level map asks of the user: worker.store.writer repairs both
REPAIR = ("index its rasters into the index again: the run computes again what was lost (or delete the index and "
          "build it again)")
MAX_HEADER = 10_000  # bytes of an .npy header, as numpy reads them by default


class DamagedFile(CorruptIndexError):
    """A shard's or level map's file that does not hold what the index says: an index run makes
    it again (worker.store.writer), and says `what` was damaged while it does."""

    def __init__(self, what: str):
        super().__init__(f"{what}; {REPAIR}")
        self.what = what


@lru_cache(maxsize=1024)
def _parsed_header(version: tuple[int, int], header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """An .npy header (its length field and text) parsed once: the shards of an index share a
    few headers, and parsing each (numpy's literal_eval) was 45% of opening 10,000 shards."""
    field = io.BytesIO(header)
    return (np.lib.format.read_array_header_1_0(field) if version == (1, 0)
            else np.lib.format.read_array_header_2_0(field))


class ShardArray:
    """The header of `path` checked against the rows its manifest gives and the file's size."""

    def __init__(self, path: Path | str, rows: int):
        self.path = os.fspath(path)  # a str: pathlib's parsing was a quarter of opening 10,000 shards
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                length_field = f.read(2 if version == (1, 0) else 4)
                length = int.from_bytes(length_field, "little")
                if length > MAX_HEADER:
                    raise ValueError(f"a header of {length} bytes")
                shape, fortran, dtype = _parsed_header(version, length_field + f.read(length))
                self.offset = f.tell()
                # of the file opened: one deleted meanwhile (an index deleted under a search)
                # failed os.stat(path) with a FileNotFoundError no one caught
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise self.corrupt("it is missing") from None
        except OSError as exc:  # no access, a failing disk: not damage, nothing to make again
            raise self.unreadable(exc) from None
        except ValueError as exc:
            raise self.corrupt(f"its header cannot be read ({str(exc)[:120]})") from None
        if fortran or dtype.hasobject or not shape or shape[0] != rows:
            raise self.corrupt(f"it holds {shape} {dtype} where the manifest says {rows} rows")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self._check_size(size)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def open_checked(self) -> int:
        """A file descriptor of the array's file, its size checked again (the caller closes it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise self.corrupt("it is missing") from None
        except OSError as exc:
            raise self.unreadable(exc) from None
        try:
            self._check_size(os.fstat(fd).st_size)
        except CorruptIndexError:
            os.close(fd)
            raise
        return fd

    def corrupt(self, why: str) -> DamagedFile:
        return DamagedFile(f"{self.path} is damaged: {why}")

    def unreadable(self, exc: OSError) -> InputError:
        """A file that is there and cannot be read now: a storage error on a failing disk, else
        bad input (no access); never damage, which an index run would make again."""
        kind = StorageError if exc.errno in STORAGE_ERRNOS else InputError
        return kind(f"{self.path} cannot be read now ({exc.strerror}): the index is left as it is; make it readable "
                    "and try again")

    def require_dtype(self, dtype: np.dtype, what: str) -> None:
        """CorruptIndexError unless the array holds `dtype` (`what` it holds: the tile records)."""
        if self.dtype != dtype:
            raise self.corrupt(f"its {what} are {self.dtype}, not of this format")

    def _check_size(self, size: int) -> None:
        if size != self.offset + self.nbytes:
            raise self.corrupt(f"it is {size} bytes where its header says {self.offset + self.nbytes} (truncated?)")

    def read_all(self, out: np.ndarray | None = None) -> np.ndarray:
        """The whole array, into `out` (of its shape and dtype) when given."""
        values = np.empty(self.shape, self.dtype) if out is None else out
        if values.shape != self.shape or values.dtype != self.dtype:
            raise self.corrupt(f"it holds {self.shape} {self.dtype} where {values.shape} {values.dtype} was expected")
        fd = self.open_checked()
        try:
            self._read_into(fd, values.reshape(-1).view(np.uint8), self.offset)
        finally:
            os.close(fd)
        return values

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
                self._read_into(fd, flat[done:done + len(run)].reshape(-1), self.offset + int(run[0]) * self.row_bytes)
                done += len(run)
        finally:
            os.close(fd)
        if len(wanted) == len(rows) and (wanted == rows).all():
            return values
        return values[np.searchsorted(wanted, rows)]

    def _read_into(self, fd: int, buffer: np.ndarray, offset: int) -> None:
        """Fill a flat uint8 array from the file at `offset`, in as many reads as it takes: one
        read gives at most 2 GiB on Linux, so a larger run of rows (a wide level map read whole)
        was taken for a truncated file."""
        view = memoryview(buffer)
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:  # shrunk since the check
                raise self.corrupt(f"a read of {len(view)} bytes gave {done} (truncated?)")
            done += got


def committed_array(shards_dir: str, shard: dict, key: str) -> ShardArray:
    """One array of a committed shard (its manifest entry), its header, rows and size checked, and
    the records' dtype: how an opened index (worker.store.reader) and an index run's check for
    damage (worker.store.writer) find a shard's arrays."""
    array = ShardArray(f"{shards_dir}/{shard['name']}/{key}.npy", shard["count"])
    if key == "records":
        array.require_dtype(RECORD_DTYPE, "records")
    return array
