"""The indexed tiles as a GeoPackage layer a user opens in QGIS (tiles.gpkg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.store.format import TILES_LAYER, replace_durably


def write_tiles_gpkg(index_dir: Path) -> None:
    """The committed tiles of an index as EPSG:4326 polygons in tiles.gpkg (replaced atomically)."""
    import pyogrio.errors
    import pyogrio.raw
    import shapely

    from worker.store.reader import TileIndex

    index = TileIndex.open(index_dir)
    rec = index.records
    geoms = [shapely.to_wkb(p) for p in index.footprints_wgs84(np.arange(len(rec)))]
    paths = np.array([index.rasters[r].path for r in rec["raster_id"]], dtype=object)
    fields = ["tile_id", "raster", "col_off", "row_off", "width", "height", "scale", "valid"]
    data = [np.arange(len(rec), dtype=np.int64), paths, rec["col_off"], rec["row_off"], rec["width"],
            rec["height"], rec["scale"].astype(np.int32), rec["valid"].astype(np.float64)]
    tmp = index_dir / ".tiles.tmp.gpkg"
    tmp.unlink(missing_ok=True)
    try:
        pyogrio.raw.write(str(tmp), np.array(geoms, dtype=object), data, fields, layer="tiles", driver="GPKG",
                          crs="EPSG:4326", geometry_type="Polygon")
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        # a full disk, in GDAL's words (SQLite's, often not "full" at all): reported as storage
        # by worker.store.format.disk_write, and the last tiles.gpkg is kept
        tmp.unlink(missing_ok=True)
        raise OSError(f"GDAL: {exc}") from exc
    replace_durably(tmp, index_dir / TILES_LAYER)
