"""Where a sketch lies in a raster: a square anywhere, of any size, turned (what a hit is).

Given in the raster's pixel coordinates: centre, side and angle (degrees, counterclockwise as
seen on a north-up map). Pixel (u, v) of the sketch's frame, measured from its centre (u right,
v down, as the user drew it), lies at raster pixel
    col = cx + u cos a + v sin a,   row = cy - u sin a + v cos a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import rasterio
import rasterio.errors
import shapely
from PIL import Image
from rasterio.enums import Resampling

from worker.errors import InputError
from worker.tiling import RasterInfo, check_layout, footprint_rings, natural_colour, read_reaching_past, resampling_for

# Raster pixels a place the user gives (an example, a mark) may make GDAL read: without overviews
# a place is averaged from every pixel it covers, in one read nothing interrupts. A 194,000 px
# example read for 105 s, far past its search's time limit, and searches behind it timed out.
# 8192 px a side read in 0.25 s here (a sparse GeoTIFF; compressed imagery reads slower), and is
# many times the side of any place an index searches (a 224 px tile at scale 4: 896 px).
MOST_PIXELS_READ = 8192 * 8192


@dataclass(frozen=True)
class Placement:
    """Where a sketch lies in a raster: a square of `side` raster pixels centred at (cx, cy),
    turned by `angle` degrees counterclockwise as seen on a north-up map."""

    raster: RasterInfo
    cx: float
    cy: float
    side: float
    angle: float = 0.0

    def corners(self) -> np.ndarray:
        """(4, 2) raster pixel (col, row) of the frame's corners: top-left, top-right, bottom-right, bottom-left."""
        return Placement.corners_of([self])[0]

    @staticmethod
    def corners_of(placements: list["Placement"]) -> np.ndarray:
        """The corners of many placements: (n, 4, 2), in one pass of array arithmetic."""
        centres = np.array([(p.cx, p.cy) for p in placements], np.float64).reshape(-1, 2)
        half = np.array([p.side / 2 for p in placements], np.float64)[:, None]
        angles = [math.radians(p.angle) for p in placements]
        cos = np.array([math.cos(a) for a in angles])[:, None]
        sin = np.array([math.sin(a) for a in angles])[:, None]
        u, v = np.array([-1.0, 1.0, 1.0, -1.0]) * half, np.array([-1.0, -1.0, 1.0, 1.0]) * half
        cols = centres[:, :1] + u * cos + v * sin
        rows = centres[:, 1:] - u * sin + v * cos
        return np.stack([cols, rows], axis=-1)

    def pixel_polygon(self) -> shapely.Polygon:
        return Placement.pixel_polygons([self])[0]

    @staticmethod
    def pixel_polygons(placements: list["Placement"]) -> list[shapely.Polygon]:
        """The frames of many placements as polygons in raster pixels, made in one call (a search
        makes one for each of its 200-odd candidates: 10 ms a search one by one, 1 ms so)."""
        return list(shapely.polygons(Placement.corners_of(placements)))

    def ring(self) -> np.ndarray:
        """Footprint ring in the raster's CRS, densified (4 * tiling.EDGE_POINTS + 1, 2), closed."""
        return Placement.rings([self])[0]

    @staticmethod
    def rings(placements: list["Placement"]) -> np.ndarray:
        """Footprint rings of many placements, each in its raster's CRS: (n, 4 * tiling.EDGE_POINTS + 1, 2),
        in one pass of array arithmetic (a search reprojects hundreds)."""
        return footprint_rings(Placement.corners_of(placements), [p.raster for p in placements])

    def window(self) -> tuple[int, int, int, int]:
        """The pixel window (col_off, row_off, width, height) around the (turned) square."""
        c = self.corners()
        c0, r0 = np.floor(c.min(0)).astype(int)
        c1, r1 = np.ceil(c.max(0)).astype(int)
        return int(c0), int(r0), int(c1 - c0), int(r1 - r0)

    def pixels_read(self, size: int, overviews: list[int]) -> float:
        """Raster pixels `read` reads of the raster (at the overview GDAL takes of `overviews`,
        the raster's decimation factors, or at full resolution)."""
        c0, r0, c1, r1 = self._read_box()
        factor = max(1.0, self.side / size)
        taken = max([1, *(f for f in overviews if f <= factor)])
        width = max(0, min(c1, self.raster.width) - max(c0, 0))
        height = max(0, min(r1, self.raster.height) - max(r0, 0))
        return width * height / (taken * taken)

    def _read_box(self) -> tuple[int, int, int, int]:
        """The pixel box (col0, row0, col1, row1) `read` reads: the frame's, and a pixel more."""
        corners = self.corners()
        c0, r0 = np.floor(corners.min(0)).astype(int) - 1
        c1, r1 = np.ceil(corners.max(0)).astype(int) + 1
        return int(c0), int(r0), int(c1), int(r1)

    def read(self, size: int = 224, src: rasterio.DatasetReader | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The frame's pixels as the user sees them, (size, size, 3) uint8 in natural colour,
        and its valid-data mask (outside the raster counts as invalid). `src`: the raster,
        already open (reading many placements of one raster)."""
        if src is None:
            with rasterio.open(self.raster.path) as opened:
                return self.read(size, opened)
        check_layout(src, self.raster)
        c0, r0, c1, r1 = self._read_box()
        # read the bounding box at about the frame's output resolution
        factor = max(1.0, self.side / size)
        out_w, out_h = max(1, int(round((c1 - c0) / factor))), max(1, int(round((r1 - r0) / factor)))
        data = read_reaching_past(src, self.raster.read_bands, c0, r0, c1, r1, (out_h, out_w),
                                  resampling_for(self.raster, factor > 1, up=Resampling.bilinear))
        rgb, valid = natural_colour(data, self.raster)
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


def refuse_too_large(places: list[Placement], size: int, named: list[str]) -> None:
    """InputError when reading one of the places the user gave (an example's square, marks;
    `named` says each) at `size` px would read more than MOST_PIXELS_READ of its raster, before
    any is read. A raster that cannot be opened is left to the read, which says why."""
    for path in dict.fromkeys(p.raster.path for p in places):
        try:
            with rasterio.open(path) as src:
                overviews = {p.raster.bands[0]: src.overviews(p.raster.bands[0]) for p in places if p.raster.path == path}
        except (rasterio.errors.RasterioError, OSError):
            continue
        for place, name in zip(places, named):
            if place.raster.path == path and place.pixels_read(size, overviews[place.raster.bands[0]]) > MOST_PIXELS_READ:
                side = round(place.side)
                how = "from its overviews" if overviews[place.raster.bands[0]] else "at full resolution (it has no overviews)"
                raise InputError(f"{name} covers {side:,} x {side:,} px of {path}, which would be read {how}: at most "
                                 f"{MOST_PIXELS_READ:,} px are read for a place. Choose a smaller place, or add "
                                 "overviews to the raster (gdaladdo, or QGIS's Build Overviews) so a large one is "
                                 "read from them")
