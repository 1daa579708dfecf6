"""Reprojection of tile footprints and query boxes (rasterio.warp + shapely)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform as warp_transform
from shapely.geometry import Polygon, box

from worker.errors import InputError


def parse_crs(text: str) -> CRS:
    try:
        return CRS.from_user_input(text)
    except CRSError as exc:
        raise InputError(f"unknown CRS {text!r} ({exc})") from exc


def reproject_rings(tiles: list, dst: CRS) -> list[Polygon]:
    """Each footprint's densified ring in `dst` (tiles, placements: anything with `raster` and
    `ring()`), one warp call per source raster."""
    out: list[Polygon | None] = [None] * len(tiles)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tiles):
        groups[t.raster.crs_wkt].append(i)
    for wkt, idx in groups.items():
        rings = np.stack([tiles[i].ring() for i in idx])
        src = CRS.from_wkt(wkt)
        if src == dst:
            xs, ys = rings[..., 0], rings[..., 1]
        else:
            xs, ys = warp_transform(src, dst, rings[..., 0].ravel(), rings[..., 1].ravel())
            xs, ys = np.asarray(xs).reshape(rings.shape[:2]), np.asarray(ys).reshape(rings.shape[:2])
        for j, i in enumerate(idx):
            out[i] = Polygon(np.column_stack([xs[j], ys[j]]))
    return out  # type: ignore[return-value]


def bounds_wgs84(items: list) -> np.ndarray:
    """(n, 4) lon/lat bounds of each footprint (see reproject_rings)."""
    if not items:
        return np.zeros((0, 4))
    return np.array([p.bounds for p in reproject_rings(items, CRS.from_epsg(4326))])


def bbox_to_wgs84(bbox: tuple[float, float, float, float], crs: CRS) -> Polygon:
    """A query box in any CRS as a densified WGS84 polygon."""
    minx, miny, maxx, maxy = bbox
    if not (minx < maxx and miny < maxy):
        raise InputError(f"bbox {list(bbox)} is empty: expected MINX,MINY,MAXX,MAXY with min < max")
    ring = np.asarray(shapely.segmentize(box(*bbox), max((maxx - minx), (maxy - miny)) / 16).exterior.coords)
    if crs == CRS.from_epsg(4326):
        return Polygon(ring)
    xs, ys = warp_transform(crs, CRS.from_epsg(4326), ring[:, 0], ring[:, 1])
    poly = Polygon(np.column_stack([xs, ys]))
    if not poly.is_valid or not np.isfinite(poly.bounds).all():
        raise InputError(f"bbox {list(bbox)} cannot be placed in WGS84 from {crs}")
    return poly
