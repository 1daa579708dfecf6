"""The kernel's page cache, for measuring searches from a cold disk (Linux).

A worker's first searches after a reboot, or on an index larger than memory, read the index from
disk; a benchmark run after the index was built reads it from memory. evict drops files' pages
from the cache so that a benchmark or test sees the disk; cached_share says how much of a file is
in the cache, so that it can check that eviction worked.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

PAGE = mmap.PAGESIZE


def evict(paths: list[Path]) -> int:
    """Drops the cached pages of these files and of the files under these folders: bytes of files
    evicted. Written pages are synced first (dirty pages are not dropped)."""
    evicted = 0
    for root in paths:
        for path in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                evicted += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return evicted


def cached_share(path: Path) -> float:
    """The share of a file's pages in the page cache (mincore(2) on a private mapping of it, which
    reads nothing)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    pages = (size + PAGE - 1) // PAGE
    in_cache = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), in_cache) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
        finally:
            del start  # the mapping closes with nothing pointing into it
    return sum(page & 1 for page in in_cache) / pages
