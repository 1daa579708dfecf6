"""Query by example: a place of a raster, read by the worker and drawn as the tiles are, as the sketch.

A user drags a rectangle over a raster ("more like this place"). The worker reads that window
itself (the rectangle's box in the raster's pixels, any size, read down to the model's drawing
size), draws it with the tiles' own line drawing (worker.line_drawing, as worker.verify draws
placements) and searches with that drawing as the sketch. Where the square drawing reaches past
the rectangle it is left blank, and the layout ranker compares only where a sketch has lines, so
a long thin rectangle is matched by its own part. The example's own place is no answer: hits
that are the square drawn around it (IoU > OWN_PLACE_IOU) or lie mostly inside the box the user
dragged (more than OWN_PLACE_SHARE of their area) are left out (worker.query_search.own_places).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio.errors
import torch
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform
from shapely.geometry import Polygon, box

from wire.protocol import excerpt
from worker.errors import InputError
from worker.geo import MAX_COORDINATE, is_lon_lat_degrees, nearest_copy_x, parse_crs
from worker.placement import Placement, refuse_too_large
from worker.raster_access import RasterAccess
from worker.sketch import StrokeSketch
from worker.tiling import BandsUnknown, RasterInfo, colour_bands, disk_state, gdal_reason, open_raster

OWN_PLACE_IOU = 0.5  # a hit overlapping the square drawn around the example more than this is the example itself
# a hit with more than this of its area inside the example's box is part of it: by IoU alone, a place inside a
# large example (its IoU small) came back at rank 1, the user's own box
OWN_PLACE_SHARE = 0.5
MIN_SIDE_PX = 8  # raster pixels: a smaller box has nothing to draw
EDGE_ONLY_PX = 0.01  # a box meeting the raster in less than this is one touching its edge: outside
MIN_DATA_SHARE = 0.05  # of an example's box: less is said to hold no data (not to be flat)
MIN_INK = 0.002  # share of the drawing's pixels that are lines: less is a blank example
# raster pixels: a box this small drawn blank is said to be too small, not flat ground (boxes of 8 to 16 px on
# a busy Sentinel-2 scene drew no lines, and were said to be "open water, haze or flat fields"; 20 to 32 px drew)
FEW_PIXELS = 32
EDGE_STEPS = 16  # points per bbox edge when it is reprojected
CUT_SAID = 0.05  # of an example's box past its raster: more is said (cut_to_raster); less is a box dragged to its edge


@dataclass(frozen=True)
class Example:
    """A place to search for: `bbox` (minx, miny, maxx, maxy) in `crs` over the raster at `raster`."""

    raster: str
    bbox: tuple[float, float, float, float]
    crs: str

    def __post_init__(self) -> None:
        if len(self.bbox) != 4 or not all(isinstance(v, (int, float)) and abs(v) < MAX_COORDINATE for v in self.bbox):
            raise InputError(f"example bbox {excerpt(list(self.bbox))}: expected four numbers MINX,MINY,MAXX,MAXY "
                             f"within +-{MAX_COORDINATE:g}")
        minx, miny, maxx, maxy = self.bbox
        if not (minx < maxx and miny < maxy):
            across = " or, across 180 degrees, its east past 180 (as 179.5,-18,180.5,-16)" if _geographic(self.crs) else ""
            raise InputError(f"example bbox {excerpt(list(self.bbox))} is empty: expected MINX,MINY,MAXX,MAXY with "
                             f"min < max{across} (drag a rectangle, not a line or a point)")

    def to_json(self) -> dict:
        return {"raster": self.raster, "bbox": list(self.bbox), "crs": self.crs}


def _geographic(crs: str) -> bool:
    try:
        return parse_crs(crs).is_geographic
    except InputError:  # said when the example is placed
        return False


@dataclass(frozen=True)
class OwnPlace:
    """Where an example lies, to leave it out of its own search: the square drawn around its box,
    and the box the user dragged, in `crs` (the raster's)."""

    square: Polygon
    box: Polygon
    crs: CRS


@dataclass(frozen=True)
class ExampleQuery:
    """An example made ready: the drawing to search with, and where it lies (to leave it out)."""

    sketch: torch.Tensor  # (3, S, S) in [0, 1], as worker.sketch.load_sketch makes it
    raster: RasterInfo
    footprint: Polygon  # the square drawn around the example's box, in the raster's CRS: the query's own place
    window: tuple[float, float, float, float]  # col0, row0, col1, row1 in the raster's pixels
    drawing: np.ndarray  # (S, S) uint8, dark lines on white
    changed: str | None = None  # the raster's path as indexed, when its file changed since: read as it is now
    central: bool = False  # the box was larger than the index's largest hit: its central part was drawn
    # an example from a raster the index does not hold, as the index sees its place (index_view)
    index_view: tuple[float, str, bool] | None = None
    cut: str | None = None  # what to say of a box reaching past its raster (cut_to_raster)

    @property
    def own_place(self) -> OwnPlace:
        c0, r0, c1, r1 = self.window
        corners = [self.raster.affine * corner for corner in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))]
        return OwnPlace(self.footprint, Polygon(corners), CRS.from_wkt(self.raster.crs_wkt))


