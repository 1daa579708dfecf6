"""Whether the sheets of a VRT mosaic under a place are there, before the place is read.

GDAL reads a VRT whose source file is gone as an error at some reads and as blank pixels at
others, through the same open VRT, and once the file is back too (measured: after the first
failures, every read of the gone sheet gave zeros, its mask valid). A search cannot tell a gone
sheet by reading it, so it asks the VRT which file fills which pixels (DstRect) and looks for
those files first: a place on a gone sheet is left out of the hits and said, and never read.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from worker.placement import Placement
from worker.raster_access import vrt_sheets


def gone_sheet(placement: Placement) -> str | None:
    """The first file of a VRT mosaic, under the pixels a placement reads, that is not there
    now (its path); None when all are, or the raster is no VRT (RasterInfo.sources None)."""
    raster = placement.raster
    if raster.sources is None:
        return None
    paths, boxes = _sheets(raster.path, raster.size, raster.mtime_ns)
    c0, r0, c1, r1 = placement._read_box()
    under = np.flatnonzero((boxes[:, 0] < c1) & (boxes[:, 2] > c0) & (boxes[:, 1] < r1) & (boxes[:, 3] > r0))
    return next((paths[i] for i in under if not os.path.exists(paths[i])), None)


@lru_cache(maxsize=64)
def _sheets(path: str, size: int, mtime_ns: int) -> tuple[list[str], np.ndarray]:
    """A VRT's sheets (raster_access.vrt_sheets) as paths and an (n, 4) array of their pixel
    boxes, read once for the file as indexed (`size` and `mtime_ns` key it); none when it cannot
    be parsed (GDAL's own reads then say what is wrong)."""
    try:
        sheets = vrt_sheets(Path(path))
    except (OSError, SyntaxError, ValueError):  # ET.ParseError is a SyntaxError
        sheets = []
    return [str(p) for p, _ in sheets], np.array([box for _, box in sheets], np.float64).reshape(-1, 4)
