"""Raster handles kept open per thread, between searches and between a run's batches.

A rasterio dataset must not be read from two threads at once, so each thread that reads keeps
its own. GDAL keeps the decoded blocks of an open raster, so a place read again, or one sharing
blocks with a place just read, is not decompressed again; a raster changed on disk is opened
anew (worker.verify's reads, worker.drawing_pool's reads for a device's drawing).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import rasterio

OPEN_PER_THREAD = 16  # raster handles a thread keeps open (least recently used closed first)


class _ThreadHandles(threading.local):
    def __init__(self) -> None:
        self.handles: OrderedDict[tuple, rasterio.DatasetReader] = OrderedDict()

    def get(self, path: str) -> rasterio.DatasetReader:
        try:
            stat = os.stat(path)
            key = (path, stat.st_mtime_ns, stat.st_size)
        except OSError:  # not a file here (a GDAL /vsi path), or gone: rasterio.open says which
            key = (path, None, None)
        if key in self.handles:
            self.handles.move_to_end(key)
            return self.handles[key]
        for old in [k for k in self.handles if k[0] == path]:
            self.handles.pop(old).close()
        self.handles[key] = rasterio.open(path)
        while len(self.handles) > OPEN_PER_THREAD:
            self.handles.popitem(last=False)[1].close()
        return self.handles[key]


_handles = _ThreadHandles()


def open_in_this_thread(path: str) -> rasterio.DatasetReader:
    """This thread's open handle of the raster at `path` (rasterio's errors if it cannot be opened)."""
    return _handles.get(path)