def raster_of(path: Path, rasters: list[RasterInfo], bands: tuple[int, ...] | None,
              drivers: tuple[str, ...] | None) -> tuple[RasterInfo, RasterInfo | None]:
    """The index's record of a raster (its bands and stretch, so the example is drawn as its
    tiles were), or the raster opened afresh when the index does not hold it, or its file has
    changed since it was indexed (the record's size and pixel grid may no longer be the file's).
    Also the index's record when it holds the raster, else None."""
    indexed = next((r for r in rasters if Path(r.path).resolve() == path), None)
    if indexed is not None and disk_state(indexed) == "unchanged":  # else opened afresh, saying why it cannot be
        return indexed, indexed
    if indexed is not None:
        return open_raster(path, bands, drivers), indexed
    # another raster: its own red, green and blue (an RGB raster's bands 4,3,2 of an index's were
    # refused), else those the index was built with where it has them (another scene of its sensor)
    names_colours, count = colour_bands(path, drivers)
    try:
        own = names_colours or not bands or max(bands) > count
        return open_raster(path, None if own else bands, drivers), None
    except BandsUnknown as exc:
        lacks = f", and it lacks the bands the index was built with ({list(bands)})" if bands else ""
        raise InputError(f"{exc.base}{lacks}: cut the example from a raster of the index, or from one whose colour "
                         "interpretation names red, green and blue") from None


def pixel_box(example: Example, raster: RasterInfo) -> tuple[float, float, float, float]:
    """The example's box in the raster's pixels (col0, row0, col1, row1), clipped to the raster;
    InputError when it lies outside it or is too small to draw."""
    try:
        inside = _inside_raster(example, example.bbox, raster)
    except InputError:
        _refuse_past_a_pole(example)
        raise
    # a box ending on the raster's edge meets it in a sliver of rounding, said as "covers 0x100 pixels"
    if inside.is_empty or min(inside.bounds[2] - inside.bounds[0], inside.bounds[3] - inside.bounds[1]) < EDGE_ONLY_PX:
        hint = f" (read as latitude first, it lies on it: give longitude first, as {list(_swapped(example.bbox))})" \
            if _swapped_lies_on(example, raster) else ""
        if not hint:
            _refuse_past_a_pole(example)
        raise InputError(f"example bbox {excerpt(list(example.bbox))} ({example.crs}) lies outside {raster.path}"
                         f"{hint}: drag the rectangle over the raster's data")
    c0, r0, c1, r1 = inside.bounds
    if min(c1 - c0, r1 - r0) < MIN_SIDE_PX:
        raise InputError(f"example bbox {excerpt(list(example.bbox))} covers {_tenths(c1 - c0)}x{_tenths(r1 - r0)} "
                         f"pixels of {raster.path}: at least {MIN_SIDE_PX} px a side is needed to draw a place")
    return c0, r0, c1, r1


