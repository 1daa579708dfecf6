"""One map of oriented-edge cells per raster and scale, joined from the tiles' own cells.

Tiles overlap; each stores the 8 px cells of its line drawing on a grid shared by every tile of
its raster and scale (the "level": the raster read down so that a tile is the model's 224 px).
Where tiles overlap, a cell is taken from the tile it lies most central in, so a window that
straddles tiles sees each part as drawn with the most context around it. A sketch can then be
scored at every offset of the map (worker.edge_cells), wherever it lies relative to the tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.edge_cells import CELL, ORIENTATIONS
from worker.tiling import RasterInfo, Tile

# per tile: where its stored cells lie on the level grid (first cell row and column, how many)
CELL_ORIGIN_FIELDS = ("cell_row", "cell_col", "cell_rows", "cell_cols")


def level_pixel(tile_size: int, scale: int, drawing_size: int) -> float:
    """Raster pixels per level pixel at a scale (a tile of `tile_size * scale` raster pixels is
    drawn at `drawing_size` pixels)."""
    return tile_size * scale / drawing_size


@dataclass(frozen=True)
class CellOrigin:
    """Where a tile's drawing meets its level's cell grid: the drawing's pixel `phase` (row, col)
    where the first whole grid cell starts, that cell's grid index, and the whole cells inside."""

    phase: tuple[int, int]
    cell_row: int
    cell_col: int
    rows: int
    cols: int


def cell_origin(tile: Tile, level_px: float, drawing_size: int) -> CellOrigin:
    oy, ox = round(tile.row_off / level_px), round(tile.col_off / level_px)
    pr, pc = (-oy) % CELL, (-ox) % CELL
    return CellOrigin((pr, pc), (oy + pr) // CELL, (ox + pc) // CELL,
                      (drawing_size - pr) // CELL, (drawing_size - pc) // CELL)


@dataclass
class LevelMap:
    """The cells of one raster at one scale: (rows, cols, ORIENTATIONS) uint8 (worker.edge_cells'
    stored form), cell (0, 0) starting at the raster's pixel (0, 0)."""

    raster: RasterInfo
    raster_id: int
    scale: int
    level_px: float
    cells: np.ndarray


def map_shape(raster: RasterInfo, level_px: float) -> tuple[int, int]:
    """Rows and columns of cells of a raster's level map (one spare cell past the far edges)."""
    return int(np.ceil(raster.height / level_px / CELL)) + 1, int(np.ceil(raster.width / level_px / CELL)) + 1


def assemble(rasters: dict[int, RasterInfo], records: np.ndarray, cells_of, tile_size: int,
             drawing_size: int) -> dict[tuple[int, int], LevelMap]:
    """Level maps of every (raster id, scale) in `records` (the index's tile records with
    CELL_ORIGIN_FIELDS); `cells_of(rows)` gives the stored cells of those records."""
    maps: dict[tuple[int, int], LevelMap] = {}
    keys = np.unique(np.stack([records["raster_id"], records["scale"]], 1), axis=0) if len(records) else []
    for raster_id, scale in keys:
        raster = rasters[int(raster_id)]
        lp = level_pixel(tile_size, int(scale), drawing_size)
        shape = map_shape(raster, lp)
        grid = np.zeros((*shape, ORIENTATIONS), np.uint8)
        best = np.full(shape, np.inf, np.float32)
        rows = np.nonzero((records["raster_id"] == raster_id) & (records["scale"] == scale))[0]
        stored = cells_of(rows)
        half = drawing_size / 2 / CELL
        for rec, cells in zip(records[rows], stored):
            r0, c0, nr, nc = (int(rec[f]) for f in CELL_ORIGIN_FIELDS)
            nr, nc = min(nr, shape[0] - r0), min(nc, shape[1] - c0)
            if nr <= 0 or nc <= 0:
                continue
            # distance (in cells, Chebyshev) of each cell's centre from the tile's centre
            centre_r = rec["row_off"] / lp / CELL + half
            centre_c = rec["col_off"] / lp / CELL + half
            dr = np.abs(np.arange(r0, r0 + nr) + 0.5 - centre_r)
            dc = np.abs(np.arange(c0, c0 + nc) + 0.5 - centre_c)
            dist = np.maximum(dr[:, None], dc[None, :])
            region = best[r0:r0 + nr, c0:c0 + nc]
            closer = dist < region
            region[closer] = dist[closer]
            grid[r0:r0 + nr, c0:c0 + nc][closer] = cells[:nr, :nc][closer]
        maps[(int(raster_id), int(scale))] = LevelMap(raster, int(raster_id), int(scale), lp, grid)
    return maps
