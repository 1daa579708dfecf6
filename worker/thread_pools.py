"""Thread pools started once per process and shared by every search (worker.verify, worker.ann)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def shared_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """The process's pool called `name`, started with `threads` threads at its first use (later
    calls get it as it is)."""
    with _lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=name)
        return _pools[name]
