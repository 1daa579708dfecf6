"""Which raster layers the worker can index: files in a format it opens for its clients. It
refused a whole build that held one it cannot read (a GeoPackage's raster, a web layer)."""

from __future__ import annotations

import os
from typing import Optional

from .wire.protocol import CLIENT_DRIVERS

SAVE_AS = "save it as a GeoTIFF (Export > Save As…) to index it"


def raster_file(layer) -> tuple[Optional[str], str]:
    """The file a raster layer reads, or None and why the worker cannot index it."""
    if layer.providerType() != "gdal":
        return None, f"a web or in-memory raster ({layer.providerType()}), not a file: {SAVE_AS}"
    path = layer.source().split("|")[0]
    if not os.path.isfile(path):
        if os.path.isabs(path) and not path.startswith("/vsi") and not os.path.exists(path):  # it was there once
            return None, f"its file {path} is not there (moved or deleted): put it back, or remove the layer"
        return None, f"not a file (a GDAL virtual path, a database): {SAVE_AS}"
    driver = _driver(path)
    if driver not in CLIENT_DRIVERS:
        return None, f"a {driver or 'raster'} file, a format the worker does not read: {SAVE_AS}"
    return path, ""


def _driver(path: str) -> Optional[str]:
    """The GDAL driver that opens `path` as a raster (its short name), or None."""
    from osgeo import gdal

    try:  # GDAL raises only where a plugin asked it to (gdal.UseExceptions)
        data = gdal.OpenEx(path, gdal.OF_RASTER)
    except RuntimeError:
        return None
    return data.GetDriver().ShortName if data is not None else None
