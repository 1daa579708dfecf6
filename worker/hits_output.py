"""Hits -> a GeoJSON FeatureCollection in a chosen CRS, and a contact-sheet preview PNG."""

from __future__ import annotations

import numpy as np
import rasterio.errors
import shapely
from PIL import Image, ImageDraw
from rasterio.crs import CRS
from rasterio._err import CPLE_BaseError  # GDAL and PROJ errors (rasterio.errors does not export it)
from shapely.geometry import mapping, shape

from wire.protocol import excerpt
from worker.errors import InputError
from worker.geo import cut_at_antimeridian, reproject_rings
from worker.hit_ids import hit_id
from worker.search import Hit


def hit_properties(hit: Hit) -> dict:
    """What a user sees of a hit: its id (its place, worker.hit_ids: what feedback names), rank
    and scores, the raster, where in it (the pixel window around the matched square, its centre,
    side and turn) and the index's scale there."""
    p = hit.placement
    props = {"id": hit_id(p), "rank": hit.rank, "score": None if hit.score is None else round(hit.score, 6),
             "shortlist_score": round(hit.coarse_score, 6), "fine_score": round(hit.fine_score, 6),
             "token_score": None if hit.token_score is None else round(hit.token_score, 6),
             "raster": p.raster.path, "window": list(p.window()), "center": [round(p.cx, 2), round(p.cy, 2)],
             "side": round(p.side, 2), "angle": round(p.angle, 2), "scale": hit.scale}
    return props


def hits_to_geojson(hits: list[Hit], crs: CRS, extra: dict | None = None) -> dict:
    """One polygon feature per hit, best first: the (turned) square the sketch matched, its ring
    counterclockwise (a raster's rows run south: its corners in pixel order ran clockwise on the
    map). A non-WGS84 output CRS is named in a `crs` member (which QGIS and GDAL read)."""
    cannot = f"cannot be placed in the output CRS {excerpt(crs.to_string())}"
    choose = "choose a CRS that covers them (EPSG:4326 covers every place), or search an area without them"
    try:
        polygons = reproject_rings([h.placement for h in hits], crs)
    except CPLE_BaseError as exc:  # was `internal`, after the whole search: an orthographic CRS of the other side
        raise InputError(f"the hits {cannot} ({excerpt(str(exc))}): {choose}") from None
    unplaced = [h.rank for h, polygon in zip(hits, polygons)
                if polygon.is_empty or not np.isfinite(shapely.get_coordinates(polygon)).all()]
    if unplaced:
        raise InputError(f"hits ranked {unplaced[:10]} {cannot}: {choose}")
    features = [{"type": "Feature", "geometry": mapping(poly), "properties": hit_properties(hit)}
                for hit, poly in zip(hits, shapely.orient_polygons(polygons))]  # counterclockwise, as RFC 7946 asks
    out = {"type": "FeatureCollection", "features": features}
    epsg = crs.to_epsg()
    if epsg != 4326:
        out["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()}}
    if extra:
        out.update(extra)
    return out


def split_at_antimeridian(collection: dict) -> dict:
    """Hits in lon/lat as RFC 7946 asks of a GeoJSON file: a footprint across 180 degrees cut in
    two there (geo.cut_at_antimeridian). The worker's replies keep it whole: split, a hit in a
    lon/lat project lies at both edges of the world."""
    return {**collection, "features": [{**f, "geometry": mapping(cut_at_antimeridian(shape(f["geometry"])))}
                                       for f in collection["features"]]}


def hit_thumbnail(hit: Hit, size: int) -> Image.Image:
    """The matched square as the sketch's frame sees it (turned back by the hit's angle); grey,
    saying so, where it cannot be read (a damaged block below the verified hits, which are the
    only ones read: the preview failed with a traceback, after the hits file was written)."""
    try:
        image, _ = hit.placement.read(size)
    except (rasterio.errors.RasterioError, OSError):
        grey = Image.new("RGB", (size, size), (160, 160, 160))
        ImageDraw.Draw(grey).text((4, size // 2), "cannot be read", fill="black")
        return grey
    return Image.fromarray(image)


def contact_sheet(sketch: np.ndarray, hits: list[Hit], cell: int = 160, columns: int = 6) -> Image.Image:
    """The sketch first, then each hit's pixels labelled with rank and score."""
    items = [(Image.fromarray((sketch.transpose(1, 2, 0) * 255).astype(np.uint8)), "sketch")]
    for h in hits:
        score = "-" if h.score is None else f"{h.score:.2f}"  # no score: ranked below the verified hits
        items.append((hit_thumbnail(h, cell), f"#{h.rank} {score} s{h.scale} {h.placement.angle:+.0f}°"))
    rows = (len(items) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (img, label) in enumerate(items):
        x, y = (n % columns) * cell, (n // columns) * (cell + 16)
        sheet.paste(img.convert("RGB").resize((cell - 4, cell - 4)), (x + 2, y + 2))
        draw.text((x + 4, y + cell), label, fill="black")
    return sheet
