"""Stopping a search that is no longer wanted: its time limit passed, its client cancelled it, or the
worker is stopping.

The service runs each search under `stop_when(should_stop)`, and code on the search's path calls
`raise_if_stopped(stage)` between its stages: that raises SearchStopped once `should_stop()`
says so, and the search's thread is free for the next request. Outside the service (the CLI,
tests) nothing is set and the call costs a lookup. A context variable carries the callable, so
the search functions keep their signatures; it holds in the thread that set it (a search that
hands work to another thread passes `current_stop()` along).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

from wire import errors as codes
from worker.errors import InputError

StopCheck = Callable[[], bool]
_should_stop: ContextVar[StopCheck | None] = ContextVar("should_stop", default=None)
_told_why_slow: ContextVar[Callable[[str], None] | None] = ContextVar("told_why_slow", default=None)


class SearchStopped(InputError):
    """The search ran past its time limit (or the worker is stopping) and was stopped between stages."""

    code = codes.TIMEOUT

    def __init__(self, stage: str, message: str | None = None):
        super().__init__(message or f"search stopped before {stage}: it ran past the worker's time limit; search "
                                    "a smaller area or ask the operator for a longer --search-timeout")
        self.stage = stage  # what would have come next, for the worker's log

    def __reduce__(self):  # an exception is pickled with its args (the message alone)
        return type(self), (self.stage, str(self))


@contextmanager
def stop_when(should_stop: StopCheck | None) -> Iterator[None]:
    """Within this block, raise_if_stopped() raises once `should_stop()` is true."""
    token = _should_stop.set(should_stop)
    try:
        yield
    finally:
        _should_stop.reset(token)


def current_stop() -> StopCheck | None:
    """The stop check in force in this thread (None outside a service search)."""
    return _should_stop.get()


def raise_if_stopped(stage: str) -> None:
    """Call between the stages of a search: SearchStopped when its time is up. `stage` names
    what would come next, for the worker's log."""
    should_stop = _should_stop.get()
    if should_stop is not None and should_stop():
        raise SearchStopped(stage)


@contextmanager
def telling_why_slow(tell: Callable[[str], None]) -> Iterator[None]:
    """Within this block, say_why_slow(why) calls `tell(why)`: the service keeps it for the
    `timeout` it may answer the search with."""
    token = _told_why_slow.set(tell)
    try:
        yield
    finally:
        _told_why_slow.reset(token)


def say_why_slow(why: str) -> None:
    """Tell whoever answers this search at its time limit what made it slower than it could be
    (an exact scan of an index whose shortlist is missing or out of date, which at 10M tiles runs
    past any limit: its `timeout` said only to search a smaller area). Outside a service search,
    nothing."""
    tell = _told_why_slow.get()
    if tell is not None:
        tell(why)
