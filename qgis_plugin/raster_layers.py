"""Which raster layers the worker can index: files in a format it opens for its clients. It
refused a whole build that held one it cannot read (a GeoPackage's raster, a web layer)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

from .wire.protocol import CLIENT_DRIVERS

SAVE_AS = "save it as a GeoTIFF (Export > Save As…) to index it"


def raster_file(layer) -> tuple[Optional[str], str]:
    """The file a raster layer reads (an absolute path), or None and why the worker cannot index it."""
    if layer.providerType() != "gdal":
        return None, f"a raster from a {layer.providerType()} source (a web service, a database), not a file: {SAVE_AS}"
    path = layer.source().split("|")[0]
    if os.path.isdir(path):  # an ArcInfo grid, a .SAFE product
        return None, f"a folder, not a raster file: {SAVE_AS}"
    try:
        stat = os.stat(path) if os.path.isfile(path) else None
    except OSError:  # gone since
        stat = None
    if stat is None:
        if os.path.isabs(path) and not path.startswith("/vsi") and not os.path.exists(path):  # it was there once
            return None, f"its file {path} is not there (moved or deleted): put it back, or remove the layer"
        return None, f"not a file (a GDAL virtual path, a connection string): {SAVE_AS}"
    driver = _driver(path, stat.st_size, stat.st_mtime_ns)
    # a JPEG 2000 is read by whichever JP2 driver the worker's GDAL has, whichever QGIS's used
    if driver not in CLIENT_DRIVERS and not (driver or "").startswith("JP2"):
        return None, f"a {driver or 'raster'} file, a format the worker does not read: {SAVE_AS}"
    # as QGIS opened it: a relative path (qgis_process, a model run from a folder) was resolved by the
    # worker from its own folder, and indexed another file of that name there, or was refused as outside
    return os.path.abspath(path), ""


@lru_cache(maxsize=1024)
def _driver(path: str, size: int, mtime_ns: int) -> Optional[str]:
    """The GDAL driver that opens `path` as a raster (its short name), or None. Kept by the
    file's size and time: the layer list is made again at every layer added, on QGIS's thread."""
    from osgeo import gdal

    try:  # GDAL raises only where a plugin asked it to (gdal.UseExceptions)
        data = gdal.OpenEx(path, gdal.OF_RASTER)
    except RuntimeError:
        return None
    return data.GetDriver().ShortName if data is not None else None
