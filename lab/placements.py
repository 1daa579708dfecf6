"""Where a user's sketch lies in a raster: a frame (worker.placement.Placement) anywhere, of
any size, slightly turned. A query of the benchmark is drawn from such a frame, never from a
gallery tile's window (except in the `aligned` placement, kept to show the easy case beside the
hard ones)."""

from __future__ import annotations

import math
import numpy as np
import shapely

from worker.placement import Placement as Frame
from worker.tiling import RasterInfo, TileSettings, plan_tiles

PLACEMENTS = ("aligned", "shifted", "scaled", "turned", "free")
SIDE_RANGE = (0.6, 1.6)  # sides relative to the index's tile, as the issue asks
MAX_ANGLE = 15.0


def inside_data(frame: Frame, valid_share: float = 0.9) -> bool:
    """Whether the frame lies inside the raster (a user sketches a place they can see)."""
    r = frame.raster
    return shapely.box(0, 0, r.width, r.height).intersection(frame.pixel_polygon()).area >= valid_share * frame.side ** 2


def random_frame(raster: RasterInfo, settings: TileSettings, placement: str, rng: np.random.Generator,
                 attempts: int = 200) -> Frame | None:
    """A frame of the given placement kind, inside the raster (None when none fits)."""
    tile = settings.tile
    if placement == "aligned":
        tiles = [t for t in plan_tiles(raster, TileSettings(tile=tile, overlap=settings.overlap, scales=(1,)))
                 if t.col_off + t.width <= raster.width and t.row_off + t.height <= raster.height]
        if not tiles:
            return None
        t = tiles[rng.integers(len(tiles))]
        return Frame(raster, t.col_off + t.width / 2, t.row_off + t.height / 2, float(t.width))
    for _ in range(attempts):
        side = float(tile)
        if placement in ("scaled", "free"):
            side = tile * math.exp(rng.uniform(math.log(SIDE_RANGE[0]), math.log(SIDE_RANGE[1])))
        angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)) if placement in ("turned", "free") else 0.0
        cx, cy = rng.uniform(0, raster.width), rng.uniform(0, raster.height)
        frame = Frame(raster, float(cx), float(cy), side, angle)
        if inside_data(frame, 0.999):
            return frame
    return None


def iou(a: shapely.Polygon, b: shapely.Polygon) -> float:
    inter = a.intersection(b).area
    return float(inter / (a.area + b.area - inter)) if inter > 0 else 0.0
