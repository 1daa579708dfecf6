"""Rasters an index would read twice: a mosaic VRT added over sheets the index holds on their
own, or sheets added under a mosaic it holds. Within one run the sheets a mosaic found with them
reads are left out as rasters are found (worker.tiling.find_rasters); across runs every place
there came back twice, unsaid (a probe's: a folder of 8 sheets, then its VRT, 168 tiles became
345). As within a run, a VRT of one file (a clip, a band, a warp) is not all of it: no word.
"""

from __future__ import annotations

import os

from worker.errors import REMOVE_HOW
from worker.tiling import RasterInfo
from worker.vrt_sheets import mosaic_sheets

NAMED = 3  # rasters named in a warning, then a count


def read_twice(added: list[RasterInfo], held: list[RasterInfo]) -> list[str]:
    """A warning for each raster of `added` (new to the index) that reads, or is read by, one of
    `held` (already in it). The held mosaics' sheets are listed only when a raster that is no
    mosaic is added (a country's VRT of 50,000 sheets takes 2 s)."""
    held_by_path = {os.path.realpath(r.path): r.path for r in held}
    held_sheets: dict[str, str] | None = None  # a held mosaic's sheet (real path) -> the mosaic
    said = []
    for info in added:
        if info.sources is not None:
            sheets = {os.path.realpath(p) for p in mosaic_sheets(info.path)}
            twice = sorted(held_by_path[p] for p in sheets & held_by_path.keys()) if len(sheets) >= 2 else []
            if twice:
                more = f" and {len(twice) - NAMED} more" if len(twice) > NAMED else ""
                said.append(f"{info.path} reads {len(twice)} raster(s) the index already holds on their own "
                            f"({', '.join(twice[:NAMED])}{more}): every place there will come back twice, from each; "
                            f"take them out ({REMOVE_HOW}), or leave the mosaic out")
            continue
        if held_sheets is None:
            held_sheets = {}
            for mosaic in (r for r in held if r.sources is not None):
                sheets = mosaic_sheets(mosaic.path)
                if len(set(sheets)) >= 2:
                    held_sheets.update((os.path.realpath(p), mosaic.path) for p in sheets)
        mosaic = held_sheets.get(os.path.realpath(info.path))
        if mosaic is not None:
            said.append(f"{info.path} is read by {mosaic}, which the index already holds: every place there will come "
                        f"back twice, from each; leave it out, or take it out once indexed ({REMOVE_HOW})")
    return said
