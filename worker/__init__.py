"""Sketch search worker: tiles georeferenced rasters, indexes them, answers sketch queries.

This package's __init__ stays light (no torch, no rasterio) so that `worker.protocol` and
`worker.client` can be imported from QGIS's Python.
"""

__version__ = "0.1.0"
