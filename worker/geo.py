"""Reprojection of tile footprints and query boxes (rasterio.warp + shapely)."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, lru_cache, partial

import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform as warp_transform
import shapely.affinity
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.polygon import orient

from wire.protocol import excerpt
from worker.errors import InputError

WGS84 = CRS.from_epsg(4326)
Area = Polygon | MultiPolygon  # a search area in lon/lat: one across 180 degrees is its world copies
MAX_CRS_CHARS = 20_000  # a long PROJJSON is a few thousand characters
# of a box a client gives (a search area, an example): any CRS's coordinates on Earth are far smaller
# (50,000 times its circumference in metres); PROJ's time grows with them past it, holding the GIL:
# a box at 1e15 in EPSG:3857 took 15 s to place, one at 1e20 never finished, and the worker stopped answering
MAX_COORDINATE = 1e12
# EPSG:32618+5703 is a compound CRS (a map's and a height's), as a raster carrying heights names it
AUTHORITY_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_]*:{1,2}[A-Za-z0-9_.]+(\+[A-Za-z0-9_.]+)?"
                            r"|urn:ogc:def:crs:[A-Za-z0-9_]+:[0-9.]*:[A-Za-z0-9_.]+")
WKT = re.compile(r"\s*[A-Z_]+\s*\[", re.IGNORECASE)
SEMI_MAJOR_AXIS = re.compile(r'SPHEROID\["[^"]*",\s*([0-9.eE+-]+)')
EARTH_SEMI_MAJOR_M = (6_300_000.0, 6_400_000.0)  # every Earth ellipsoid and sphere; Mars's is 3,396,190 m
# what makes PROJ open a file (a grid, an init file): a path there is read, and a FIFO or a
# terminal blocks the reading thread inside PROJ while it holds the interpreter lock
FILE_REFERENCES = ("parameterfile", "extension", "+proj", "+init", "proj=", "nadgrids", "geoidgrids")


def parse_crs(text: str) -> CRS:
    """A CRS named by an authority code (EPSG:4326, ESRI:102100, OGC:CRS84), WKT or PROJJSON.
    PROJ strings and definitions that name files (grids, init files) are refused: they would
    make PROJ open paths a request chooses."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("a CRS must be a non-empty string such as EPSG:4326")
    if len(text) > MAX_CRS_CHARS:
        raise InputError(f"CRS {excerpt(text)} is longer than {MAX_CRS_CHARS} characters")
    if not AUTHORITY_CODE.fullmatch(text.strip()):
        _check_definition(text)
    try:
        with gdal_said() as said:
            crs = CRS.from_user_input(text.strip())
    except CRSError as exc:
        detail = f"{exc}: {said[-1]}" if said and said[-1] not in str(exc) else str(exc)
        raise InputError(f"unknown CRS {excerpt(text)} ({detail[:200]})") from exc
    _check_on_a_map(crs, text)
    return crs


@contextmanager
def gdal_said() -> Iterator[list[str]]:
    """The messages GDAL gives while the block runs, kept instead of printed: its own `ERROR 1:
    PROJ: ...` line came before the worker's, and rasterio's exception alone may not say why
    ("OGR Error code 6" for an unknown ESRI code). Inside a rasterio Env, rasterio logs them at
    INFO; one block at a time holds that logger (the block should be short)."""
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(str(record.args[-1]) if record.args else record.getMessage())

    keep, logger = Keep(), logging.getLogger("rasterio._env")
    with _GDAL_SAID:
        level, propagate = logger.level, logger.propagate
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(keep)
        try:
            with rasterio.Env():
                yield said
        finally:
            logger.removeHandler(keep)
            logger.setLevel(level)
            logger.propagate = propagate


_GDAL_SAID = threading.Lock()


def _check_on_a_map(crs: CRS, text: str) -> None:
    """InputError for a CRS that cannot place a box or a hit on a map of the Earth: heights,
    Earth-centred XYZ, local engineering systems, or another body's (they gave meaningless
    coordinates, or an `internal` error). Another body is told by its ellipsoid: a point
    transformed to lon/lat fails also for an Earth CRS whose projection does not reach it
    (Gauss-Kruger zones with their zone in the false easting, at (0, 0))."""
    if not (crs.is_geographic or crs.is_projected):
        raise InputError(f"CRS {excerpt(text)} is not a map's (lon/lat or projected x, y): heights, Earth-centred "
                         "XYZ and local engineering systems cannot place a box or a hit on a map")
    axes = [float(a) for a in SEMI_MAJOR_AXIS.findall(crs.to_wkt())]  # WKT1: in metres
    if any(not EARTH_SEMI_MAJOR_M[0] < a < EARTH_SEMI_MAJOR_M[1] for a in axes):
        raise InputError(f"CRS {excerpt(text)} is not the Earth's (its ellipsoid's equatorial radius is {axes[0]:,.0f} m, "
                         "not about 6,378 km): hits on Earth cannot be placed in it")


def _check_definition(text: str) -> None:
    """WKT or PROJJSON without file references, or InputError saying what is accepted."""
    lowered = text.lower()
    named = [word for word in FILE_REFERENCES if word in lowered]
    if named:
        raise InputError(f"CRS {excerpt(text)} names files or PROJ options ({', '.join(named)}): give an authority "
                         "code such as EPSG:4326, or WKT or PROJJSON without grids")
    if text.lstrip().startswith("{"):
        try:
            definition = json.loads(text)
        except (ValueError, RecursionError):
            raise InputError(f"CRS {excerpt(text)} is not valid PROJJSON") from None
        if _has_text_value(definition):  # a parameter whose value is a string names a file
            raise InputError(f"CRS {excerpt(text)} names a parameter file: give a CRS without grids")
    elif not WKT.match(text):
        raise InputError(f"CRS {excerpt(text)} is not an authority code (EPSG:4326), WKT or PROJJSON")


