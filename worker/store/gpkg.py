"""The indexed tiles as a GeoPackage layer a user opens in QGIS (tiles.gpkg).

The layer carries a stamp of the committed index it shows (its rasters and shards, in the
layer's metadata), so a run that changed nothing leaves it as it is, and `info` tells a layer
that is missing, or older than the index (a run stopped before writing it), from a current one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from worker.store.format import TILES_LAYER, replace_durably


BATCH_TILES = 20_000  # tiles written at a time: about 80 MB of memory while they are (189,000 tiles: +83 MB, 6.8 s)
STAMP = "sketch_search_index"  # the layer metadata's key of the stamp
CURRENT, MISSING, OUT_OF_DATE = "current", "missing", "out of date"  # tiles_layer_state


def index_stamp(manifest: dict) -> str:
    """A digest of what the layer shows of an index: its rasters (paths, georeferencing, files)
    and its committed shards. Any change to either writes the layer again."""
    shown = json.dumps({"rasters": manifest["rasters"], "shards": manifest["shards"]}, sort_keys=True)
    return hashlib.sha256(shown.encode("utf-8")).hexdigest()


def tiles_layer_state(index_dir: Path, manifest: dict) -> str:
    """Whether the index's tiles.gpkg shows its committed tiles (CURRENT), is MISSING, or is
    OUT_OF_DATE: written before the last commit (a run stopped before the layer, a removal
    killed), by an older version, or unreadable. Reads the layer's metadata alone (ms)."""
    import pyogrio
    import pyogrio.errors

    path = Path(index_dir) / TILES_LAYER
    if not path.is_file():
        return MISSING
    try:
        metadata = pyogrio.read_info(path, layer="tiles").get("layer_metadata") or {}
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError):
        return OUT_OF_DATE
    return CURRENT if metadata.get(STAMP) == index_stamp(manifest) else OUT_OF_DATE


def write_tiles_gpkg(index_dir: Path) -> None:
    """The committed tiles of an index as EPSG:4326 polygons in tiles.gpkg (replaced atomically),
    stamped with the index they show (index_stamp).
    Written BATCH_TILES at a time: all at once took 467 MB more for 189,000 tiles, so about 24 GB
    at the end of a 10M-tile indexing run, its tiles all committed."""
    import pyogrio.errors
    import pyogrio.raw
    import shapely

    from worker.store.reader import TileIndex

    index = TileIndex.open(index_dir)
    rec = index.records
    fields = ["tile_id", "raster", "col_off", "row_off", "width", "height", "scale", "valid"]
    tmp = index_dir / ".tiles.tmp.gpkg"
    tmp.unlink(missing_ok=True)
    try:
        for start in range(0, max(1, len(rec)), BATCH_TILES):  # an index without tiles gets its empty layer
            rows = np.arange(start, min(len(rec), start + BATCH_TILES))
            part = rec[rows]
            geoms = shapely.to_wkb(np.array(index.footprints_wgs84(rows), dtype=object))
            paths = np.array([index.rasters[r].path for r in part["raster_id"]], dtype=object)
            data = [rows.astype(np.int64), paths, part["col_off"], part["row_off"], part["width"], part["height"],
                    part["scale"].astype(np.int32), part["valid"].astype(np.float64)]
            stamped = {} if start else {"layer_metadata": {STAMP: index_stamp(index.manifest)}}
            pyogrio.raw.write(str(tmp), geoms, data, fields, layer="tiles", driver="GPKG", crs="EPSG:4326",
                              geometry_type="Polygon", append=start > 0, **stamped)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        # a full disk, in GDAL's words (SQLite's, often not "full" at all): reported as storage
        # by worker.store.format.disk_write, and the last tiles.gpkg is kept
        tmp.unlink(missing_ok=True)
        raise OSError(f"GDAL: {exc}") from exc
    except BaseException:  # a part written: not left beside the index
        tmp.unlink(missing_ok=True)
        raise
    replace_durably(tmp, index_dir / TILES_LAYER)
