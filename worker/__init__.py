"""Sketch search worker: tiles georeferenced rasters, indexes them, answers sketch queries.

This package's __init__ stays light (no torch, no rasterio). What QGIS's Python needs (the
messages, error codes, job states) lives in the separate `wire` package, which never imports
torch.
"""

__version__ = "0.1.0"
