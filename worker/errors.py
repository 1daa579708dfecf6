"""Errors a user can act on. Anything raised as InputError is reported as one clear line
(CLI exit code 2, or an error reply with its code over ZeroMQ); anything else is a bug.
The codes themselves are the wire's (wire.errors), named there once."""

from __future__ import annotations

from wire import errors as codes
from wire.errors import ProtocolError


class InputError(Exception):
    """Bad input from the user: a file, a raster, a sketch, a flag or a message."""

    code = codes.BAD_INPUT


class IndexMismatchError(InputError):
    """An index of another format, or built with another model or other tile settings."""

    code = codes.INDEX_MISMATCH


class NotFoundError(InputError):
    """A named index, job or file that does not exist."""

    code = codes.NOT_FOUND


def error_object(exc: Exception) -> dict:
    """What a client is told about an exception ({"code", "message"}, as in an error reply or a
    failed job); anything that is neither bad input nor a refused request is `internal`, a bug."""
    if isinstance(exc, ProtocolError):
        return {"code": exc.code, "message": exc.message}
    if isinstance(exc, InputError):
        return {"code": exc.code, "message": str(exc)}
    return {"code": codes.INTERNAL, "message": f"{type(exc).__name__}: {exc}"}
