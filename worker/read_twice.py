"""Rasters an index would read twice: a mosaic VRT added over rasters the index holds on their
own, a raster (a sheet, a zone's VRT) added under a mosaic it holds, or a copy of a raster it
holds or is given (the same pixels on the same grid). Within one run the files
a mosaic found with them reads are left out as rasters are found (worker.tiling.find_rasters);
across runs every place there came back twice, unsaid (a probe's: a folder of 8 sheets, then its
VRT, 168 tiles became 345). As within a run, a VRT naming one file (a clip, a band, a warp) is
not all of it, and is not taken for a mosaic.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError  # GDAL's errors (rasterio.errors does not export it)
from rasterio.errors import RasterioError
from rasterio.windows import Window

from worker.errors import REMOVE_HOW
from worker.tiling import RasterInfo, vrt_names

NAMED = 3  # rasters named in a warning, then a count
# two rasters on one grid are compared by SAMPLE_PX-pixel windows at these fractions of their width
# and height, and must hold SAMPLE_MIN_VALID valid values there
SAMPLE_AT = ((0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
SAMPLE_PX = 16
SAMPLE_MIN_VALID = 64


def read_twice(added: list[RasterInfo], held: list[RasterInfo]) -> list[str]:
    """A warning for each raster of `added` (new to the index) that reads, or is read by, one of
    `held` (already in it). Mosaics' files come from their XML (worker.tiling.vrt_names, kept
    until a .vrt changes: a country's VRT of 50,000 sheets is read once)."""
    if not added:  # a run resuming or redoing what the index holds: its mosaics are not read for it
        return []
    held_by_path = {os.path.realpath(r.path): r.path for r in held}
    held_files = {os.path.realpath(name): r.path for r in held for name in _mosaic_files(r)}
    said = []
    for info in added:
        mosaic = held_files.get(os.path.realpath(info.path))
        if mosaic is not None:
            said.append(f"{info.path} is read by {mosaic}, which the index already holds: every place there will come "
                        f"back twice, from each; leave it out, or take it out once indexed ({REMOVE_HOW})")
            continue
        twice = sorted({held_by_path[p] for p in map(os.path.realpath, _mosaic_files(info)) if p in held_by_path})
        if twice:
            more = f" and {len(twice) - NAMED} more" if len(twice) > NAMED else ""
            said.append(f"{info.path} reads {len(twice)} raster(s) the index already holds on their own "
                        f"({', '.join(twice[:NAMED])}{more}): every place there will come back twice, from each; "
                        f"take them out ({REMOVE_HOW}), or leave the mosaic out")
    return said


def _mosaic_files(raster: RasterInfo) -> list[str]:
    """Every file a mosaic VRT reads, down its VRTs; none for a raster that is no VRT, or a VRT
    naming one file itself."""
    if raster.sources is None:
        return []
    direct, every = vrt_names(raster.path)
    return every if len(set(direct)) >= 2 else []


def copies(added: list[RasterInfo], held: list[RasterInfo]) -> list[str]:
    """A warning for each raster of `added` that holds the same pixels, on the same grid, as one
    of `held` or an `added` before it: a copy beside its original (a COG made from it, a second
    download, a backup in the folder) was indexed as asked, and every place there came back
    twice, unsaid (a probe's). Only rasters on one grid, read through the same bands, are
    compared, each by a few small windows read once (_sample), so a time series on one grid
    (a satellite tile's dates, a sheet set flown again) costs a read of a block or two a raster,
    and two of its dates, or two versions of a scene (false colour), differ there. A held raster
    whose file changed since it was indexed is not compared: its pixels are no longer those
    the index holds."""
    added_grids = {_grid(info) for info in added}
    held = [info for info in held if _grid(info) in added_grids]
    shared = {grid for grid, count in Counter(map(_grid, held + added)).items() if count > 1}
    seen: dict[tuple, RasterInfo] = {}
    for info in held:
        if _grid(info) in shared and not _changed(info) and (key := _sample(info)) is not None:
            seen.setdefault((_grid(info), key), info)
    said = []
    for info in added:
        if _grid(info) not in shared or (key := _sample(info)) is None:  # a grid of its own: nothing read
            continue
        twin = seen.setdefault((_grid(info), key), info)
        if twin is not info:
            said.append(f"{info.path} holds the same pixels as {twin.path}, on the same grid (a copy?): every place "
                        f"there will come back twice, from each; leave one out, or take it out once indexed "
                        f"({REMOVE_HOW})")
    return said


def _grid(raster: RasterInfo) -> tuple:
    return raster.crs_wkt, raster.transform, raster.width, raster.height, tuple(raster.read_bands), raster.palette


def _changed(raster: RasterInfo) -> bool:
    try:
        return raster.file_changed()
    except OSError:  # gone: said where it is searched
        return True


def _sample(raster: RasterInfo) -> bytes | None:
    """A digest of the raster's values and mask in SAMPLE_WINDOWS windows of SAMPLE_PX pixels
    (its centre and its quarters' centres, at full resolution: a block or two each, also of a
    mosaic VRT); None where they hold fewer than SAMPLE_MIN_VALID valid pixels (two mostly empty
    rasters alike there are not copies) or cannot be read (a warning never stops a run: the
    raster's own read says why)."""
    digest = hashlib.blake2b(digest_size=16)
    valid = 0
    try:
        with rasterio.open(raster.path) as src:
            for fx, fy in SAMPLE_AT:
                col = min(max(0, int(fx * src.width) - SAMPLE_PX // 2), max(0, src.width - SAMPLE_PX))
                row = min(max(0, int(fy * src.height) - SAMPLE_PX // 2), max(0, src.height - SAMPLE_PX))
                window = Window(col, row, min(SAMPLE_PX, src.width), min(SAMPLE_PX, src.height))
                data = src.read(raster.read_bands, window=window, masked=True)
                mask = np.ma.getmaskarray(data)
                valid += int((~mask).sum())
                digest.update(data.filled(0).tobytes())
                digest.update(np.packbits(mask).tobytes())
    except (OSError, ValueError, IndexError, RasterioError, CPLE_BaseError):
        return None
    return digest.digest() if valid >= SAMPLE_MIN_VALID else None