def _has_text_value(node: object, depth: int = 0) -> bool:
    if depth > 64:
        return True  # no CRS nests this deep
    if isinstance(node, dict):
        return isinstance(node.get("value"), str) or any(_has_text_value(v, depth + 1) for v in node.values())
    if isinstance(node, list):
        return any(_has_text_value(v, depth + 1) for v in node)
    return False


def reproject_rings(tiles: list, dst: CRS) -> list[Polygon]:
    """Each footprint's densified ring in `dst`, for tiles or placements (all of one kind: its
    class's `rings`), one warp call per source CRS; an empty polygon where a projected `dst`
    cannot place it (_unplaced). A place reaching past a world map's outline is drawn as about
    its part on Earth (_ends_on_earth), apart from the others, which are drawn as ever."""
    out: list[Polygon | None] = [None] * len(tiles)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tiles):
        groups[t.raster.crs_wkt].append(i)
    for wkt, idx in groups.items():
        rings = type(tiles[idx[0]]).rings([tiles[i] for i in idx])
        src = CRS.from_wkt(wkt)
        if is_lon_lat_degrees(src):  # a place in a world raster reaching past its pole: the part on Earth
            rings[..., 1] = np.clip(rings[..., 1], -90.0, 90.0)  # (PROJ refused the whole search's hits)
        lonlats = cache(partial(_lonlats, src, rings))  # warped once, and only where a world map needs them
        refused = False
        if src == dst:
            xs, ys = rings[..., 0], rings[..., 1]
        else:
            past = None  # which places reach past a world map's outline, once looked at
            try:
                xs, ys = warp_transform(src, dst, rings[..., 0].ravel(), rings[..., 1].ravel())
                refused = not (np.isfinite(xs).all() and np.isfinite(ys).all())
                if not refused and _narrows_to_the_poles(wkt):  # PROJ wraps a point past its outline round the world
                    past = _past_the_outline(rings, src)
                    refused = bool(past.any())
            except Exception:  # PROJ refused a point (its errors have no common type): it failed the whole call
                refused = True
            if refused:  # a point off Earth (NaN, or the call failed), or one `dst` cannot place
                past = _past_the_outline(rings, src) if past is None else past
                if past.any() and not past.all():  # those on Earth drawn as ever, apart from them
                    for rows in (np.flatnonzero(~past), np.flatnonzero(past)):
                        for n, polygon in zip(rows, reproject_rings([tiles[idx[n]] for n in rows], dst)):
                            out[idx[n]] = polygon
                    continue
                rings, moved = _ends_on_earth(_denser(rings, REFUSED_DENSER), src) if past.any() else \
                    (rings, np.zeros(rings.shape[:2], bool))
                lonlats = cache(partial(_lonlats, src, rings))
                xs, ys = transformed_or_inf(src, dst, rings[..., 0].ravel(), rings[..., 1].ravel())
                xs, ys = (np.where(np.isnan(v), np.inf, v) for v in (np.asarray(xs), np.asarray(ys)))  # _unplaced
            xs, ys = np.asarray(xs).reshape(rings.shape[:2]), np.asarray(ys).reshape(rings.shape[:2])
            xs = _unwrapped(xs, dst, lonlats)
            if refused and is_lon_lat_degrees(dst):
                xs, ys = _moved_in_lon_lat(xs, ys, moved)
        polygons = shapely.polygons(np.stack([xs, ys], axis=-1))
        if is_lon_lat_degrees(dst):  # a pole in other units (grads) lies elsewhere
            on_pole = np.abs(ys) >= POLE_LAT  # a point on a pole has no longitude (PROJ gives 0)
            for n in np.flatnonzero(_winds_round_a_pole(xs) | on_pole.any(axis=1)):
                if on_pole[n].any():  # the ring from just past the pole (a flat pole's line) round to just before it
                    path = _off_the_pole(on_pole[n][:-1])
                    polygons[n] = _polar_cap(xs[n][path], ys[n][path]) if len(path) >= 2 else Polygon()
                else:
                    polygons[n] = _polar_cap(xs[n], ys[n])
        else:
            edges = _mercator_edges(dst.to_wkt())
            if edges is not None:  # y grows with latitude: no lon/lat needed
                beyond = np.flatnonzero((~np.isfinite(ys) | (ys < edges[0]) | (ys > edges[1])).any(axis=1))
                lonlat = reproject_rings([tiles[idx[n]] for n in beyond], WGS84) if len(beyond) else []
                for n, footprint in zip(beyond, lonlat):
                    polygons[n] = _at_mercators_edge(footprint, dst) if not footprint.is_empty else Polygon()
            redraw = ~shapely.is_valid(polygons)
            if edges is None and src != dst and _world(dst.to_wkt()) is not None:  # a ring round a pole came out a band
                lons, lats = lonlats()
                redraw |= _winds_round_a_pole(lons) | (np.abs(lats) >= POLE_LAT).any(axis=1)
            redrawn = np.flatnonzero(redraw)
            lonlat = reproject_rings([tiles[idx[n]] for n in redrawn], WGS84) if len(redrawn) else []
            for n, footprint in zip(redrawn, lonlat):
                polygons[n] = _redrawn(footprint, dst) or polygons[n]
            if src != dst:
                polygons[_unplaced(polygons, rings, src, dst)] = Polygon()
        if refused:  # points moved onto a world map's edge can come back along one line, crossing it
            for n in np.flatnonzero(~shapely.is_valid(polygons)):
                polygons[n] = _largest_part(polygons[n]) or Polygon()
        for i, polygon in zip(idx, polygons):
            out[i] = polygon
    return out  # type: ignore[return-value]


