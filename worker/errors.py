"""Errors a user can act on. Anything raised as InputError (or a subclass) is reported as one
clear line (CLI exit code 2, or an error reply with its code over ZeroMQ); anything else is a bug.
The codes themselves are the wire's (wire.errors), named there once."""

from __future__ import annotations

import errno
import os

from wire import errors as codes
from wire.errors import ProtocolError

# what to do about a write the disk refused (worker.store.format.disk_write)
STORAGE_ADVICE = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your quota on that disk, or have it raised",
    errno.EROFS: "the disk is mounted read-only: mount it writable, or keep the index on another disk",
    errno.EIO: "the disk failed a read or write: check it (dmesg, smartctl) or keep the index on another disk",
    errno.EFBIG: "the file is larger than that file system, or the worker's file size limit (ulimit -f), allows: "
                 "keep the index on a file system that takes larger files, or raise the limit",
    errno.ENOENT: "nothing can be written in that folder (a system folder such as /proc), or it was removed "
                  "meanwhile: write elsewhere",
    **dict.fromkeys((errno.EACCES, errno.EPERM),
                    "the worker may not write there: give the user it runs as write access to that folder"),
}
# what the kernel says when a disk is full, read-only or failing, or a file too large for it,
# wherever it is raised: the operator's to fix, not a bug (no access is a storage error only
# where the worker writes, as is a folder that takes no files: worker.store.format.disk_write)
STORAGE_ERRNOS = frozenset(STORAGE_ADVICE) - {errno.EACCES, errno.EPERM, errno.ENOENT}


def errno_named_in(text: str) -> int | None:
    """The error number whose words end a library's message in brackets, as FAISS ends its
    write errors ("write error in ...: 410677 != 456192 (File too large)"); None when none do."""
    return next((number for number in STORAGE_ADVICE if f"({os.strerror(number)})" in text), None)


def storage_advice(error: OSError) -> str:
    """What to do about a write the disk refused. Where the error says not why (numpy's short
    write, "N requested and M written"; GDAL's words for a full disk, which are SQLite's), a
    file size limit set on the worker, else a full disk, the likeliest cause."""
    if error.errno in STORAGE_ADVICE:
        return STORAGE_ADVICE[error.errno]
    limit = _file_size_limit() if error.errno is None else None
    if limit is not None:
        return (f"the worker's file size limit is {limit:,} bytes (`ulimit -f` {limit // 1024}): raise it, or free "
                "space on that disk if it is full")
    return "free space on that disk (or fix it)"


def _file_size_limit() -> int | None:
    """The worker's file size limit in bytes (ulimit -f), None when it has none."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


MAX_SAID = 5  # findings named in a one-line message of several; the rest counted


def numbered(said: list[str], between: str = " ") -> str:
    """Several findings in one line (refused rasters, rasters not read whole): the first
    MAX_SAID numbered, the rest counted; one alone as it is."""
    if len(said) == 1:
        return said[0]
    more = f"; and {len(said) - MAX_SAID} more" if len(said) > MAX_SAID else ""
    return between.join(f"({n}) {one}" for n, one in enumerate(said[:MAX_SAID], 1)) + more


class InputError(Exception):
    """Bad input from the user: a file, a raster, a sketch, a flag or a message."""

    code = codes.BAD_INPUT


class IndexMismatchError(InputError):
    """An index of another format, or built with another model or other tile settings."""

    code = codes.INDEX_MISMATCH


class NotFoundError(InputError):
    """A named index, job or file that does not exist."""

    code = codes.NOT_FOUND


class ForbiddenError(InputError):
    """A path outside the roots a worker serves, or a file or address its clients may not read."""

    code = codes.FORBIDDEN


class CorruptIndexError(InputError):
    """An index whose files are damaged (truncated, overwritten): indexing its rasters again
    makes its shards and level maps again (worker.store.writer); a damaged manifest cannot be."""

    code = codes.CORRUPT_INDEX


# how a raster gone for good is taken out of an index: the plugin says it in the dock, a message of
# the worker named the command line alone
REMOVE_HOW = "the plugin's Remove rasters…, or on the worker's machine: python -m worker remove INDEX RASTER"


class RasterUnreadable(InputError):
    """An indexed raster that cannot be read now (moved, deleted, an unplugged drive, damaged
    since it was indexed). A search leaves it out and says so (worker.search), and the places
    the user marked in it (worker.query_search.describe_readable)."""

    code = codes.NOT_FOUND

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} cannot be read ({reason}): moved, deleted or damaged since it was indexed; "
                         "put it back, index it again, or, gone for good, take it out of the index "
                         f"({REMOVE_HOW})")
        self.path, self.reason = path, reason


class PlaceUnreadable(RasterUnreadable):
    """A place of a raster that opens, whose pixels there cannot be read: a damaged block, or a
    mosaic's sheet moved, deleted or damaged. A search leaves out that place, not the raster: one
    sheet missing left a whole mosaic out of every search. Where it is not caught as such, the
    raster is left out, as for RasterUnreadable."""

    def __init__(self, path: str, reason: str):
        InputError.__init__(self, f"{path}: a place of it cannot be read ({reason}); {PLACE_UNREADABLE_HOW}")
        self.path, self.reason = path, reason


# what to do about places of a raster that cannot be read (PlaceUnreadable; a search's unread_places)
PLACE_UNREADABLE_HOW = ("a mosaic's sheet gone: put it back, or build the VRT again without it (gdalbuildvrt) and index "
                        "that; a damaged file: restore it from a backup")


class RasterReadError(InputError):
    """Tiles of a raster that cannot be read while it is indexed: a damaged block, a file cut
    short, gone or unplugged since the run opened it. The run leaves that chunk out, indexes the
    others, and says so at its end (worker.store.writer.UnreadRasters); the next run tries the
    chunk again. Pickled by its two arguments: it comes back from drawing processes and cluster
    workers."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path

    def __reduce__(self):
        return type(self), (self.path, str(self))


class StorageError(InputError):
    """The disk refused a write (full, read-only, failing) or a read (failing): the operator frees
    space or fixes it."""

    code = codes.STORAGE


def error_object(exc: Exception) -> dict:
    """What a client is told about an exception ({"code", "message"}, as in an error reply or a
    failed job); anything that is neither bad input, a refused request nor a disk that failed
    is `internal`, a bug."""
    if isinstance(exc, ProtocolError):
        return {"code": exc.code, "message": exc.message}
    if isinstance(exc, InputError):
        return {"code": exc.code, "message": str(exc)}
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        where = f" ({exc.filename})" if exc.filename else ""
        return {"code": codes.STORAGE, "message": f"the worker's disk failed{where}: {exc.strerror}; "
                                                  f"{storage_advice(exc)}, then try again"}
    return {"code": codes.INTERNAL, "message": f"{type(exc).__name__}: {str(exc)[:300]}"}
