"""How the plugin names a CRS to the worker: an authority code the worker can read, else WKT2."""

from __future__ import annotations

from typing import Optional

from qgis.core import QgsCoordinateReferenceSystem


def crs_name(crs: QgsCoordinateReferenceSystem) -> Optional[str]:
    """EPSG:3857 and the like for a CRS with an authority code, else its WKT2: QGIS's own USER:
    codes mean nothing to the worker, and WKT1 as QGIS writes it for a custom CRS holds a PROJ4
    extension, which the worker refuses (it could name files). None for an invalid CRS (a
    project with "No CRS")."""
    if not crs.isValid():
        return None
    authid = crs.authid()
    if authid and not authid.upper().startswith("USER:"):
        return authid
    return crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)
