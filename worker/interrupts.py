"""How Ctrl-C and SIGTERM reach a run with processes of its own: a local Dask cluster's workers
(worker.distributed), a DrawingPool's. A terminal's Ctrl-C reaches the whole process group,
those processes too; the run's own process alone should stop the run, and close them in order."""

from __future__ import annotations

import _thread
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


# what a terminal sends to every process of its group: Ctrl-C, and SIGHUP as it closes
TERMINAL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGHUP") if hasattr(signal, name))


@contextmanager
def children_deaf_to_the_terminal(signals: tuple[int, ...] = TERMINAL_SIGNALS) -> Iterator[None]:
    """Ctrl-C and a closed terminal (`signals`, of TERMINAL_SIGNALS) blocked in this thread
    meanwhile: the threads started from it, and the processes they spawn then or later (a local
    cluster's workers, restarted ones too; a DrawingPool's), inherit the mask, which survives
    exec, and so never see them while they boot (importing torch takes seconds); once they run,
    they ignore them (deaf_to_the_terminal). A pool's process hit as it booted died, and the run
    failed on a broken pool. Blocked here, a signal waits for the end of the block: keep it
    short, or leave SIGHUP out (a local cluster's start, which may hang). Not on Windows (no
    signal masks)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # Python's resource tracker, started with a pool's or a cluster's first process, unblocks
    # SIGINT in the thread that starts it: started before the mask is set, it leaves the mask alone
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def deaf_to_the_terminal() -> None:
    """This process, a cluster's worker or a pool's, ignores Ctrl-C and a closed terminal, and
    takes them off the mask it was spawned with (children_deaf_to_the_terminal): the run's own
    process stops the run and closes its workers in order. One held while it booted is dropped."""
    for signum in TERMINAL_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)


# SIGHUP (a terminal closed) stops a command as SIGTERM does (worker.cli): raised inside a write
# it came out as the write's error, unheld
STOPS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
HELD_AT_MOST_S = 15.0  # a start still running this long after a held stop is given up


class StoppedOnceDone(KeyboardInterrupt):
    """A stop held over work that then finished whole (worker.ann's swap): the command stops as
    asked (`stop`), and says what was `done`; it said "interrupted" alone, and a build whose new
    shortlist was in place looked failed."""

    def __init__(self, stop: KeyboardInterrupt, done: str) -> None:
        super().__init__(done)
        self.stop, self.done = stop, done


@contextmanager
def stops_held() -> Iterator[None]:
    """A Ctrl-C, SIGTERM or SIGHUP meanwhile is held, then handled as it would have been (a local
    cluster starting whole, then closed in order, rather than torn down half started); a second
    one, or the first once HELD_AT_MOST_S have passed, is handled at once: a start that hangs
    still stops. One did: a SIGTERM to the whole process group killed the booting workers, and
    Dask's start waited on them for ever. Only in the main thread, and only over handlers of
    Python's (not SIG_IGN or SIG_DFL)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {signum: signal.getsignal(signum) for signum in STOPS}
    handlers = {signum: handler for signum, handler in handlers.items() if callable(handler)}
    held: list[int] = []
    over = False
    waited: list[threading.Timer] = []

    def hold(signum: int, frame) -> None:
        if over or held:  # after the start, pressed again, or held long enough: as it would have been
            handlers[signum](signum, frame)
            return
        held.append(signum)
        # calls `hold` again once the main thread wakes (Dask's wait for its start does every 10 s)
        timer = threading.Timer(HELD_AT_MOST_S, _thread.interrupt_main, (signum,))
        timer.daemon = True
        timer.start()
        waited.append(timer)

    for signum in handlers:
        signal.signal(signum, hold)
    try:
        yield
    finally:  # a start that failed: the run stops as asked all the same, its error chained to it
        over = True
        for timer in waited:
            timer.cancel()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum in held:
            handlers[signum](signum, None)


@contextmanager
def ctrl_c_ignored() -> Iterator[None]:
    """Ctrl-C ignored while a local cluster closes (in the main thread, while Python's own
    handler is in place: not in a service's job threads, whose process stops otherwise). A
    second Ctrl-C broke the close off, and Dask's exit hook then waited 10 s for the cluster (a
    third printed its traceback); one as a run ended made a complete run say "interrupted".
    A run interrupted before stays interrupted; one that ended stands."""
    holds = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if holds:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if holds:
            signal.signal(signal.SIGINT, signal.default_int_handler)
