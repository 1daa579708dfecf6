"""Rasters an index would read twice: a mosaic VRT added over rasters the index holds on their
own, a raster (a sheet, a zone's VRT) added under a mosaic it holds, or a copy of a raster it
holds or is given (the same pixels on the same grid). Within one run the files
a mosaic found with them reads are left out as rasters are found (worker.tiling.find_rasters);
across runs every place there came back twice, unsaid (a probe's: a folder of 8 sheets, then its
VRT, 168 tiles became 345). As within a run, a VRT naming one file (a clip, a band, a warp) is
not all of it, and is not taken for a mosaic.
"""

from __future__ import annotations

import os

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError  # GDAL's errors (rasterio.errors does not export it)
from rasterio.enums import Resampling
from rasterio.errors import RasterioError

from worker.errors import REMOVE_HOW
from worker.tiling import RasterInfo, vrt_names

NAMED = 3  # rasters named in a warning, then a count
SAMPLE_PX = 32  # the side of the grid of pixels two rasters on one grid are compared at


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
    compared, at SAMPLE_PX by SAMPLE_PX pixels: two versions of a scene (false colour, another
    bit depth) differ there and are not said."""
    on_grid: dict[tuple, list[RasterInfo]] = {}
    for info in held:
        on_grid.setdefault(_grid(info), []).append(info)
    said = []
    for info in added:
        twin = next((other for other in on_grid.get(_grid(info), []) if _same_pixels(info, other)), None)
        if twin is not None:
            said.append(f"{info.path} holds the same pixels as {twin.path}, on the same grid (a copy?): every place "
                        f"there will come back twice, from each; leave one out, or take it out once indexed "
                        f"({REMOVE_HOW})")
        on_grid.setdefault(_grid(info), []).append(info)
    return said


def _grid(raster: RasterInfo) -> tuple:
    return raster.crs_wkt, raster.transform, raster.width, raster.height, tuple(raster.read_bands), raster.palette


def _same_pixels(a: RasterInfo, b: RasterInfo) -> bool:
    """Whether `a` and `b` read the same values at a grid of pixels over the whole raster; False
    where either cannot be read (its own read says why)."""
    try:
        samples = []
        for raster in (a, b):
            with rasterio.open(raster.path) as src:
                samples.append(src.read(raster.read_bands, out_shape=(len(raster.read_bands), SAMPLE_PX, SAMPLE_PX),
                                        resampling=Resampling.nearest))
    except (OSError, RasterioError, CPLE_BaseError):
        return False
    return np.array_equal(*samples)
