"""What the index stores of each tile: its edge cells, and its tokens when asked for.

Tile pixels -> line drawing (worker.line_drawing) -> the 8 px oriented-edge cells on its level's
shared grid (worker.edge_cells, worker.level_maps), which every default search uses, and, in an
index built with tokens, the ViT tokens of the drawing (worker.model), which only the "tokens"
ranker and a token weight use. On a CPU the ViT is most of an index's time and size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from worker import edge_cells
from worker.level_maps import cell_origin, level_pixel
from worker.tiling import Tile


@dataclass
class TileFeatures:
    cells: np.ndarray  # (B, G, G, ORIENTATIONS) uint8, G = drawing size / CELL (unused rows/cols zero)
    cell_origin: np.ndarray  # (B, 4) int32: cell_row, cell_col, cell_rows, cell_cols (worker.level_maps)
    global_token: np.ndarray | None = None  # (B, D) fp16, with tokens
    tokens: np.ndarray | None = None  # (B, K, D) fp16, with tokens
    positions: np.ndarray | None = None  # (B, K) int16, with tokens


def cells_on_grid(drawings: np.ndarray | torch.Tensor, tiles: list[Tile], tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each drawing's 8 px cells, of the drawing as a search compares it (smoothed,
    worker.edge_cells.compared_drawings), cut where its level's shared grid runs through it;
    computed on the drawings' device (the CPU for an array)."""
    size = drawings.shape[1]
    g = size // edge_cells.CELL
    cells = np.zeros((len(tiles), g, g, edge_cells.ORIENTATIONS), np.uint8)
    origins = np.zeros((len(tiles), 4), np.int32)
    batch = edge_cells.compared_drawings(torch.as_tensor(drawings))
    by_phase: dict[tuple[int, int], list[int]] = {}
    for i, tile in enumerate(tiles):
        origin = cell_origin(tile, level_pixel(tile_size, tile.scale, size), size)
        origins[i] = (origin.cell_row, origin.cell_col, origin.rows, origin.cols)
        by_phase.setdefault(origin.phase, []).append(i)
    for phase, idx in by_phase.items():  # tiles flush with the raster's far edge have their own phase
        hist = edge_cells.quantise(edge_cells.cell_histograms(batch[idx], phase))
        cells[idx, :hist.shape[1], :hist.shape[2]] = hist
    return cells, origins
