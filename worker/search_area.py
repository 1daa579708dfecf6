"""Where a search looks: the level maps it scans, and the part of each that an area covers.

A search limited to an area (the plugin's "Current map view") must find the best places inside
it, not the best places of whole maps of which a few happen to lie inside: a map view over one
town of a mosaic of large rasters, or of one large raster, holds few of any map's best peaks.
So the scans keep only the places that meet the area's box in each map (in stored cells), and
the ANN shortlist hands on only windows whose neighbourhood meets it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform
from shapely.geometry import Polygon

from worker.edge_cells import CELL
from worker.geo import Area, nearest_copy_x, with_world_copies
from worker.level_maps import LevelMap
from worker.store import WGS84, TileIndex

Box = tuple[int, int, int, int]  # rows r0:r1, cols c0:c1 of a level map's stored cells
Key = tuple[int, int]  # raster id, scale
KEY_SPAN = 1 << 20  # raster id * KEY_SPAN + scale: one integer a map


@dataclass(frozen=True)
class SearchArea:
    """The level maps a search scans (`keys`), and for maps the area covers only in part, the box
    of stored cells a place must meet (`boxes`; a map without one is searched whole)."""

    keys: list[Key]
    boxes: dict[Key, Box]
    whole: bool  # every map of the index, each whole: nothing to check
    area_wgs84: Area | None = None

    @classmethod
    def of(cls, index: TileIndex, scales: tuple[int, ...] | None = None, area_wgs84: Area | None = None,
           leave_out: frozenset[int] = frozenset()) -> "SearchArea":
        """The maps of `index` at `scales` (None: all) that meet `area_wgs84` (None: everywhere),
        but those of the rasters `leave_out` (ids: rasters that cannot be read now)."""
        keys = [k for k in index.maps if (scales is None or k[1] in scales) and k[0] not in leave_out]
        every_map = not index.left_out and not leave_out  # a raster left out has tiles, and no map (TileIndex.left_out)
        if area_wgs84 is None:
            return cls(keys, {}, every_map and len(keys) == len(index.maps), None)
        bounds = shapely.box(*np.array([index.map_boxes_wgs84[k] for k in keys], np.float64).reshape(-1, 4).T)
        if isinstance(area_wgs84, Polygon):  # a map across 180 lies past it: met by the area's world copies, as one
            area_wgs84 = shapely.union_all(list(with_world_copies(area_wgs84).geoms))
        meets = shapely.intersects(bounds, area_wgs84)  # every map at once: a mosaic has thousands
        keys, bounds = [k for k, m in zip(keys, meets) if m], bounds[meets]
        met, boxes = [], {}
        for key, map_bounds in zip(keys, bounds):
            box = _cell_box(index.maps[key], map_bounds, area_wgs84)
            if box is not None and (box[0] >= box[2] or box[1] >= box[3]):
                continue  # the area meets the lon/lat box round the map, not the map
            met.append(key)
            if box is not None:
                boxes[key] = box
        return cls(met, boxes, every_map and not boxes and len(met) == len(index.maps), area_wgs84)

    def only(self, keys: list[Key]) -> "SearchArea":
        """This area in the maps `keys` alone."""
        return SearchArea(list(keys), {k: b for k, b in self.boxes.items() if k in keys}, False, self.area_wgs84)

    def meets(self, key: Key, rows: np.ndarray, cols: np.ndarray, side: int) -> np.ndarray:
        """Whether squares of `side` stored cells with top-left cells (rows, cols) of map `key`
        meet the area's box there (all True for a map searched whole)."""
        box = self.boxes.get(key)
        rows, cols = np.asarray(rows), np.asarray(cols)
        if box is None:
            return np.ones(np.broadcast_shapes(rows.shape, cols.shape), bool)
        r0, c0, r1, c1 = box
        return (rows < r1) & (rows + side > r0) & (cols < c1) & (cols + side > c0)

    def meets_each(self, keys: np.ndarray, rows: np.ndarray, cols: np.ndarray, side: int) -> np.ndarray:
        """`meets` for squares each in its own map: keys (n, 2) of raster id and scale."""
        keys = np.asarray(keys, np.int64).reshape(-1, 2)  # windows.npy's int32 would overflow raster id * KEY_SPAN
        out = np.isin(keys[:, 0] * KEY_SPAN + keys[:, 1], [r * KEY_SPAN + s for r, s in self.keys])
        for key in self.boxes:
            on = (keys[:, 0] == key[0]) & (keys[:, 1] == key[1])
            out[on] = self.meets(key, np.asarray(rows)[on], np.asarray(cols)[on], side)
        return out

    def tile_rows(self, index: TileIndex) -> np.ndarray | None:
        """Which of the index's tile rows lie in the area's maps and meet it (bool, or None for
        all): the paper's ranker shortlists tiles, not places."""
        if self.whole:
            return None
        rows = np.zeros(len(index), bool)
        for key in self.keys:
            rows[index.rows_of_map(*key)] = True
        if self.area_wgs84 is not None:
            b = index.records["bounds4326"]
            near = np.zeros(len(index), bool)
            for part in shapely.get_parts(self.area_wgs84):  # an area across 180: its world copies
                x0, y0, x1, y1 = part.bounds
                near |= (b[:, 0] <= x1) & (b[:, 2] >= x0) & (b[:, 1] <= y1) & (b[:, 3] >= y0)
            rows &= near
        return rows

    def share(self, index: TileIndex) -> float:
        """About what share of the searched index's tiles the area holds (by map, and by box
        within a map); a raster left out (TileIndex.left_out) is not counted."""
        total = sum(len(index.rows_of_map(*key)) for key in index.maps)
        if not total:
            return 0.0
        held = 0.0
        for key in self.keys:
            tiles = len(index.rows_of_map(*key))
            box = self.boxes.get(key)
            if box is not None:
                rows, cols = index.maps[key].cells.shape[:2]
                tiles *= (box[2] - box[0]) * (box[3] - box[1]) / (rows * cols)
            held += tiles
        return min(1.0, held / total)


