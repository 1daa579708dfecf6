"""Whether a place sketched on the map, or an example's, is of a size the index can find.

A search matches the sketch as templates of `RankingConfig.sizes` level pixels at each of the
index's scales: at a tile of 224 px and scales 1, 2 and 4, squares of 160 to 1,024 raster pixels
a side. A place more than √2 times past either end overlaps no hit by half (IoU 0.5), even a hit
centred on it: a probe's 500 m place on 0.3 m imagery (1,667 px) overlapped its best hit by IoU
0.35, and 0.82 in an index with scale 8 too. The search still runs; its reply says so
(`out_of_scale`), and what to do, since a user sees only poor hits otherwise. A sketch on the pad
has no size on the ground, and is not judged. A place traced larger than the largest hit is
looked for by its central square of that side (central_part), which the largest hit can match.
"""

from __future__ import annotations

import math
from dataclasses import replace

from wire.protocol import MIN_TILE
from worker.level_maps import level_pixel
from worker.sketch import StrokeSketch, strokes_meet
from worker.tiling import MAX_SCALE, MAX_SCALES

HALF_OVERLAP = math.sqrt(2)  # a square this much larger than another, centred on it, overlaps it by IoU 0.5


def found_sides(tiling: dict, drawing_size: int, sizes: tuple[int, ...]) -> tuple[float, float]:
    """The sides, in raster pixels, of the smallest and largest places an index of `tiling`
    can overlap a hit by half."""
    return (min(sizes) * level_pixel(tiling["tile"], min(tiling["scales"]), drawing_size) / HALF_OVERLAP,
            largest_hit_side(tiling, drawing_size, sizes) * HALF_OVERLAP)


def largest_hit_side(tiling: dict, drawing_size: int, sizes: tuple[int, ...]) -> float:
    """The side, in raster pixels, of an index's largest hit: its largest template at its largest scale."""
    return max(sizes) * level_pixel(tiling["tile"], max(tiling["scales"]), drawing_size)


def central_part(sketch: StrokeSketch, largest: float) -> StrokeSketch:
    """A place traced on the map larger than the index's largest hit (`largest`, in the sketch's
    pixels), as a search looks for it: its central square of that side, framed so. Drawn whole
    into a hit's square, its lines were matched at the wrong size, and it was missed: in the
    stroke probe's index (largest hit 256 px), places of 288, 320 and 352 px were found at rank
    1 (IoU 0.5 or more) in 6 of 16, 4 of 14 and 0 of 10 searches. By their central square, in
    all 40, overlapping each place as much as a hit of that side can (IoU 0.79, 0.64, 0.53).
    Unchanged when no stroke meets that square (a place outlined by its edge alone): the whole
    place is searched, as before."""
    x0, y0, x1, y1 = sketch.extent()
    if not max(x1 - x0, y1 - y0) > largest:
        return sketch
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, largest / 2
    square = (cx - half, cy - half, cx + half, cy + half)
    return replace(sketch, frame=square) if strokes_meet(sketch.strokes, square) else sketch


def stroke_place_side(sketch: StrokeSketch) -> float:
    """The side of the place a stroke sketch frames, in its coordinates: its frame's longer side
    (on the map, the strokes' own extent), as an example's is its box's."""
    x0, y0, x1, y1 = sketch.extent()
    return max(x1 - x0, y1 - y0)


TRACED, EXAMPLE = "the place traced on the map", "the example"  # what out_of_scale judges
# what a user does about a place larger, or smaller, than the index finds, as each chose it
TO_DO = {TRACED: ("sketch a part of it", "sketch more of its surroundings"),
         EXAMPLE: ("choose a box round a part of it", "choose a box round more of its surroundings")}


def out_of_scale(side_px: float, raster: str, tiling: dict, drawing_size: int, sizes: tuple[int, ...],
                 what: str, on_raster: bool = True, central: bool = False) -> list[dict]:
    """The reply's `out_of_scale`: [{raster, side_px, smallest_px, largest_px, reason}] when a
    place of `side_px` pixels of `raster` lies outside what the index finds, else []. `what` is
    TRACED or EXAMPLE; a place whose centre lies off every raster (not `on_raster`) is measured
    in the pixels of the one holding the most tiles (worker.map_strokes), and the reason says
    so: it named that raster "this raster", as if the strokes lay on it. `central`: the search
    looked for the place's central part (central_part), and the reason says so."""
    smallest, largest = found_sides(tiling, drawing_size, sizes)
    if not (side_px < smallest or side_px > largest):  # NaN: no size to judge
        return []
    tile, scales = tiling["tile"], list(tiling["scales"])
    found = (f"an index of {tile} px tiles at scales {','.join(map(str, scales))} finds places of about "
             f"{smallest:,.0f} to {largest:,.0f} px a side; its hits overlap a place outside that by less than half")
    part, surroundings = TO_DO[what]
    if side_px > largest:
        more = []  # scales doubled on until one finds the place: 1,2,4 -> 1,2,4,8
        while found_sides({**tiling, "scales": scales + more}, drawing_size, sizes)[1] < side_px:
            more.append(2 * max(scales + more))
        can = max(more) <= MAX_SCALE and len(scales + more) <= MAX_SCALES
        todo = part + (f", or search an index built with scales {','.join(map(str, scales + more))}" if can else "")
        size = "larger"
    else:
        tile_needed = math.floor(side_px * HALF_OVERLAP * drawing_size / (min(sizes) * min(scales)))
        todo = surroundings + (f", or search an index built with tiles of {tile_needed} px"
                               if tile_needed >= MIN_TILE else "")
        size = "smaller"
    if central:
        found += f"; the place's central {largest_hit_side(tiling, drawing_size, sizes):,.0f} px were searched"
    measured = (f"{what} is about {side_px:,.0f} px of this raster a side" if on_raster else
                f"{what} is centred off every indexed raster; in the pixels of this one, which holds the most tiles, "
                f"it is about {side_px:,.0f} px a side")
    return [{"raster": raster, "side_px": round(side_px, 1), "smallest_px": round(smallest, 1),
             "largest_px": round(largest, 1),
             "reason": f"{measured}, {size} than the index finds ({found}): {todo}"}]
