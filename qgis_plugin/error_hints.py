"""What a user can do about each error the worker answers with, or a client meets: said once for
the dock and for Processing."""

from __future__ import annotations

from .wire import errors as codes
from .wire.errors import WorkerError

# only where the worker's message cannot say it: it says what to do of bad input, a mismatched or
# damaged index, a full disk; a hint keyed on the code alone was wrong for most of them ("Check the
# sketch or rasters." after tile settings out of range)
HINTS = {codes.UNAVAILABLE: "Is the worker running? Start it or check the endpoint.",
         codes.FORBIDDEN: "The worker does not serve that path.",
         codes.BUSY: "The worker is busy (an index's job, another program writing the index, or searches "
                     "queued): wait for them, or cancel the job, and try again.",
         codes.UNKNOWN_OP: "The worker is older than this plugin: update it (set it up again) to do this.",
         codes.INTERNAL: "This is a bug in the worker: its log says more."}


def told(err: WorkerError) -> str:
    """The error's message as a sentence, and what to do about it where the message cannot say."""
    said = err.message if err.message.rstrip().endswith((".", "!", "?")) else f"{err.message.rstrip()}."
    return f"{said} {HINTS[err.code]}" if err.code in HINTS else said
