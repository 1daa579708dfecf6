"""Strokes drawn on a map, turned into the place as the index's pixels show it.

A user traces what the map canvas shows, in the canvas's CRS; tiles are drawn from each
raster's own pixel grid. The two differ wherever the map's projection stretches or turns the
raster: a lon/lat raster of square degrees at 62°N shown in web Mercator is stretched 2.1
times north-south, a polar stereographic raster shown in lon/lat is turned by its longitude.
Searched as drawn, such a sketch missed the very place it traced (IoU 0). So the strokes are
taken through the ground where they were drawn (metres east and north) into the pixel grid of
the raster they were drawn over, or, drawn elsewhere, the raster holding the most tiles, where
that raster lies. Both maps are linear: a sketch is small beside a projection's curvature.

One grid for the whole search: in an index whose rasters see the ground differently (lon/lat
beside UTM, far north), those of the others are searched with the sketch as that grid sees it.
A frame sent with map strokes (strokes_frame) becomes the box round the frame as the grid
sees it (wider than the frame where the grid is turned against the map).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from rasterio.crs import CRS

from worker.errors import InputError
from worker.geo import (WGS84, followed, is_lon_lat_degrees, nearest_copy_x, parse_crs, transformed_or_inf,
                        world_width)
from worker.sketch import StrokeSketch, refuse_outside_their_frame
from worker.tiling import RasterInfo

log = logging.getLogger(__name__)

METRES_PER_DEGREE = 6_371_008.8 * np.pi / 180  # on the mean sphere: a linear map's scale, which cancels
STEP_OF_SPAN = 1e-3  # a finite difference's step, of the strokes' extent
STEP_M = 1.0  # on the ground, where a raster lies


def on_the_pixel_grid(sketch: StrokeSketch, rasters: dict[int, RasterInfo],
                      tiles: dict[int, int]) -> tuple[StrokeSketch, RasterInfo | None, bool]:
    """`sketch` drawn in a CRS (`sketch.crs`) as strokes in pixel coordinates of the raster it
    was drawn over (of `rasters` with `tiles` by id), else of the one holding the most tiles,
    that raster, and whether the strokes' centre lies on it; unchanged (across 180 degrees made
    whole), None and False when it has no CRS, when none of `rasters` holds a tile, or where the
    CRS cannot take its centre onto the ground (at a pole, past a projection's edge), as it was
    searched before. InputError for an empty frame, strokes outside their frame, and strokes
    the CRS places on no ground at all."""
    held = [rasters[i] for i in sorted(tiles, key=lambda i: -tiles[i]) if tiles[i] and i in rasters]
    if sketch.crs is None or not held or not sketch.strokes or not all(sketch.strokes):
        return sketch, None, False
    crs = parse_crs(sketch.crs)
    sketch = _whole_across_180(sketch, crs.to_wkt())
    unchanged = sketch, None, False
    refuse_outside_their_frame(sketch)  # in the user's numbers, not the grid's
    x0, y0, x1, y1 = sketch.extent()
    span = max(x1 - x0, y1 - y0)
    if not span > 0:  # a single point: load_sketch says so
        return unchanged
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    _refuse_off_the_earth(sketch, crs)
    to_ground = _ground_per_map_unit(sketch.crs, centre, span * STEP_OF_SPAN)
    if to_ground is None:
        return unchanged
    raster, lonlat, lies_on = _raster_under(held, to_ground[1])
    to_pixels = _pixels_per_ground(raster, lonlat)
    if to_pixels is None:
        return unchanged
    linear = to_pixels @ to_ground[0]
    if not np.isfinite(linear).all() or abs(np.linalg.det(linear)) < 1e-12 * np.abs(linear).max() ** 2:
        return unchanged
    log.debug("map strokes in %s onto the pixel grid of %s: %s", sketch.crs, raster.path, linear.round(4).tolist())

    def moved(points) -> tuple[tuple[float, float], ...]:
        return tuple(map(tuple, ((np.asarray(points, np.float64) - centre) @ linear.T).tolist()))

    frame = None
    if sketch.frame is not None:
        fx0, fy0, fx1, fy1 = sketch.frame
        corners = np.asarray(moved([(fx0, fy0), (fx1, fy0), (fx1, fy1), (fx0, fy1)]))
        frame = (*corners.min(0).tolist(), *corners.max(0).tolist())
    return (replace(sketch, strokes=tuple(moved(s) for s in sketch.strokes), y_up=False, frame=frame, crs=None),
            raster, lies_on)


def _whole_across_180(sketch: StrokeSketch, wkt: str) -> StrokeSketch:
    """Strokes across 180 degrees made whole in a CRS whose x wraps round the Earth (lon/lat, web
    Mercator): PROJ, and QGIS moving a sketch into another CRS, give their x a world apart on
    either side, and the place was read as wide as the world (traced over the Pacific, 160 px,
    it was searched as 240,000 px a side and missed: the stroke probe's finding). Only strokes
    more than half a world wide, as given, are moved: each followed point to point, then moved
    as one piece by whole turns to lie nearest the first; the frame as one piece beside them
    (one narrower than a world whose east is given west of its west, across 180). `wkt`: the
    strokes' CRS."""
    width = world_width(wkt)
    xs = [np.asarray([p[0] for p in s], np.float64) for s in sketch.strokes]
    if width is None or np.ptp(np.concatenate(xs)) <= width / 2:
        return sketch
    first = followed(xs[0], width).mean()
    whole = [nearest_copy_x(x, wkt, first, whole=True) for x in xs]
    strokes = tuple(tuple(zip(x.tolist(), (p[1] for p in s))) for x, s in zip(whole, sketch.strokes))
    frame = sketch.frame
    if frame is not None and abs(frame[2] - frame[0]) < width:
        west, east = frame[0], frame[2] + (width if frame[2] < frame[0] else 0.0)
        joined = np.concatenate(whole)
        middle = (joined.min() + joined.max()) / 2
        shift = width * np.round(((west + east) / 2 - middle) / width)
        frame = (west - shift, frame[1], east - shift, frame[3])
    return replace(sketch, strokes=strokes, frame=frame)


def _refuse_off_the_earth(sketch: StrokeSketch, crs: CRS) -> None:
    """InputError for strokes their CRS places on no ground: latitudes past a pole in lon/lat
    (projected numbers sent as EPSG:4326), or where PROJ places nothing. They were searched as
    if drawn on a pad, without a word, where a search area of the same numbers was refused."""
    points = np.array([p for s in sketch.strokes for p in s], np.float64)
    if is_lon_lat_degrees(crs) and (np.abs(points[:, 1]) > 90).all():
        raise InputError(f"sketch strokes lie wholly past a pole in {sketch.crs} (latitudes beyond 90 degrees): are "
                         "these projected coordinates? Name their CRS (strokes_crs)")
    lons, lats = transformed_or_inf(crs, WGS84, points[:, 0], points[:, 1])
    if not (np.isfinite(lons) & np.isfinite(lats)).any():
        raise InputError(f"sketch strokes lie where {sketch.crs} places no ground (past its edges): are these "
                         "coordinates in that CRS? Name their CRS (strokes_crs)")


def _ground_per_map_unit(crs: str, at: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The 2x2 map from a CRS's (dx, dy) at `at` to metres (east, north) on the ground there,
    and `at` in lon/lat; None where the CRS cannot place it."""
    xs = at[0] + np.array([0.0, step, -step, 0.0, 0.0])
    ys = at[1] + np.array([0.0, 0.0, 0.0, step, -step])
    lons, lats = (np.asarray(v, np.float64) for v in transformed_or_inf(crs, WGS84, xs, ys))
    if not (np.isfinite(lons).all() and np.isfinite(lats).all()) or abs(lats[0]) >= 89.9:
        return None
    east = (np.mod(lons - lons[0] + 180.0, 360.0) - 180.0) * np.cos(np.radians(lats[0])) * METRES_PER_DEGREE
    north = (lats - lats[0]) * METRES_PER_DEGREE
    jacobian = np.array([[east[1] - east[2], east[3] - east[4]],
                         [north[1] - north[2], north[3] - north[4]]]) / (2 * step)
    return jacobian, np.array([lons[0], lats[0]])


def _raster_under(held: list[RasterInfo], lonlat: np.ndarray) -> tuple[RasterInfo, np.ndarray, bool]:
    """The first of `held` (most tiles first) whose pixels hold the point `lonlat`, that point,
    and True; else the first, its centre in lon/lat, and False. One transform per CRS; the point a world
    away where the raster lies past 180 degrees (lon/lat from 0 to 360): traced there on a
    projected map, strokes at -170 were said to lie off the raster at 190, and were searched
    as the grid of another raster sees them."""
    for wkt in dict.fromkeys(r.crs_wkt for r in held):
        (x,), (y,) = transformed_or_inf(WGS84, wkt, [lonlat[0]], [lonlat[1]])
        for raster in (r for r in held if r.crs_wkt == wkt):
            col, row = ~raster.affine * (nearest_copy_x(np.array([x]), wkt, raster.centre[0])[0], y)
            if 0 <= col <= raster.width and 0 <= row <= raster.height:
                return raster, lonlat, True
    first = held[0]
    (lon,), (lat,) = transformed_or_inf(first.crs_wkt, WGS84, *([v] for v in first.centre))
    return first, np.array([lon, lat]), False


def _pixels_per_ground(raster: RasterInfo, lonlat: np.ndarray) -> np.ndarray | None:
    """The 2x2 map from metres (east, north) on the ground at `lonlat` to the raster's (col,
    row) pixels; None where its CRS cannot place the point."""
    lon, lat = lonlat
    if not np.isfinite(lonlat).all() or abs(lat) >= 89.9:
        return None
    d_lon = STEP_M / (METRES_PER_DEGREE * np.cos(np.radians(lat)))
    d_lat = STEP_M / METRES_PER_DEGREE
    xs, ys = transformed_or_inf(WGS84, raster.crs_wkt, [lon + d_lon, lon - d_lon, lon, lon],
                          [lat, lat, lat + d_lat, lat - d_lat])
    xs = nearest_copy_x(np.asarray(xs, np.float64), raster.crs_wkt, raster.centre[0])  # as _raster_under
    cols, rows = ~raster.affine * (xs, np.asarray(ys, np.float64))
    jacobian = np.array([[cols[0] - cols[1], cols[2] - cols[3]],
                         [rows[0] - rows[1], rows[2] - rows[3]]]) / (2 * STEP_M)
    return jacobian if np.isfinite(jacobian).all() else None
