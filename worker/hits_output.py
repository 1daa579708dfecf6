"""Hits -> a GeoJSON FeatureCollection in a chosen CRS, and a contact-sheet preview PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from rasterio.crs import CRS
from shapely.geometry import mapping

from worker.geo import reproject_rings
from worker.search import Hit
from worker.tiling import TileReader


def hits_to_geojson(hits: list[Hit], crs: CRS, extra: dict | None = None) -> dict:
    """One polygon feature per hit, best first, with the properties the CLI documents.
    A non-WGS84 output CRS is named in a `crs` member (which QGIS and GDAL read)."""
    polygons = reproject_rings([h.tile for h in hits], crs)
    features = []
    for hit, poly in zip(hits, polygons):
        t = hit.tile
        features.append({"type": "Feature", "geometry": mapping(poly), "properties": {
            "rank": hit.rank, "score": round(hit.score, 6), "shortlist_score": round(hit.shortlist_score, 6),
            "raster": t.raster.path, "window": [t.col_off, t.row_off, t.width, t.height], "scale": t.scale}})
    out = {"type": "FeatureCollection", "features": features}
    epsg = crs.to_epsg()
    if epsg != 4326:
        out["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()}}
    if extra:
        out.update(extra)
    return out


def hit_thumbnail(hit: Hit, size: int) -> Image.Image:
    with TileReader(hit.tile.raster, size) as reader:
        image, _ = reader.read(hit.tile)
    return Image.fromarray(image)


def contact_sheet(sketch: np.ndarray, hits: list[Hit], cell: int = 160, columns: int = 6) -> Image.Image:
    """The sketch first, then each hit's pixels labelled with rank and score."""
    items = [(Image.fromarray((sketch.transpose(1, 2, 0) * 255).astype(np.uint8)), "sketch")]
    items += [(hit_thumbnail(h, cell), f"#{h.rank} {h.score:.3f} s{h.tile.scale}") for h in hits]
    rows = (len(items) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (img, label) in enumerate(items):
        x, y = (n % columns) * cell, (n // columns) * (cell + 16)
        sheet.paste(img.convert("RGB").resize((cell - 4, cell - 4)), (x + 2, y + 2))
        draw.text((x + 4, y + cell), label, fill="black")
    return sheet
