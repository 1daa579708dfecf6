"""Where a user's sketch lies in a raster: a square frame anywhere, of any size, slightly turned.

A query of the benchmark is drawn from such a frame, never from a gallery tile's window (except
in the `aligned` placement, kept to show the easy case beside the hard ones). A frame is given in
the raster's pixel coordinates: centre, side and angle (degrees, counterclockwise as seen on a
north-up map). Frame pixel (u, v), measured from the frame's centre (u right, v down in the
frame as the user drew it), lies at raster pixel
    col = cx + u cos a + v sin a,   row = cy - u sin a + v cos a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import rasterio
import shapely
from PIL import Image
from rasterio.enums import Resampling
from rasterio.windows import Window

from worker.tiling import RasterInfo, TileSettings, fill_from_nearest_valid, plan_tiles

PLACEMENTS = ("aligned", "shifted", "scaled", "turned", "free")
SIDE_RANGE = (0.6, 1.6)  # sides relative to the index's tile, as the issue asks
MAX_ANGLE = 15.0


@dataclass(frozen=True)
class Frame:
    raster: RasterInfo
    cx: float
    cy: float
    side: float
    angle: float = 0.0

    def corners(self) -> np.ndarray:
        """(4, 2) raster pixel (col, row) of the frame's corners: top-left, top-right, bottom-right, bottom-left."""
        h = self.side / 2
        a = math.radians(self.angle)
        uv = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
        cols = self.cx + uv[:, 0] * math.cos(a) + uv[:, 1] * math.sin(a)
        rows = self.cy - uv[:, 0] * math.sin(a) + uv[:, 1] * math.cos(a)
        return np.column_stack([cols, rows])

    def pixel_polygon(self) -> shapely.Polygon:
        return shapely.Polygon(self.corners())

    def read(self, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
        """The frame's pixels as the user sees them, (size, size, 3) uint8 in natural colour,
        and its valid-data mask (outside the raster counts as invalid)."""
        from worker.tiling import _to_uint8

        corners = self.corners()
        c0, r0 = np.floor(corners.min(0)).astype(int) - 1
        c1, r1 = np.ceil(corners.max(0)).astype(int) + 1
        # read the bounding box at about the frame's output resolution
        factor = max(1.0, self.side / size)
        out_w, out_h = max(1, int(round((c1 - c0) / factor))), max(1, int(round((r1 - r0) / factor)))
        with rasterio.open(self.raster.path) as src:
            data = src.read(list(self.raster.bands), window=Window(c0, r0, c1 - c0, r1 - r0), out_shape=(3, out_h, out_w),
                            resampling=Resampling.average if factor > 1 else Resampling.bilinear, masked=True,
                            boundless=True)
        valid = ~np.ma.getmaskarray(data).any(axis=0) & np.isfinite(data.filled(0)).all(axis=0)
        rgb = fill_from_nearest_valid(_to_uint8(data, self.raster.stretch).transpose(1, 2, 0), valid)
        sx, sy = (c1 - c0) / out_w, (r1 - r0) / out_h
        # continuous output (x, y) -> frame (u, v) -> raster (col, row) -> bounding-box image
        # (PIL maps continuous coordinates: pixel i covers [i, i + 1))
        step = self.side / size
        a = math.radians(self.angle)
        ca, sa = math.cos(a), math.sin(a)
        u0 = v0 = -self.side / 2
        coeffs = (step * ca / sx, step * sa / sx, (self.cx + u0 * ca + v0 * sa - c0) / sx,
                  -step * sa / sy, step * ca / sy, (self.cy - u0 * sa + v0 * ca - r0) / sy)
        image = Image.fromarray(rgb).transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
        mask = Image.fromarray(valid.astype(np.uint8) * 255).transform((size, size), Image.Transform.AFFINE, coeffs,
                                                                       Image.Resampling.NEAREST)
        return np.asarray(image), np.asarray(mask) > 127


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
