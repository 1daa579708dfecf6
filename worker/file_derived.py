"""Values read from files, kept until one of the files they were read from changes.

A country's VRT mosaic is tens of MB of XML: its sheets (worker.vrt_sheets) and its sources as
GDAL names them (worker.tiling) took seconds to read, and a search looks at them each time. They
are kept per file, one entry a file whatever the number of mosaics an index holds, and read
again once any file they came from (a mosaic of zones' VRTs reads several) is not as it was.
"""

from __future__ import annotations

import os
from typing import Callable, Generic, TypeVar

Value = TypeVar("Value")


def file_state(path: str) -> tuple | None:
    """A file as it is: its inode, size, modification and change times (a file rewritten in
    place within the disk's time resolution, or given back its old time with touch -r or
    rsync -t, changes its change time; one renamed into place, its inode); None when it cannot
    be looked at."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileDerived(Generic[Value]):
    """`read(path)` -> (value, the files it read, `path` among them), kept per path until one of
    those files changes (file_state). Threads may share it: two reading at once both read."""

    def __init__(self, read: Callable[[str], tuple[Value, list[str]]]) -> None:
        self._read = read
        self._kept: dict[str, tuple[dict[str, tuple | None], Value]] = {}

    def __call__(self, path: str) -> Value:
        kept = self._kept.get(path)
        if kept is not None and all(file_state(f) == state for f, state in kept[0].items()):
            return kept[1]
        before = file_state(path)  # changed while read: read again next time
        value, files = self._read(path)
        self._kept[path] = ({**{f: file_state(f) for f in files}, path: before}, value)
        return value
