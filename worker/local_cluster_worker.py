"""Set-up of a local cluster's worker processes, run by Dask in each as it starts (a preload:
`dask_setup`), restarted ones too.

A worker told to close while its chunk holds it (the model loading, a batch encoding) logged
"Failed to communicate with scheduler during heartbeat" at ERROR, with two chained tracebacks:
its own heartbeat, cut off by its own close. Ctrl-C in the first seconds of a run printed some
30 such lines around the one that says the run was interrupted. A heartbeat that fails while
the worker runs is still said.
"""

from __future__ import annotations

import logging

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"


def dask_setup(worker) -> None:
    from distributed.core import Status

    closing = (Status.closing, Status.closing_gracefully, Status.closed)

    def said(record: logging.LogRecord) -> bool:
        return not (worker.status in closing and record.getMessage().startswith(HEARTBEAT_FAILED))

    logging.getLogger("distributed.worker").addFilter(said)