def _ends_on_earth(rings: np.ndarray, src: CRS) -> tuple[np.ndarray, np.ndarray]:
    """Rings (n, k, 2) in `src`, each point off Earth (past a world map's outline, which PROJ
    refuses: the tiles at the edge of a whole-world Mollweide raster) moved towards the
    projection's centre until it is on Earth (to within ON_EARTH_STEPS halvings): about the
    footprint of the part where the data lies, also for a tile over a pointed pole whose corners
    are all off Earth; and which points were moved (n, k). Their refusal failed the indexing of
    such a raster, and each of its searches (the georeferencing probe's)."""
    xs, ys = rings[..., 0].ravel(), rings[..., 1].ravel()
    off = ~_on_earth(src, xs, ys)[2]
    try:
        centre = src.to_dict()
        (mx,), (my,) = warp_transform(WGS84, src, [centre.get("lon_0", 0.0)], [centre.get("lat_0", 0.0)])
    except Exception:  # PROJ's errors have no common type: nowhere to move them to (left unplaced)
        return rings, np.zeros(rings.shape[:2], bool)
    px, py = xs[off], ys[off]
    near, far = np.ones(len(px)), np.zeros(len(px))  # shares of the way to the centre: on Earth, and not
    for _ in range(ON_EARTH_STEPS):
        half = (near + far) / 2
        on = _on_earth(src, px + (mx - px) * half, py + (my - py) * half)[2]
        near, far = np.where(on, half, near), np.where(on, far, half)
    moved = np.stack([xs.copy(), ys.copy()], axis=-1)
    moved[off] = np.stack([px + (mx - px) * near, py + (my - py) * near], axis=-1)
    moved, off = moved.reshape(rings.shape), off.reshape(rings.shape[:2])
    _put_on_the_pole(moved, off, rings, src, centre.get("lon_0", 0.0))
    return moved, off


def _put_on_the_pole(moved: np.ndarray, off: np.ndarray, rings: np.ndarray, src: CRS, lon_0: float) -> None:
    """A ring (n, k, 2) in `src` holding a pole on a world map's outline: its moved point
    (`off`) nearest the pole put on it, in place. Moved towards the middle, its points land on
    the outline on either side of the pole, and the footprint drawn between them left out the
    ground round the pole (a fifth of a turned place's data beside Mollweide's south pole)."""
    outlines = shapely.polygons(rings)
    for pole in (90.0, -90.0):
        try:
            (px,), (py,) = warp_transform(WGS84, src, [lon_0], [pole])
        except Exception:  # PROJ's errors have no common type: a map without that pole
            continue
        if not (np.isfinite(px) and np.isfinite(py)):
            continue
        for n in np.flatnonzero(off.any(axis=1) & shapely.contains_xy(outlines, px, py)):
            points = np.flatnonzero(off[n][:-1])
            nearest = points[np.argmin(np.hypot(moved[n, points, 0] - px, moved[n, points, 1] - py))]
            moved[n, nearest] = moved[n, -1 if nearest == 0 else nearest] = (px, py)  # the ring stays closed


ON_EARTH_STEPS = 24  # a world map's 40,000 km halved 24 times: within 3 m of its outline
POLE_SNAP = 1e-3  # degrees: a point moved onto a world map's outline this near a pole is on it (110 m)
# Points between each two of a ring's where PROJ refused some: a place at a world map's edge lies
# where the map bends most (beside a pointed pole a straight edge turns through 170 degrees of
# longitude), and chords between 4 points an edge left out a twentieth of a place's data there.
REFUSED_DENSER = 4


def _denser(rings: np.ndarray, times: int) -> np.ndarray:
    """Closed rings (n, k, 2) with `times` - 1 points put evenly along each edge: (n, times (k - 1) + 1, 2)."""
    steps = np.arange(times) / times
    starts, ends = rings[:, :-1, None, :], rings[:, 1:, None, :]
    points = (starts + (ends - starts) * steps[None, None, :, None]).reshape(len(rings), -1, 2)
    return np.concatenate([points, rings[:, :1]], axis=1)


def _narrows_to_the_poles(wkt: str) -> bool:
    """Whether a CRS is a world map narrowing towards the poles (Mollweide, Equal Earth,
    sinusoidal): PROJ wraps some of them a point past their outline round the world instead of
    refusing it, and a place at such a raster's edge was drawn over ground where it holds no data
    (a probe's)."""
    return _world(wkt) is not None and not _cylindrical(wkt)


def _past_the_outline(rings: np.ndarray, src: CRS) -> np.ndarray:
    """Which rings (n, k, 2) in `src` hold a point off Earth (_on_earth): (n,) bool."""
    return ~_on_earth(src, rings[..., 0].ravel(), rings[..., 1].ravel())[2].reshape(rings.shape[:2]).all(axis=1)


