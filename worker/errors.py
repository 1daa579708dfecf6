"""Errors a user can act on. Anything raised as InputError is reported as one clear line
(CLI exit code 2, or an error reply with its code over ZeroMQ); anything else is a bug."""


class InputError(Exception):
    """Bad input from the user: a file, a raster, a sketch, a flag or a message."""

    code = "bad_input"


class IndexMismatchError(InputError):
    """An index built with another model or other tile settings than the ones asked for."""

    code = "index_mismatch"


class NotFoundError(InputError):
    """A named index, job or file that does not exist."""

    code = "not_found"
