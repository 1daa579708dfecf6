"""Thread pools started once per process and shared by every search and run (worker.verify, worker.ann,
worker.line_drawing, worker.drawing_pool), and the cores they may use."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

_pools: dict[str, tuple[ThreadPoolExecutor, int]] = {}  # name: the pool, its threads
_lock = threading.Lock()


def shared_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """The process's pool called `name`, started with `threads` threads at its first use; asked
    with another number later, a ValueError (a comparison of thread counts in one process would
    otherwise measure the first count every time)."""
    with _lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=name), threads
        pool, started_with = _pools[name]
        if started_with != threads:
            raise ValueError(f"the thread pool {name!r} was started with {started_with} threads, not {threads}")
        return pool


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container's cpuset sets), not
    the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 2


def wait_all(futures: list[Future]) -> None:
    """Return once none of `futures` runs, also after Ctrl-C: the ones still queued are then
    cancelled, the running ones waited for, and the KeyboardInterrupt raised. For tasks that read
    memory the caller frees next (worker.ann.RowFile's mapping): an interrupted wait would let
    the caller close the mapping under them (BufferError instead of the CLI's clean exit)."""
    interrupted = None
    while True:
        try:
            wait(futures)
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
            for future in futures:
                future.cancel()
    if interrupted is not None:
        raise interrupted
