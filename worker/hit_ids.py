"""A hit's id: its placement written out, so a mark survives a GeoPackage save and a worker restart.

The id is stateless: `<raster key>@<cx>,<cy>,<side>,<angle>` in the raster's pixels (degrees
for the turn), where the raster key is a short digest of the raster's path as the index holds
it. Reading one back needs only the index: the raster is found by its key, and the square must
lie on it. No table of past hits is kept anywhere.
"""

from __future__ import annotations

import hashlib
import math
import re

from wire.protocol import excerpt
from worker.errors import InputError
from worker.placement import Placement
from worker.tiling import RasterInfo

KEY_CHARS = 10
MAX_ID_CHARS = 200
# the key's digits in either case: a spreadsheet or a field calculator may have upper-cased an id
ID_PATTERN = re.compile(r"([0-9a-f]{%d})@(-?[0-9.]+),(-?[0-9.]+),([0-9.]+),(-?[0-9.]+)" % KEY_CHARS, re.IGNORECASE)
MAX_ANGLE = 180.0
MIN_SIDE = 1.0  # raster px: a hit is a tile's size or near it; a speck is no place to read


def raster_key(raster: RasterInfo | str) -> str:
    """The short, stable name of a raster in ids: a digest of its path."""
    path = raster if isinstance(raster, str) else raster.path
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:KEY_CHARS]


def hit_id(placement: Placement) -> str:
    """The id of a hit at this placement (centre and side to 1/100 pixel, turn to 1/100 degree)."""
    return (f"{raster_key(placement.raster)}@{placement.cx:.2f},{placement.cy:.2f},{placement.side:.2f},"
            f"{placement.angle:.2f}")


def place_of(text: str) -> tuple | str:
    """What an id names, as written by hit_id (raster key, and the numbers to 1/100), so that
    ids written differently for one place compare equal (' a@1.5,...' and 'a@1.50,...'); an id
    that is none stays its text (parse_hit_id says what is wrong with it)."""
    m = ID_PATTERN.fullmatch(text.strip())
    if m is None:
        return text
    try:
        return (m.group(1).lower(), *(round(float(v), 2) for v in m.groups()[1:]))
    except ValueError:
        return text


def parse_hit_id(text: object, rasters: dict[int, RasterInfo] | list[RasterInfo]) -> Placement:
    """The placement an id names, in one of `rasters` (an index's); InputError saying what is
    wrong when the id is malformed, names a raster the index does not hold, or a square that
    does not lie on that raster."""
    if not isinstance(text, str) or len(text) > MAX_ID_CHARS:
        raise InputError(f"hit id {excerpt(text)} is not a hit id (a string such as 'a1b2c3d4e5@120.50,80.00,224.00,0.00')")
    m = ID_PATTERN.fullmatch(text.strip())
    if m is None:
        raise InputError(f"hit id {excerpt(text)} is not a hit id: expected RASTERKEY@CX,CY,SIDE,ANGLE as the "
                         "`id` property of a search's hits")
    try:
        cx, cy, side, angle = (float(v) for v in m.groups()[1:])
    except ValueError:
        raise InputError(f"hit id {excerpt(text)} has a number that is none") from None
    pool = rasters.values() if isinstance(rasters, dict) else rasters
    found = [r for r in pool if raster_key(r) == m.group(1).lower()]
    if not found:
        raise InputError(f"hit id {excerpt(text)} names a raster that is not in this index (was the index rebuilt "
                         "without it, or is the id from another index?)")
    raster = found[0]
    if not (math.isfinite(side) and side >= MIN_SIDE and 0 <= cx <= raster.width and 0 <= cy <= raster.height
            and side <= 2 * max(raster.width, raster.height) and abs(angle) <= MAX_ANGLE):
        raise InputError(f"hit id {excerpt(text)} is not a place in {raster.path} ({raster.width}x{raster.height} "
                         f"px): its centre must lie on the raster, its side be {MIN_SIDE:g} px to twice the raster's longer side "
                         f"and its turn within +-{MAX_ANGLE:g} degrees")
    return Placement(raster, cx, cy, side, angle)
