"""The indexed tiles as a GeoPackage layer a user opens in QGIS (tiles.gpkg).

The layer carries a stamp of the committed index it shows (its shards and their rasters, in the
layer's metadata). A run that changed nothing leaves it as it is; a run that added rasters
appends their tiles to a copy of it; `info` tells a layer that is missing, or older than the
index (a run stopped before writing it), from a current one. Written whole after every run, a
10M-tile layer took minutes (6.8 s for 189,000 tiles).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from worker.store.format import TILES_LAYER, replace_durably


BATCH_TILES = 20_000  # tiles written at a time: about 80 MB of memory while they are (189,000 tiles: +83 MB, 6.8 s)
STAMP, SHOWN = "sketch_search_index", "sketch_search_shards"  # the layer metadata's keys: index_stamp, its shards
CURRENT, MISSING, OUT_OF_DATE = "current", "missing", "out of date"  # tiles_layer_state


def index_stamp(manifest: dict, shards: int | None = None) -> str:
    """A digest of what the layer shows of an index's first `shards` committed shards (all by
    default): those shards, and the rasters they hold as the manifest records them (paths,
    georeferencing, files). A raster indexed again, or taken out, changes it."""
    shown = manifest["shards"][:shards]
    held = {s["raster_id"] for s in shown}
    rasters = [r for r in manifest["rasters"] if r["id"] in held]
    return hashlib.sha256(json.dumps([shown, rasters], sort_keys=True).encode("utf-8")).hexdigest()


def shards_shown(path: Path, manifest: dict) -> int | None:
    """How many of the index's first shards the layer at `path` shows as the manifest holds them
    now, their tiles its rows in order; None when it shows something else, or is missing or
    unreadable. Reads the layer's metadata alone (ms)."""
    import pyogrio
    import pyogrio.errors

    if not path.is_file():
        return None
    try:
        metadata = pyogrio.read_info(path, layer="tiles").get("layer_metadata") or {}
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError):
        return None
    shown = metadata.get(SHOWN, "")
    if not shown.isdigit() or int(shown) > len(manifest["shards"]):
        return None
    return int(shown) if metadata.get(STAMP) == index_stamp(manifest, int(shown)) else None


def tiles_layer_state(index_dir: Path, manifest: dict) -> str:
    """Whether the index's tiles.gpkg shows its committed tiles (CURRENT), is MISSING, or is
    OUT_OF_DATE: written before the last commit (a run stopped before writing it, a removal
    killed), by an older version, or unreadable."""
    path = Path(index_dir) / TILES_LAYER
    if not path.is_file():
        return MISSING
    return CURRENT if shards_shown(path, manifest) == len(manifest["shards"]) else OUT_OF_DATE


def write_tiles_gpkg(index_dir: Path) -> None:
    """The committed tiles of an index as EPSG:4326 polygons in tiles.gpkg (replaced atomically),
    stamped with the index they show (index_stamp). A layer showing the index's first shards as
    they are now (a run added rasters) is copied, and the other shards' tiles appended.
    Written BATCH_TILES at a time: all at once took 467 MB more for 189,000 tiles, so about 24 GB
    at the end of a 10M-tile indexing run, its tiles all committed."""
    import pyogrio.errors
    import pyogrio.raw
    import shapely

    from worker.store.reader import TileIndex

    index = TileIndex.open(index_dir)
    rec, shards = index.records, index.manifest["shards"]
    fields = ["tile_id", "raster", "col_off", "row_off", "width", "height", "scale", "valid"]
    layer, tmp = index_dir / TILES_LAYER, index_dir / ".tiles.tmp.gpkg"
    tmp.unlink(missing_ok=True)
    shown = shards_shown(layer, index.manifest)
    first = 0 if shown is None else sum(s["count"] for s in shards[:shown])  # the rows it holds
    stamp = {"layer_metadata": {STAMP: index_stamp(index.manifest), SHOWN: str(len(shards))}}
    try:
        if shown is not None:
            shutil.copyfile(layer, tmp)
        for start in range(first, max(first + 1, len(rec)), BATCH_TILES):  # an index without tiles gets its empty layer
            rows = np.arange(start, min(len(rec), start + BATCH_TILES))
            part = rec[rows]
            geoms = shapely.to_wkb(np.array(index.footprints_wgs84(rows), dtype=object))
            paths = np.array([index.rasters[r].path for r in part["raster_id"]], dtype=object)
            data = [rows.astype(np.int64), paths, part["col_off"], part["row_off"], part["width"], part["height"],
                    part["scale"].astype(np.int32), part["valid"].astype(np.float64)]
            pyogrio.raw.write(str(tmp), geoms, data, fields, layer="tiles", driver="GPKG", crs="EPSG:4326",
                              geometry_type="Polygon", append=shown is not None or start > first,
                              **(stamp if start == first else {}))
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        # a full disk, in GDAL's words (SQLite's, often not "full" at all): reported as storage
        # by worker.store.format.disk_write, and the last tiles.gpkg is kept
        tmp.unlink(missing_ok=True)
        raise OSError(f"GDAL: {exc}") from exc
    except BaseException:  # a part written: not left beside the index
        tmp.unlink(missing_ok=True)
        raise
    replace_durably(tmp, layer)