def _refuse_past_a_pole(example: Example) -> None:
    """InputError for a box in lon/lat degrees that lies wholly past a pole, where it cannot be
    placed on the raster: the raster's own projected numbers (metres) given without their CRS, as
    a search's `bbox` is told (geo.bbox_to_wgs84); they were placed with PROJ's "Invalid
    latitude", or said to lie outside the raster."""
    minx, miny, maxx, maxy = example.bbox
    if is_lon_lat_degrees(parse_crs(example.crs)) and (miny >= 90 or maxy <= -90):
        raise InputError(f"example bbox {excerpt(list(example.bbox))} lies wholly past a pole in {example.crs} "
                         "(latitudes beyond 90 degrees): are these projected coordinates? Name their CRS (the "
                         "example's crs; on the command line, --bbox-crs)")


def _tenths(pixels: float) -> str:
    """A side in pixels to a tenth, rounded down (past float rounding: 100 px read as 99.9999999 is
    100.0): 7.96 px is not said as the 8.0 it falls short of."""
    return f"{math.floor(pixels * 10 + 1e-6) / 10:.1f}"


def _swapped(bbox: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    minx, miny, maxx, maxy = bbox
    return miny, minx, maxy, maxx


def _swapped_lies_on(example: Example, raster: RasterInfo) -> bool:
    """Whether a geographic example box that lies outside the raster would lie on it with its
    numbers read latitude first (EPSG:4326's official axis order, which some tools write)."""
    swapped = _swapped(example.bbox)
    if not parse_crs(example.crs).is_geographic or max(abs(swapped[1]), abs(swapped[3])) > 90:
        return False
    try:
        return not _inside_raster(example, swapped, raster).is_empty
    except InputError:
        return False


def _inside_raster(example: Example, bbox: tuple[float, float, float, float], raster: RasterInfo):
    """The part of `bbox` (in the example's CRS) on the raster, as a box in its pixels (maybe empty)."""
    return _in_pixels(example, bbox, raster).intersection(box(0, 0, raster.width, raster.height))


def _in_pixels(example: Example, bbox: tuple[float, float, float, float], raster: RasterInfo):
    """`bbox` (in the example's CRS) as a box in the raster's pixels, wherever it lies: the
    bounds of its outline there (_outline_in_pixels)."""
    return box(*_outline_in_pixels(example, bbox, raster).bounds)


def _outline_in_pixels(example: Example, bbox: tuple[float, float, float, float], raster: RasterInfo) -> Polygon:
    """`bbox` (in the example's CRS) as the polygon it draws in the raster's pixels, its edges
    densified (turned on a grid it is not drawn on, a lon/lat box on a UTM raster far from its
    central meridian)."""
    src = parse_crs(example.crs)
    minx, miny, maxx, maxy = bbox
    t = np.linspace(0.0, 1.0, EDGE_STEPS, endpoint=False)
    xs = np.concatenate([minx + (maxx - minx) * t, np.full_like(t, maxx), maxx - (maxx - minx) * t, np.full_like(t, minx)])
    ys = np.concatenate([np.full_like(t, miny), miny + (maxy - miny) * t, np.full_like(t, maxy), maxy - (maxy - miny) * t])
    dst = CRS.from_wkt(raster.crs_wkt)
    if src != dst:
        try:
            xs, ys = (np.asarray(v) for v in warp_transform(src, dst, xs, ys))
        except Exception as exc:  # PROJ's errors have no common type
            raise InputError(f"example bbox {excerpt(list(example.bbox))} in {example.crs} cannot be placed on "
                             f"{raster.path} ({excerpt(str(exc))})") from None
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise InputError(f"example bbox {excerpt(list(example.bbox))} in {example.crs} cannot be placed in the CRS "
                         f"of {raster.path}")
    xs = nearest_copy_x(np.asarray(xs, np.float64), raster.crs_wkt, raster.centre[0], whole=True)
    cols, rows = ~raster.affine * (xs, ys)
    return Polygon(zip(np.asarray(cols, np.float64), np.asarray(rows, np.float64)))


def cut_to_raster(example: Example, raster: RasterInfo, window: tuple[float, float, float, float]) -> str | None:
    """What to say of an example whose box reaches past its raster by more than CUT_SAID of its
    area (only its part on the raster is drawn), else None. Across the edge of two map sheets,
    the part on one sheet was searched, and nothing said so (probe)."""
    # the box itself, not its bounds: a box turned on the grid pokes its corners out, its bounds whole sides
    outline = _outline_in_pixels(example, example.bbox, raster)
    if not outline.is_valid or outline.area <= 0:  # folded by its CRS: nothing to measure
        return None
    share = outline.intersection(box(0, 0, raster.width, raster.height)).area / outline.area
    if share >= 1 - CUT_SAID:
        return None
    c0, r0, c1, r1 = window
    return (f"the example's box reaches past this raster: only its part on it ({share:.0%} of the box, "
            f"{_tenths(c1 - c0)}x{_tenths(r1 - r0)} px) was searched for; a place across the edge of map sheets is "
            "drawn whole from a VRT of them (gdalbuildvrt), indexed and taken as the example's raster")


def drawn_square(raster: RasterInfo, window: tuple[float, float, float, float]) -> Placement:
    """The square around an example's window that is drawn as the sketch: what the search looks
    for, so its own place (a long rectangle's own square overlaps the rectangle by IoU 1/3 at 3:1)."""
    c0, r0, c1, r1 = window
    return Placement(raster, (c0 + c1) / 2, (r0 + r1) / 2, max(c1 - c0, r1 - r0))


def draw_window(raster: RasterInfo, window: tuple[float, float, float, float], size: int) -> tuple[np.ndarray, float]:
    """The window drawn as a tile is: the square around it read at `size` px and drawn with
    worker.line_drawing, blank beyond the window (and where the data ends): (size, size) uint8;
    and the share of the window that holds data."""
    from worker.line_drawing import tile_line_drawings

    c0, r0, c1, r1 = window
    square = drawn_square(raster, window)
    side = square.side
    refuse_too_large([square], size, ["the example"])
    try:
        image, valid = square.read(size)
    except (rasterio.errors.RasterioError, OSError) as exc:  # was `internal`: a file damaged or cut short
        raise InputError(f"example raster {raster.path}: cannot read its pixels there ({gdal_reason(exc)})") from None
    # the window inside the square, in drawing pixels
    scale = size / side
    x0, x1 = (c0 - (square.cx - side / 2)) * scale, (c1 - (square.cx - side / 2)) * scale
    y0, y1 = (r0 - (square.cy - side / 2)) * scale, (r1 - (square.cy - side / 2)) * scale
    xs, ys = np.arange(size) + 0.5, np.arange(size) + 0.5
    in_window = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    valid = valid & in_window
    drawing = tile_line_drawings(image[None], valid[None])[0, ..., 0]
    return np.where(valid, drawing, 255).astype(np.uint8), float(valid.sum() / max(1, in_window.sum()))


def prepare_example(example: Example, rasters: list[RasterInfo], size: int, bands: tuple[int, ...] | None = None,
                    access: RasterAccess = RasterAccess(), largest: float | None = None,
                    grid: tuple[dict[int, RasterInfo], dict[int, int]] | None = None) -> ExampleQuery:
    """Read and draw an example (a client's confined to `access`'s roots); InputError for a box
    outside the raster, too small, or with nothing to draw. A box larger than `largest` pixels
    of the index's rasters (its largest hit) is drawn as its central square of that side, as a
    place traced on the map is (worker.place_size.central_part: drawn whole, where the largest
    hit was 256 px, 320 px boxes on a Landsat scene were found at IoU 0.16 at best in the top 5,
    and 340 px boxes on a Sentinel-2 one at rank 1 in 2 of 5; by their central square, all 9 at
    rank 1); its own place stays the whole box. Drawn whole where nothing of its centre draws a
    line. A box on a raster the index does not hold is measured as the index's rasters show
    that place (index_view; `grid`: the index's rasters and tiles by raster id)."""
    path = access.resolve(example.raster)
    if access.roots is not None:
        path = access.check_file(path)
    if not path.is_file():
        raise InputError(f"example raster {excerpt(example.raster)} is not a file")
    raster, indexed = raster_of(path, rasters, bands, access.drivers)
    changed = indexed.path if indexed is not None and raster is not indexed else None
    window = pixel_box(example, raster)
    view = index_view(raster, window, *grid) if indexed is None and grid is not None else None
    if largest and indexed is not None:
        drawn = central_window(window, largest)
    elif largest and view is not None:  # the index's largest hit, in this raster's pixels
        drawn = central_window(window, largest * drawn_square(raster, window).side / view[0])
    else:
        drawn = window
    drawing, data_share = draw_window(raster, drawn, size)
    if drawn != window and (drawing < 128).mean() < MIN_INK:  # its lines lie round its edge: drawn whole
        drawn, (drawing, data_share) = window, draw_window(raster, window, size)
    if (drawing < 128).mean() < MIN_INK:
        c0, r0, c1, r1 = window
        if data_share < MIN_DATA_SHARE:
            why = "it holds no data: nodata or transparent pixels"
        elif max(c1 - c0, r1 - r0) < FEW_PIXELS:
            why = (f"{_tenths(c1 - c0)}x{_tenths(r1 - r0)} px of the raster are too few to draw its lines from, or the "
                   "ground there is flat: drag a larger box, round the place and some of its surroundings")
        else:
            why = "open water, haze or flat fields draw no lines"
        raise InputError(f"the example at {excerpt(list(example.bbox))} in {raster.path} has nothing to draw ({why}): "
                         "pick a place with visible lines")
    sketch = torch.from_numpy(drawing.astype(np.float32) / 255.0)[None].expand(3, -1, -1).contiguous()
    return ExampleQuery(sketch, raster, Polygon(drawn_square(raster, window).ring()), window, drawing, changed,
                        drawn != window, view, cut_to_raster(example, raster, window))


def index_view(raster: RasterInfo, window: tuple[float, float, float, float], rasters: dict[int, RasterInfo],
               tiles: dict[int, int]) -> tuple[float, str, bool] | None:
    """An example's box on a raster the index does not hold (a copy, a sheet of an indexed
    mosaic, another scene), as the index's rasters show that place: its side in the pixels of
    the indexed raster under it, else of the one holding the most tiles (worker.map_strokes),
    that raster's path, and whether the box's centre lies on it; None where that cannot be
    told. Unmeasured, a box larger than the index finds was drawn whole and its search said
    nothing, where the same pixels on the indexed raster were searched by their central part
    and out_of_scale said so (probe)."""
    from worker.map_strokes import on_the_pixel_grid
    from worker.place_size import stroke_place_side

    c0, r0, c1, r1 = window
    ring = tuple(tuple(float(v) for v in raster.affine * corner) for corner in ((c0, r0), (c1, r0), (c1, r1), (c0, r1)))
    try:
        on_grid, indexed, lies_on = on_the_pixel_grid(StrokeSketch((ring + ring[:1],), crs=raster.crs_wkt), rasters,
                                                      tiles)
    except InputError:  # a box its CRS cannot place on the ground: not measured
        return None
    side = stroke_place_side(on_grid)
    return (side, indexed.path, lies_on) if indexed is not None and side > 0 else None


def central_window(window: tuple[float, float, float, float], side: float) -> tuple[float, float, float, float]:
    """`window` (col0, row0, col1, row1) cut to the square of `side` pixels at its centre."""
    c0, r0, c1, r1 = window
    cx, cy, half = (c0 + c1) / 2, (r0 + r1) / 2, side / 2
    return max(c0, cx - half), max(r0, cy - half), min(c1, cx + half), min(r1, cy + half)