def _moved_in_lon_lat(lons: np.ndarray, lats: np.ndarray, moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rings (n, k) in lon/lat some of whose points were moved onto a world map's outline
    (_ends_on_earth): those within POLE_SNAP of a pole put on it, so that a ring over a pointed
    pole is seen to go round it (and one along a flat pole's line to follow it), and each such
    ring's longitudes followed step by step (its points on the outline lie at -180 and 180, and
    a ring spanning more than half the world was moved a world east in part)."""
    lats = np.where(moved & (np.abs(np.abs(lats) - 90.0) < POLE_SNAP), np.sign(lats) * 90.0, lats)
    lons = lons.copy()
    for n in np.flatnonzero(moved.any(axis=1) & np.isfinite(lons).all(axis=1)):
        path = followed(lons[n])
        lons[n] = path - 360.0 * np.floor((path.min() + 180.0) / 360.0)
    return lons, lats


def _off_the_pole(on_pole: np.ndarray) -> np.ndarray:
    """The indexes of a ring's distinct points (on_pole: which lie on a pole), from just past the
    pole round to just before it, those on it left out: a flat pole's line of them (Robinson),
    started after its first, crossed the cap drawn."""
    last = np.flatnonzero(on_pole & ~np.roll(on_pole, -1))
    order = np.roll(np.arange(len(on_pole)), -(last[0] + 1) if len(last) else 0)
    return order[~on_pole[order]]


def _unplaced(polygons: np.ndarray, rings: np.ndarray, src: CRS, dst: CRS) -> np.ndarray:
    """Which footprints (rings (n, k, 2) in `src`, `polygons` drawn in a projected `dst`) `dst`
    cannot place: a point past MAX_COORDINATE (a corner on the point the projection draws
    infinitely far, a polar stereographic's other pole: 1e23 m), and, in a CRS whose x does not
    wrap round the world, a footprint holding that point: its ring came out round the rest of
    the Earth, inside out (a 2.6 km square over the South Pole, in the Arctic's EPSG:3413, a
    ring of 1e11 m holding the North Pole). A place drawn as it is keeps its centre inside."""
    points = shapely.get_coordinates(polygons, return_index=True)
    too_far = np.zeros(len(polygons), bool)
    np.logical_or.at(too_far, points[1], (np.abs(points[0]) >= MAX_COORDINATE).any(axis=1))
    if _world(dst.to_wkt()) is not None:  # a world map: drawn between its edges (_unwrapped, _redrawn)
        return too_far
    centres = rings[:, :-1].mean(axis=1)  # of the closed ring's distinct points: inside the (turned) square
    xs, ys = transformed_or_inf(src, dst, centres[:, 0], centres[:, 1])
    return too_far | ~shapely.contains_xy(polygons, np.asarray(xs), np.asarray(ys))


MERCATOR_LAT = 85.0511287798  # where a Mercator map of the world ends square (web maps): it draws a pole infinitely far


@lru_cache(maxsize=16)
def _mercator_edges(wkt: str) -> tuple[float, float] | None:
    """The y of MERCATOR_LAT south and north in a Mercator CRS; None for any other."""
    crs = CRS.from_wkt(wkt)
    if not (crs.is_projected and crs.to_dict().get("proj") == "merc"):
        return None
    _, ys = warp_transform(WGS84, crs, [0.0, 0.0], [-MERCATOR_LAT, MERCATOR_LAT])
    return float(ys[0]), float(ys[1])


EDGE_STRIP = 0.01  # degrees of latitude: a hit wholly past a Mercator map's edge is drawn as a strip along it


def _at_mercators_edge(footprint: Polygon, dst: CRS) -> Polygon:
    """A lon/lat footprint reaching past MERCATOR_LAT in a Mercator `dst`: its part within, or,
    wholly past it, a strip EDGE_STRIP wide along the map's edge at its longitudes. Projected
    whole, a footprint round a pole was a ring 56,000 km south of the equator, crossing itself,
    and a zoom to it in QGIS showed empty map."""
    within = shapely.make_valid(footprint).intersection(box(-720.0, -MERCATOR_LAT, 720.0, MERCATOR_LAT))
    parts = [p for p in shapely.get_parts(within) if p.geom_type == "Polygon" and p.area > 0]
    if parts:
        shape = max(parts, key=lambda p: p.area)
    else:
        west, south, east, _ = footprint.bounds
        edge = MERCATOR_LAT if south > 0 else -MERCATOR_LAT
        shape = shapely.segmentize(box(west, min(edge, edge - np.sign(edge) * EDGE_STRIP), east,
                                       max(edge, edge - np.sign(edge) * EDGE_STRIP)), 1.0)
    ring = np.asarray(orient(shape).exterior.coords)
    xs, ys = (np.asarray(v) for v in warp_transform(WGS84, dst, ring[:, 0], ring[:, 1]))
    wkt = dst.to_wkt()
    return Polygon(np.column_stack([nearest_copy_x(xs, wkt, _world(wkt)[1], whole=True), ys]))


REDRAW_STEP = 2.0  # degrees between the points of a footprint drawn again from lon/lat (_redrawn)
REDRAW_TOLERANCE = 1e-4  # of its size: how far a redrawn footprint's edge may stray from the curve it follows
NOISE_SHARE = 0.99  # of a redrawn footprint's area, kept whole where its ring crossed itself only in slivers
REDRAW_PASSES = 12  # halvings of an edge, at most


def _redrawn(lonlat: Polygon, dst: CRS) -> Polygon | None:
    """A footprint whose ring crossed itself in a projected `dst`, drawn again from its lon/lat
    polygon (`lonlat`, reproject_rings': valid, a cap round a pole closed along it), its edges
    halved until each follows its curve in `dst` (_followed_closely): near a pole a world map
    (Mollweide, Equal Earth, plate carree) bends a raster's straight edge so far that 16 points
    crossed, and a ring round the pole jumped across the map. A cap is cut at the map's own edge
    (180 degrees from its central meridian) and drawn whole between them. None where that
    crosses itself too, or cannot be placed (a pole that the projection draws infinitely far)."""
    if not lonlat.is_valid:  # a place past a world map's outline, drawn as its part on Earth (_ends_on_earth)
        lonlat = _largest_part(lonlat)
        if lonlat is None:
            return None
    west, _, east, _ = lonlat.bounds
    cap = east - west >= 360.0 - 1e-6
    centre = _central_meridian(dst)
    if cap:  # and kept just inside the map's edges: PROJ puts a point on one at either side
        lonlat = cut_at_antimeridian(lonlat, centre=centre)
        lonlat = lonlat.intersection(box(centre - EDGE_LON, -90, centre + EDGE_LON, 90))
        if lonlat.geom_type != "Polygon":
            return None

    def projected(lons: np.ndarray, lats: np.ndarray) -> np.ndarray:
        xs, ys = (np.asarray(v) for v in warp_transform(WGS84, dst, lons, lats))
        if not cap:
            xs = _unwrapped(xs[None], dst, lambda: (lons[None], lats[None]))[0]
        return np.column_stack([xs, ys])

    ring = np.asarray(shapely.segmentize(lonlat, REDRAW_STEP).exterior.coords)
    on_pole = np.abs(ring[:, 1]) >= 90.0
    ring = ring[~(on_pole & np.roll(on_pole, 1) & np.roll(on_pole, -1))]  # a pole's edge is straight on these maps
    try:
        ring = _followed_closely(ring, projected)
    except Exception:  # PROJ's errors have no common type
        return None
    if ring is None or not np.isfinite(ring).all():
        return None
    polygon = Polygon(ring)
    return polygon if polygon.is_valid else _largest_part(polygon)


def _largest_part(polygon: Polygon) -> Polygon | None:
    """An invalid polygon's largest part, made valid, where it holds most of their area (less
    PROJ's noise where it draws a pole as a point); else None."""
    parts = [p for p in shapely.get_parts(shapely.get_parts(shapely.make_valid(polygon))) if p.geom_type == "Polygon"]
    largest = max(parts, key=lambda p: p.area, default=None)
    return largest if largest is not None and largest.area >= NOISE_SHARE * sum(p.area for p in parts) else None


def _followed_closely(lonlats: np.ndarray, projected) -> np.ndarray | None:
    """A lon/lat ring (k, 2) projected (`projected(lons, lats)` -> (k, 2)), each edge halved in
    lon/lat while its middle lies off the straight edge drawn, by more than REDRAW_TOLERANCE of
    the ring's size: a meridian near Mollweide's pointed pole bends so sharply that its chord
    crossed the footprint beside it. None where it cannot be placed (points not finite)."""
    points = projected(lonlats[:, 0], lonlats[:, 1])
    if not np.isfinite(points).all():
        return None
    tolerance = REDRAW_TOLERANCE * float(np.hypot(*np.ptp(points, axis=0)))
    for _ in range(REDRAW_PASSES):
        middles = (lonlats[:-1] + lonlats[1:]) / 2
        both = np.empty((2 * len(lonlats) - 1, 2))
        both[0::2], both[1::2] = lonlats, middles
        drawn = projected(both[:, 0], both[:, 1])
        if not np.isfinite(drawn).all():
            return None
        off = np.hypot(*(drawn[1::2] - (drawn[0:-1:2] + drawn[2::2]) / 2).T) > tolerance
        if not off.any():
            return drawn[0::2]
        keep = np.ones(len(both), bool)
        keep[1::2] = off
        lonlats = both[keep]
    return projected(lonlats[:, 0], lonlats[:, 1])


POLE_LAT = 90.0 - 1e-9


def followed(xs: np.ndarray, width: float = 360.0) -> np.ndarray:
    """x along paths (the last axis) followed step by step, each step the short way round a
    world `width` wide (360 in lon/lat): a path that crosses 180 degrees made whole. Each point
    moves by whole worlds, so a ring that does not wind round a pole stays exactly closed (summed
    steps drifted: a ring ending 1e-9 past its start crossed itself there)."""
    turns = np.round(np.diff(xs, axis=-1) / width)
    return xs - width * np.concatenate([np.zeros_like(xs[..., :1]), np.cumsum(turns, axis=-1)], axis=-1)


def _winds_round_a_pole(xs: np.ndarray) -> np.ndarray:
    """Which lon/lat rings (n, k) go round a pole: their longitudes, followed step by step, turn
    a whole 360 degrees (a footprint over the pole of a polar raster)."""
    path = followed(xs)
    turns = path[:, -1] - path[:, 0]
    return np.isfinite(turns) & (np.abs(turns) > 180.0)


def _polar_cap(xs: np.ndarray, ys: np.ndarray) -> Polygon:
    """A ring round a pole, or the path of a ring through it from just past the pole to just
    before it, as a valid lon/lat polygon: its longitudes followed, closed along the pole, and
    placed as every footprint is (reproject_rings): from its west within -180..180, past 180
    only where it crosses it; a ring round the pole, 360 degrees of them, from -180 to 180. As a
    ring it crosses itself and fails shapely's operations (a search over a polar raster failed
    in GEOS). Placed from its first point, a cap followed westwards lay a world west of the map
    (-530 to -170 degrees), in the worker's replies and an index's tiles layer."""
    lons = followed(xs)
    lons -= 360.0 * np.floor((lons.min() + 180.0) / 360.0)
    pole = 90.0 if np.mean(ys) > 0 else -90.0
    cap = orient(Polygon([*zip(lons, ys), (lons[-1], pole), (lons[0], pole)]))
    if np.ptp(lons) < 360.0 - 1e-9:
        return cap
    joined = cut_at_antimeridian(cap)  # its two parts either side of 180 meet again: one polygon
    return joined if joined.geom_type == "Polygon" else cap


def _unwrapped(xs: np.ndarray, dst: CRS, lonlats=None) -> np.ndarray:
    """Rings (n, k) of x in `dst` that cross the antimeridian, made whole: in a CRS whose x wraps
    round the world (lon/lat, web Mercator), a footprint across 180 degrees jumps from one edge to
    the other and would become a band round the world; its western points are moved one world
    east (x past the CRS's edge, which GIS software draws where it belongs). In a world map whose
    width shrinks towards the poles (Mollweide, Robinson, Equal Earth), the points are told by
    their longitudes (`lonlats`: a function giving the rings' (lons, lats)) and moved one world
    at their latitude: the equator's width moved a footprint at 60 degrees 12,000 km, and a jump
    judged by x alone was seen in a footprint spanning 110 degrees of longitude near a pole."""
    wkt = dst.to_wkt()
    world = _world(wkt)
    if world is None or not np.isfinite(xs).all():
        return xs
    width, middle = world
    if not _cylindrical(wkt) and lonlats is not None:
        lons, lats = lonlats()
        placed = np.isfinite(lons).all(axis=1) & np.isfinite(lats).all(axis=1)  # a ring with a point off Earth: as is
        widths = _widths_at(wkt, np.where(placed[:, None], lats, 0.0))
        drawn = (xs - middle) / widths * 360.0  # degrees from the central meridian where PROJ drew each point
        worlds = np.round((followed(np.where(placed[:, None], lons, 0.0)) - _central_meridian(dst) - drawn) / 360.0)
        worlds -= worlds.min(axis=1, keepdims=True)  # 1: a point of a ring across the map's edge drawn at its west
        worlds[~placed] = 0
        return xs + worlds * widths if worlds.any() else xs
    jumps = np.ptp(xs, axis=1) > width / 2
    if jumps.any():
        xs = xs.copy()
        xs[jumps] = np.where(xs[jumps] < middle, xs[jumps] + width, xs[jumps])
    return xs


def _lonlats(src: CRS, rings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The longitude and latitude of each point of rings (n, k, 2) in `src`."""
    lons, lats = warp_transform(src, WGS84, rings[..., 0].ravel(), rings[..., 1].ravel())
    return np.asarray(lons).reshape(rings.shape[:2]), np.asarray(lats).reshape(rings.shape[:2])


def _widths_at(dst_wkt: str, lats: np.ndarray) -> np.ndarray:
    """How far x runs once round the world at each latitude (any shape) in a CRS whose x wraps;
    the equator's where PROJ cannot say."""
    width = _world(dst_wkt)[0]
    flat = np.clip(np.asarray(lats, float).ravel(), -POLE_LAT, POLE_LAT)
    try:
        xs = _xs_from_centre(CRS.from_wkt(dst_wkt), np.repeat([-EDGE_LON, EDGE_LON], len(flat)), np.tile(flat, 2))
        widths = _turn(xs[:len(flat)], xs[len(flat):])
    except Exception:  # PROJ's errors have no common type
        widths = np.full_like(flat, width)
    widths = np.where(np.isfinite(widths) & (widths > 0), widths, width)
    return widths.reshape(np.shape(lats))


EDGE_LON = 179.999  # degrees either side of a CRS's central meridian: its world's edges, each on its own side


def _xs_from_centre(dst: CRS, offsets: np.ndarray, lats: np.ndarray) -> np.ndarray:
    """x in `dst` of points `offsets` degrees east of its central meridian, at `lats`."""
    centre = _central_meridian(dst)
    xs, _ = warp_transform(WGS84, dst, centre + np.asarray(offsets, float), np.asarray(lats, float))
    return np.asarray(xs)


def _central_meridian(crs: CRS) -> float:
    """The longitude a projected CRS is centred on (its lon_0; 0 where it names none)."""
    return float(crs.to_dict().get("lon_0", 0.0))


def _turn(west: np.ndarray, east: np.ndarray) -> np.ndarray:
    """The x of one whole turn round the Earth from the x of its edges (EDGE_LON either side)."""
    return (east - west) * 360.0 / (2 * EDGE_LON)


def nearest_copy_x(xs: np.ndarray, crs_wkt: str, centre_x: float, whole: bool = False) -> np.ndarray:
    """x in a CRS (points from PROJ) moved by whole turns round the Earth to lie nearest
    `centre_x` (a raster's centre), in a CRS whose x wraps (lon/lat, web Mercator): PROJ gives a
    point past 180 degrees a world away, at the CRS's other edge, from a raster that crosses 180.
    Each point alone, or with `whole`, a ring (xs in order) made whole first and moved as one, so
    that a box wider than the raster is not torn in two on a raster round the whole world."""
    world = _world(crs_wkt)
    if world is None:
        return xs
    width = world[0]
    if whole:
        xs = followed(xs, width)
        return xs - width * np.round((xs.mean() - centre_x) / width)
    return xs - width * np.round((xs - centre_x) / width)


def nearest_copy(shape: Polygon, crs: CRS, centre_x: float) -> Polygon:
    """A footprint in `crs` (reproject_rings': whole) moved by whole turns round the Earth so that
    its middle lies nearest `centre_x`, in a CRS whose x wraps; as it is in any other, or empty."""
    if shape.is_empty:
        return shape
    west, _, east, _ = shape.bounds
    middle = (west + east) / 2
    moved = float(nearest_copy_x(np.array([middle]), crs.to_wkt(), centre_x)[0])
    return shapely.affinity.translate(shape, moved - middle) if moved != middle else shape


def world_width(crs_wkt: str) -> float | None:
    """How far x runs once round the equator in a CRS whose x wraps (360 in lon/lat degrees, 2 x
    20,037,508 m in web Mercator); None in any other."""
    world = _world(crs_wkt)
    return None if world is None else world[0]


@lru_cache(maxsize=16)
def _world(dst_wkt: str) -> tuple[float, float] | None:
    """How far x runs once round the equator in a CRS, and its middle (360 and 0 in lon/lat in
    degrees, 400 in grads); None where that is no CRS whose x wraps round (x not growing eastwards
    over the whole turn)."""
    dst = CRS.from_wkt(dst_wkt)
    if dst.is_geographic:
        return 2 * np.pi / dst.units_factor[1], 0.0
    try:
        xs = _xs_from_centre(dst, np.array([-EDGE_LON, -90.0, 0.0, 90.0, EDGE_LON]), np.zeros(5))
    except Exception:  # PROJ's errors have no common type
        return None
    if not np.isfinite(xs).all() or not (np.diff(xs) > 0).all():
        return None
    return float(_turn(xs[0], xs[-1])), (xs[-1] + xs[0]) / 2


@lru_cache(maxsize=16)
def _cylindrical(dst_wkt: str) -> bool:
    """Whether a CRS whose x wraps is as wide at 60 degrees as at the equator (lon/lat, Mercator,
    plate carree), not a world map narrowing towards the poles."""
    if CRS.from_wkt(dst_wkt).is_geographic:
        return True
    return bool(np.isclose(_widths_at(dst_wkt, np.array([60.0]))[0], _world(dst_wkt)[0], rtol=1e-6))


def is_lon_lat_degrees(crs: CRS) -> bool:
    """Whether a CRS is longitude and latitude in degrees from Greenwich: what a GeoJSON file's
    cut at 180 degrees (RFC 7946) and a polar cap's 90 degrees are written in."""
    return bool(crs.is_geographic and np.isclose(crs.units_factor[1], np.pi / 180) and "pm" not in crs.to_dict())


def transformed_or_inf(src, dst, xs, ys) -> tuple[list[float], list[float]]:
    """Points from one CRS to another (CRS objects, codes or WKT), a point PROJ cannot place as
    infinity (its own answer for most). Where PROJ refuses the whole call for one point, each
    half is asked again, down to that point alone: every point of the call was infinity, and a
    place beside the South Pole could not be placed in EPSG:3034 beside one on the pole (found by
    a review)."""
    try:
        return warp_transform(src, dst, list(xs), list(ys))
    except Exception:  # PROJ's errors have no common type
        if len(xs) == 1:
            return [np.inf], [np.inf]
        half = len(xs) // 2  # halves asked again: a few calls for a few such points among thousands
        (x0, y0), (x1, y1) = (transformed_or_inf(src, dst, xs[:half], ys[:half]),
                              transformed_or_inf(src, dst, xs[half:], ys[half:]))
        return [*x0, *x1], [*y0, *y1]


def bounds_wgs84(items: list) -> np.ndarray:
    """(n, 4) lon/lat bounds of each footprint (see reproject_rings)."""
    if not items:
        return np.zeros((0, 4))
    return np.array([p.bounds for p in reproject_rings(items, WGS84)])


BBOX_NAMES = ("bbox", "bbox_crs")  # a search area's and its CRS's names in errors: the protocol's


def bbox_to_wgs84(bbox: tuple[float, float, float, float], crs: CRS, names: tuple[str, str] = BBOX_NAMES) -> Area:
    """A query box in any CRS as a densified WGS84 polygon with its copies a world to either side
    (with_world_copies): a box across the antimeridian (a map view over the Pacific) is drawn
    whole, its x past 180 degrees, and each footprint meets the copy where it lies. `names`:
    the box's and its CRS's, as the user gave them (an example search's area is `--area`)."""
    minx, miny, maxx, maxy = bbox
    if not (minx < maxx and miny < maxy):
        across = " (a box across 180 degrees: its east past 180, as 179.5,-18,180.5,-16)" if crs.is_geographic else ""
        raise InputError(f"{names[0]} {list(bbox)} is empty: expected MINX,MINY,MAXX,MAXY with min < max{across}")
    if is_lon_lat_degrees(crs) and (miny >= 90 or maxy <= -90):  # nothing on Earth: it found nothing, silently
        raise InputError(f"{names[0]} {excerpt(list(bbox))} lies wholly past a pole in {crs} (latitudes beyond 90 "
                         f"degrees): are these projected coordinates? Name their CRS ({names[1]})")
    world = _world(crs.to_wkt())
    if world is not None and maxx - minx >= world[0]:  # a map zoomed out to the whole world or more
        band = _latitude_band(bbox, crs, world[1])
        return band if band is not None else _on_earth_bounds(bbox, crs, names[0])
    ring = np.asarray(shapely.segmentize(box(*bbox), max((maxx - minx), (maxy - miny)) / 16).exterior.coords)
    if crs == WGS84:
        area = _ring_area(ring[:, 0], ring[:, 1])
    else:
        placed = _placed(crs, ring[:, 0], ring[:, 1])
        area = None if placed is None else _ring_area(followed(placed[0]), placed[1])  # across 180: whole
    if area is not None and _holds_its_centre(area, bbox, crs):
        return area
    # Round a pole, or past where the CRS is defined (a view zoomed out past a Mollweide world's
    # outline, or far from a UTM zone), the ring does not close, is lost, or folds over: the lon/lat
    # bounds of what of the box lies on Earth instead, every longitude when it wraps.
    return _on_earth_bounds(bbox, crs, names[0])


def _ring_area(xs: np.ndarray, ys: np.ndarray) -> Area | None:
    """A closed lon/lat ring as a search area with its world copies; None when it does not close
    (it winds round a pole), is not finite, or is not a valid polygon less than a world wide."""
    xs = xs - 360.0 * np.floor((xs[0] + 180.0) / 360.0)  # its first point within -180..180, as the footprints'
    if not (np.isfinite(xs).all() and np.isfinite(ys).all() and abs(xs[-1] - xs[0]) < 1e-6):
        return None
    xs = xs.copy()
    xs[-1] = xs[0]
    poly = Polygon(np.column_stack([xs, ys]))
    return with_world_copies(poly) if poly.is_valid and np.ptp(xs) < 360 else None


def _placed(crs: CRS, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Points of `crs` in lon/lat, None unless every one is on Earth (_on_earth)."""
    lons, lats, ok = _on_earth(crs, xs, ys)
    return (lons, lats) if ok.all() else None


def _on_earth(crs: CRS, xs: np.ndarray, ys: np.ndarray, tolerance: float | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of `crs` in lon/lat, and which of them are on Earth: finite, and back within
    `tolerance` (CRS units; by default a thousandth of the points' spread, at least 100 m or a
    thousandth of a degree) when projected again. Past where a projection is defined PROJ gives
    points kilometres, or a world, away, or fails the whole call: then each half is tried apart.
    Datum shifts come back millimetres to metres off (British, Swiss and Irish grids), never
    kilometres."""
    if tolerance is None:
        floor = 100.0 if not crs.is_geographic else 1e-3 * _world(crs.to_wkt())[0] / 360.0
        tolerance = max(floor, 1e-3 * max(np.ptp(xs), np.ptp(ys)))
    try:
        return _round_trip(crs, xs, ys, tolerance)
    except Exception:  # PROJ's errors have no common type
        if len(xs) == 1:
            return np.full(1, np.nan), np.full(1, np.nan), np.zeros(1, bool)
        half = len(xs) // 2
        parts = [_on_earth(crs, xs[:half], ys[:half], tolerance), _on_earth(crs, xs[half:], ys[half:], tolerance)]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def _round_trip(crs: CRS, xs: np.ndarray, ys: np.ndarray, tolerance: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lons, lats = (np.asarray(v, float) for v in warp_transform(crs, WGS84, xs, ys))
    finite = np.isfinite(lons) & np.isfinite(lats)
    back_x, back_y = (np.asarray(v, float) for v in warp_transform(WGS84, crs,
                                                                   np.where(finite, lons, 0.0), np.where(finite, lats, 0.0)))
    world = _world(crs.to_wkt())
    if world is not None:  # x that wraps comes back the same a world away (a web map panned past 180)
        back_x = xs + (back_x - xs + world[0] / 2) % world[0] - world[0] / 2
    return lons, lats, finite & (np.abs(back_x - xs) <= tolerance) & (np.abs(back_y - ys) <= tolerance)


def _holds_its_centre(area: Area, bbox: tuple[float, float, float, float], crs: CRS) -> bool:
    """Whether a box's area holds the box's centre, where that is on Earth: a box past a CRS's
    bounds can be drawn as a valid ring round somewhere else (a UTM view zoomed out to 20,000 km
    became a band west of its zone, leaving its middle out)."""
    centre = _placed(crs, np.array([(bbox[0] + bbox[2]) / 2]), np.array([(bbox[1] + bbox[3]) / 2]))
    return centre is None or area.intersects(shapely.Point(_within_the_world(centre[0][0]), centre[1][0]))


def _within_the_world(lon):
    """Longitudes moved by whole turns into -180..180 (a lon/lat box panned worlds away)."""
    return (lon + 180.0) % 360.0 - 180.0


ON_EARTH_GRID = 33  # points a side of the grid that finds the part of a box on Earth


def _on_earth_bounds(bbox: tuple[float, float, float, float], crs: CRS, name: str) -> Polygon:
    """The lon/lat box round the points of a grid over `bbox` that are on Earth in `crs`, with
    the poles the box holds; every longitude when they span more than half the world (a box
    across 180 so, or one round a pole). InputError when none is."""
    gx, gy = np.meshgrid(np.linspace(bbox[0], bbox[2], ON_EARTH_GRID), np.linspace(bbox[1], bbox[3], ON_EARTH_GRID))
    lons, lats, ok = _on_earth(crs, gx.ravel(), gy.ravel())
    if not ok.any():
        raise InputError(f"{name} {excerpt(list(bbox))} in {crs} lies wholly past where that CRS places points on "
                         "Earth: give a box of the map's own area, or in another CRS")
    lons = _within_the_world(lons[ok])
    west, east, south, north = lons.min(), lons.max(), lats[ok].min(), lats[ok].max()
    for pole in (-90.0, 90.0):
        try:
            px, py = (float(np.asarray(v)[0]) for v in warp_transform(WGS84, crs, [0.0], [pole]))
        except Exception:  # PROJ's errors have no common type: a CRS that cannot place the pole
            continue
        if bbox[0] <= px <= bbox[2] and bbox[1] <= py <= bbox[3]:
            south, north = min(south, pole), max(north, pole)
    if east - west > 180.0 or south <= -90.0 or north >= 90.0:
        west, east = -180.0, 180.0
    return box(max(west, -180.0), max(south, -90.0), min(east, 180.0), min(north, 90.0))


def _latitude_band(bbox: tuple[float, float, float, float], crs: CRS, middle: float) -> Polygon | None:
    """Every longitude between a box's latitudes, in a CRS whose x wraps round the world (y alone
    gives the latitude at its middle: lon/lat, Mercator); None where y past the map's outline
    (a Mollweide world's) has no latitude."""
    _, lats, ok = _on_earth(crs, np.array([middle, middle]), np.array([bbox[1], bbox[3]]))
    if not ok.all():
        return None
    south, north = (float(np.clip(v, -90.0, 90.0)) for v in lats)
    return box(-180.0, south, 180.0, north)


WORLD_SHIFTS = (-360.0, 0.0, 360.0)


def with_world_copies(shape: Polygon) -> MultiPolygon:
    """A lon/lat shape and its copies one world west and east. Footprints lie between -180 and
    180 degrees, or past 180 where they cross it (reproject_rings); a shape drawn across 180
    meets each of them, on whichever side it lies, in one of the copies."""
    return MultiPolygon([shapely.affinity.translate(shape, dx) for dx in WORLD_SHIFTS])


def shared_area(a: Polygon, b: Polygon) -> float:
    """The area two lon/lat footprints share on the ground: also where one lies a world from the
    other (a footprint across 180 degrees lies past it, the same place beside it in another
    raster's CRS does not; a raster's own longitudes may run past -180 too, as a world grid
    offset by half a pixel's do)."""
    beyond = max(a.bounds[2], b.bounds[2]) > 180 or min(a.bounds[0], b.bounds[0]) < -180
    shifts = WORLD_SHIFTS if beyond else (0.0,)
    moved = [shapely.affinity.translate(b, dx) if dx else b for dx in shifts]
    return float(sum(overlap_area(a, m) for m in moved if a.intersects(m)))


def overlap_area(a: Polygon, b: Polygon) -> float:
    """The area of a and b's intersection. A ring that crosses itself (a footprint with a corner
    on a pole, where PROJ's longitude means nothing) is repaired (shapely.make_valid) rather
    than failing the search with GEOS's error."""
    try:
        return a.intersection(b).area
    except shapely.errors.GEOSException:
        return shapely.make_valid(a).intersection(shapely.make_valid(b)).area


def cut_at_antimeridian(footprint: Polygon, centre: float = 0.0) -> Polygon | MultiPolygon:
    """A lon/lat footprint past -180 or 180 degrees (reproject_rings) cut there, each part moved
    into -180..180 and turned counterclockwise, as RFC 7946 asks of a GeoJSON file; one inside,
    or one that cannot be cut (invalid, or without area), as it was. With `centre`, cut 180
    degrees either side of that meridian instead (a world map's own edges)."""
    west, _, east, _ = footprint.bounds
    if not footprint.is_valid or centre - 180 <= west and east <= centre + 180:
        return footprint
    parts = [shapely.affinity.translate(footprint.intersection(box(centre - 180 - dx, -90, centre + 180 - dx, 90)), dx)
             for dx in WORLD_SHIFTS]  # the world east of its edge, the world, and west of it, each moved into it
    polygons = [orient(p) for p in shapely.get_parts(parts) if p.geom_type == "Polygon" and p.area > 0]
    if not polygons:
        return footprint
    joined = shapely.union_all(polygons, grid_size=1e-9)  # a cap round a pole (_polar_cap): its parts meet again
    if joined.geom_type == "Polygon":
        return orient(joined)
    return MultiPolygon(polygons) if len(polygons) > 1 else polygons[0]
