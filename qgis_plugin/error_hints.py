"""What a user can do about each error the worker answers with, or a client meets: said once for
the dock and for Processing."""

from __future__ import annotations

from .wire import errors as codes
from .wire.errors import WorkerError

HINTS = {codes.UNAVAILABLE: "Is the worker running? Start it or check the endpoint.",
         codes.INDEX_MISMATCH: "Build a new index with this worker's model.",
         codes.BAD_INPUT: "Check the sketch or rasters.",
         codes.FORBIDDEN: "The worker does not serve that path.",
         codes.BUSY: "The worker is busy (an index's job, another program writing the index, or searches "
                     "queued): wait for them, or cancel the job, and try again.",
         codes.UNKNOWN_OP: "The worker is older than this plugin: update it (set it up again) to do this."}
NO_HINT = "See the log panel for details."


def told(err: WorkerError) -> str:
    """The error's message as a sentence, and what to do about it."""
    said = err.message if err.message.rstrip().endswith((".", "!", "?")) else f"{err.message.rstrip()}."
    return f"{said} {HINTS.get(err.code, NO_HINT)}"
