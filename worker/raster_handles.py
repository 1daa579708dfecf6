"""Raster handles opened by the threads that read them, kept between reads and closed together.

A rasterio dataset must not be read from two threads at once, so each thread that reads keeps
its own. GDAL keeps the decoded blocks of an open raster, so a place read again, or one sharing
blocks with a place just read, is not decompressed again; a raster changed on disk is opened
anew. Verification keeps one set for the worker's life (worker.verify); an indexing run keeps
one for the run, each thread holding the raster it reads now alone, and closes it at the end
(worker.drawing_pool), so that no file stays open after it (on Windows an open file cannot be
replaced or deleted).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import rasterio

OPEN_PER_THREAD = 16  # raster handles a thread keeps open (least recently used closed first)


class ThreadHandles:
    """Each reading thread's open rasters, at most `per_thread` each (an index run's one: it reads
    one raster after another, and kept the finished ones open to its end)."""

    def __init__(self, per_thread: int = OPEN_PER_THREAD) -> None:
        self.per_thread = per_thread
        self._local = threading.local()
        self._lock = threading.Lock()
        self._every_thread: list[OrderedDict[tuple, rasterio.DatasetReader]] = []

    def _mine(self) -> OrderedDict[tuple, rasterio.DatasetReader]:
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = OrderedDict()
            with self._lock:
                self._every_thread.append(handles)
        return handles

    def get(self, path: str) -> rasterio.DatasetReader:
        """This thread's open handle of the raster at `path` (rasterio's errors if it cannot be opened)."""
        try:
            stat = os.stat(path)
            key = (path, stat.st_mtime_ns, stat.st_size)
        except OSError:  # not a file here (a GDAL /vsi path), or gone: rasterio.open says which
            key = (path, None, None)
        handles = self._mine()
        if key in handles:
            handles.move_to_end(key)
            return handles[key]
        self.forget(path)
        handles[key] = rasterio.open(path)
        while len(handles) > self.per_thread:
            handles.popitem(last=False)[1].close()
        return handles[key]

    def forget(self, path: str) -> None:
        """Close this thread's handle of the raster at `path`, after a read of it failed: GDAL
        reads a VRT's source that failed to open once as blank through that handle from then on,
        also once it is back (a mosaic's sheet moved away and back)."""
        handles = self._mine()
        for old in [k for k in handles if k[0] == path]:
            handles.pop(old).close()

    def close_others(self, path: str) -> None:
        """Close every thread's handles of rasters other than `path`; only while no thread reads
        through them (a thread given no part of a later raster kept its last one open)."""
        with self._lock:
            for handles in self._every_thread:
                for key in [k for k in handles if k[0] != path]:
                    handles.pop(key).close()

    def close(self) -> None:
        """Close every thread's handles; only once no thread reads through them."""
        with self._lock:
            for handles in self._every_thread:
                for src in handles.values():
                    src.close()
                handles.clear()
