"""Whether the sheets of a VRT mosaic under a place are there, before the place is read.

GDAL reads a VRT whose source file is gone as an error at some reads and as blank pixels at
others, through the same open VRT, and once the file is back too (measured: after the first
failures, every read of the gone sheet gave zeros, its mask valid). A search cannot tell a gone
sheet by reading it, so it asks the VRT which file fills which pixels (DstRect) and looks for
those files first: a place on a gone sheet is left out of the hits and said, and never read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import shapely

from worker.file_derived import FileDerived
from worker.placement import Placement
from worker.raster_access import MAX_VRT_DEPTH, vrt_sheets
from worker.tiling import may_be_vrt


def gone_sheets(placements: list[Placement]) -> list[str | None]:
    """For each placement, why the first file of its VRT mosaic under the pixels it reads cannot
    be read now ("<sheet>: no such file"); None where all can, or the raster is no VRT
    (RasterInfo.sources None).
    One query of the sheets' tree for a raster's placements, and one stat a sheet met: 300
    placements over a mosaic of 50,000 sheets, 1.2 ms once its sheets are read (lab/mosaic_scale
    --sheets); placement by placement, 58 ms at 10,000."""
    said: list[str | None] = [None] * len(placements)
    by_raster: dict[str, list[int]] = {}
    for number, placement in enumerate(placements):
        if placement.raster.sources is not None:
            by_raster.setdefault(placement.raster.path, []).append(number)
    for path, numbers in by_raster.items():
        paths, tree = _sheets(path)  # the .vrt as it is: one rebuilt since indexing names other sheets
        if not paths:  # none, or gone itself: its reads say so (RasterUnreadable)
            continue
        which, sheet = tree.query(_read_boxes([placements[n] for n in numbers]), predicate="intersects")
        why = {i: _why_unreadable(paths[i]) for i in set(sheet.tolist())}
        for k, i in sorted(zip(which.tolist(), sheet.tolist())):
            if why[i] is not None and said[numbers[k]] is None:
                said[numbers[k]] = why[i]
    return said


def _read_boxes(placements: list[Placement]) -> np.ndarray:
    """The pixel boxes the placements read (Placement._read_box: the turned square's extent and
    a pixel more), for all at once: one by one, their corners took most of a search's check."""
    cx, cy, side, angle = np.array([(p.cx, p.cy, p.side, p.angle) for p in placements], np.float64).T
    turned = np.radians(angle)
    reach = side / 2 * (np.abs(np.cos(turned)) + np.abs(np.sin(turned)))
    return shapely.box(np.floor(cx - reach) - 1, np.floor(cy - reach) - 1, np.ceil(cx + reach) + 1,
                       np.ceil(cy + reach) + 1)


def _why_unreadable(path: str) -> str | None:
    """Why a sheet is not a file this process may read (there, but a folder or mode 000, GDAL
    cannot open it either); None when it is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path}: no such file"
    except OSError as exc:  # a folder on the way that may not be entered, a link that loops
        return f"{path}: {exc.strerror.lower() if exc.strerror else exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a file"
    return None if os.access(path, os.R_OK) else f"{path}: permission denied"


def _read_sheets(path: str) -> tuple[tuple[list[str], shapely.STRtree | None], list[str]]:
    """A VRT's sheets (raster_access.vrt_sheets) as paths and a tree of their pixel boxes, and
    the VRT files read for them (_sheets keeps them until one of those changes); none when it
    cannot be parsed (GDAL's own reads then say what is wrong). The sheets of a VRT it reads (a
    mosaic of zones' VRTs) count as filling all the pixels that VRT fills, down to MAX_VRT_DEPTH."""
    read: list[str] = []
    sheets = _nested_sheets(path, MAX_VRT_DEPTH, read)
    if not sheets:
        return ([], None), read
    # a sheet with no DstRect fills the whole raster: a box past any place
    boxes = np.minimum(np.array([box for _, box in sheets], np.float64), 1e15)
    return ([p for p, _ in sheets], shapely.STRtree(shapely.box(*boxes.T))), read


_sheets = FileDerived(_read_sheets)


def _nested_sheets(path: str, depth: int, read: list[str],
                   followed: dict[tuple[str, int], list[str]] | None = None) -> list[tuple[str, tuple[float, ...]]]:
    """vrt_sheets of `path` (added to `read`), each VRT among them followed, from where its link
    leads as GDAL follows it, by its own sheets over its box, once each (`followed`), and each
    sheet over a box once: a VRT naming the one below it 6 times, each filling another pixel,
    nested 7 deep, was read once for every path through the nesting, 56,000 reads."""
    followed = {} if followed is None else followed
    read.append(path)
    try:
        sheets = vrt_sheets(Path(path))
    except (OSError, SyntaxError, ValueError):  # ET.ParseError is a SyntaxError
        return []
    if depth <= 1:
        return sheets
    inner = []
    for file, box in sheets:  # each (sheet, box) once (vrt_sheets)
        if may_be_vrt(file):
            below = (os.path.realpath(file), depth - 1)
            if below not in followed:
                followed[below] = list(dict.fromkeys(sheet for sheet, _ in _nested_sheets(*below, read, followed)))
            inner += [(sheet, box) for sheet in followed[below]]
    return sheets + list(dict.fromkeys(inner))
