"""Which raster layers the worker can index: GDAL rasters that are files. The worker reads files,
and refused a whole build that held a raster that is none."""

from __future__ import annotations

import os
from typing import Optional

NOT_A_FILE = ("not a file the worker can read (a GeoPackage raster, an in-memory, virtual or web raster): save it as "
              "a GeoTIFF (Export > Save As…) to index it")


def raster_file(layer) -> Optional[str]:
    """The file a raster layer reads, or None when it reads none (NOT_A_FILE says what to do)."""
    if layer.providerType() != "gdal":
        return None
    path = layer.source().split("|")[0]
    return path if os.path.isfile(path) else None
