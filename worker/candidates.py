"""A placement under consideration during one search, and how its scores are blended."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.edge_cells import CELL
from worker.level_maps import LevelMap
from worker.placement import Placement


def standardise(scores: np.ndarray) -> np.ndarray:
    """Scores as z-values over the candidates, so scores of different scales can be blended."""
    scores = np.asarray(scores, np.float64)
    spread = scores.std()
    return (scores - scores.mean()) / spread if spread > 1e-12 else np.zeros_like(scores)


@dataclass
class Candidate:
    """A placement of one template on one level map: its window's top-left stored cell."""

    map_key: tuple[int, int]
    size: int  # template side, level px
    angle: float
    row: int  # stored cells
    col: int
    coarse: float
    fine: float = 0.0
    tokens: float | None = None
    verified: float | None = None
    score: float = 0.0

    @property
    def rank_key(self) -> tuple:
        """Verified placements first (their scores are on another scale), then by score."""
        return (self.verified is None, -self.score)
    tile_row: int | None = None  # the index row of the tile under it (the "tokens" ranker's tile)
    # the HOG cosine of its own drawing with the sketch, when known without reading the raster (a
    # tile window's stored cells, worker.tile_windows); such a candidate keeps its place
    drawn: float | None = None
    unreadable: str | None = None  # why its place could not be read to verify it: never a hit (worker.verify)

    def placement(self, level: LevelMap) -> Placement:
        half = self.size / 2
        x, y = self.col * CELL + half, self.row * CELL + half
        return Placement(level.raster, x * level.level_px, y * level.level_px, self.size * level.level_px, self.angle)