def _cell_box(level: LevelMap, map_bounds: Polygon, area_wgs84: Area) -> Box | None:
    """The box of a level map's stored cells around the part of the area (with its world copies:
    a map across 180 degrees lies past it) over the map's lon/lat bounds (reprojected there
    only: far from a raster its CRS's coordinates run wild), empty when that part lies off the
    map; None: the area covers the whole map, or cannot be placed in the raster's CRS, and the
    map is searched whole."""
    part = area_wgs84.intersection(map_bounds)
    if part.is_empty or part.covers(map_bounds):
        return None
    west, south, east, north = map_bounds.bounds
    points = shapely.get_coordinates(shapely.segmentize(part, max(east - west, north - south) / 16))
    raster = level.raster
    try:
        xs, ys = warp_transform(WGS84, CRS.from_wkt(raster.crs_wkt), points[:, 0], points[:, 1])
    except Exception:  # PROJ's errors have no common type: a point its projection cannot place
        return None
    xs = nearest_copy_x(np.asarray(xs), raster.crs_wkt, raster.centre[0])
    cols, rows = ~raster.affine * (xs, np.asarray(ys))
    if not (np.isfinite(cols).all() and np.isfinite(rows).all()):
        return None
    if cols.min() >= raster.width or cols.max() <= 0 or rows.min() >= raster.height or rows.max() <= 0:
        return 0, 0, 0, 0  # beside the raster: its last cells reach past its pixels, over none of its data
    cell_px = CELL * level.level_px
    height, width = level.cells.shape[:2]
    r0, r1 = max(0, int(np.floor(rows.min() / cell_px))), min(height, int(np.ceil(rows.max() / cell_px)))
    c0, c1 = max(0, int(np.floor(cols.min() / cell_px))), min(width, int(np.ceil(cols.max() / cell_px)))
    if (r0, c0, r1, c1) == (0, 0, height, width):
        return None
    return r0, c0, r1, c1  # empty where the part lies off the map: a square hanging past its edge met it
