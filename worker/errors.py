"""Errors a user can act on. Anything raised as InputError (or a subclass) is reported as one
clear line (CLI exit code 2, or an error reply with its code over ZeroMQ); anything else is a bug.
The codes themselves are the wire's (wire.errors), named there once."""

from __future__ import annotations

import errno

from wire import errors as codes
from wire.errors import ProtocolError

# what the kernel says when a disk is full, read-only or failing: the operator's to fix, not a bug
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


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
    """An index whose files are damaged (truncated, unreadable): delete it and build it again."""

    code = codes.CORRUPT_INDEX


class RasterUnreadable(InputError):
    """An indexed raster that cannot be read now (moved, deleted, an unplugged drive, damaged
    since it was indexed). A search leaves it out and says so (worker.search); a place the user
    marked in it is refused with this."""

    code = codes.NOT_FOUND

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} cannot be read ({reason}): moved, deleted or damaged since it was indexed; "
                         "put it back, or index it again")
        self.path, self.reason = path, reason


class StorageError(InputError):
    """The disk refused a write (full, read-only, failing): the operator frees space or fixes it."""

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
        return {"code": codes.STORAGE, "message": f"the worker's disk failed{where}: {exc.strerror}; free space or "
                                                  "fix the disk, then try again"}
    return {"code": codes.INTERNAL, "message": f"{type(exc).__name__}: {str(exc)[:300]}"}
