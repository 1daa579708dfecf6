"""Sketch search worker: tiles georeferenced rasters, indexes them, answers sketch queries.

This package's __init__ stays light (no torch, no rasterio). What QGIS's Python needs (the
messages, error codes, job states) lives in the separate `wire` package, which never imports
torch. It sets how torch's OpenMP threads wait (worker.openmp) before any of its modules can
load torch: every entry point (`python -m worker`, the console script, a Dask worker, a lab
tool) imports this first.
"""

from worker.openmp import spin_briefly

__version__ = "0.1.0"

spin_briefly()
