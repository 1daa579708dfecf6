"""Set-up of a local cluster's worker processes, run by Dask in each as it starts (a preload:
`dask_setup`), restarted ones too; and the logging filter they share with the run's own
process (worker.distributed.connect)."""

from __future__ import annotations

import logging

from worker.interrupts import deaf_to_the_terminal

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"
COMM_CLOSED = "Batched Comm Closed"


def dask_setup(worker) -> None:
    """The worker ignores Ctrl-C and a closed terminal: the run's own process stops the run and
    closes the workers in order (worker.interrupts; a Ctrl-C sent while it booted was held by its mask).

    A worker told to close while its chunk holds it (the model loading, a batch encoding) logged
    the heartbeat its own close cut off, at ERROR with two chained tracebacks: Ctrl-C early in a
    run printed some 30 such lines around the one that says the run was interrupted. A heartbeat
    that fails while the worker runs is still said."""
    from distributed.core import Status

    deaf_to_the_terminal()  # run on the worker's main thread, before it registers
    closing = (Status.closing, Status.closing_gracefully, Status.closed)

    def not_a_closing_heartbeat(record: logging.LogRecord) -> bool:
        return not (worker.status in closing and record.getMessage().startswith(HEARTBEAT_FAILED))

    logging.getLogger("distributed.worker").addFilter(not_a_closing_heartbeat)
    closed_comms_without_traceback()


def closed_comms_without_traceback() -> None:
    """A worker and its scheduler closing at once (every local cluster's end) can close their
    connection under a message being sent, and Dask says so at INFO with the CommClosedError's
    traceback: 15 lines in a `-v` log for a normal close. The line stays; its traceback goes.
    Run in every process of a cluster run (adding the filter again does nothing)."""
    logging.getLogger("distributed.batched").addFilter(_without_a_closed_comm_s_traceback)


def _without_a_closed_comm_s_traceback(record: logging.LogRecord) -> bool:
    if record.getMessage().startswith(COMM_CLOSED):
        record.exc_info, record.exc_text = None, None
    return True
