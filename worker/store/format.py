"""The index on disk: its layout, version and compatibility rules, written down once.

Layout of INDEX_DIR:
  manifest.json        model fingerprint, tile settings, rasters, committed shards (replaced atomically)
  shards/<name>/       records.npy (tile windows, WGS84 bounds, where the tile's cells lie on its level's
                       grid), global.npy (n, D) fp16, tokens.npy (n, K, D) fp16, positions.npy (n, K)
                       int16, cells.npy (n, G, G, 9) uint8 (worker.edge_cells, worker.level_maps)
  tiles.gpkg           the indexed tiles as polygons (EPSG:4326) for QGIS, rebuilt after each run
  .lock                held by the one process writing the index
A shard directory is written under a temporary name and renamed into place, then the manifest
naming it is replaced: a crash at any point leaves the last committed state, and a rerun
recomputes only the chunks that were not committed. A shard of only empty tiles holds its
records alone (readers skip shards of count 0).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from worker.errors import IndexMismatchError, InputError, NotFoundError

# 2: edge layouts per tile; 3: backbones named by their source (worker.model.identity);
# 4: edge cells on shared level grids instead of per-tile layouts (search at every placement)
FORMAT_VERSION = 4
CHUNK_TILES = 256
MANIFEST = "manifest.json"
SHARDS = "shards"
TILES_LAYER = "tiles.gpkg"
LOCK = ".lock"
RECORD_DTYPE = np.dtype([("raster_id", "<i4"), ("col_off", "<i4"), ("row_off", "<i4"), ("width", "<i4"),
                         ("height", "<i4"), ("scale", "<i2"), ("valid", "<f4"), ("bounds4326", "<f8", (4,)),
                         ("cell_row", "<i4"), ("cell_col", "<i4"), ("cell_rows", "<i2"), ("cell_cols", "<i2")])
SHARD_ARRAYS = ("records", "global", "tokens", "positions", "cells")


def shard_name(raster_id: int, chunk: int) -> str:
    return f"r{raster_id:05d}-c{chunk:06d}"


def new_manifest(model_fingerprint: dict, tiling: dict, chunk_tiles: int, drawing_size: int) -> dict:
    """The manifest of an index with nothing committed yet."""
    now = time.time()
    return {"format": FORMAT_VERSION, "model": model_fingerprint, "tiling": tiling, "chunk_tiles": chunk_tiles,
            "drawing_size": drawing_size, "rasters": [], "shards": [], "tile_count": 0, "created": now, "updated": now}


def read_manifest(index_dir: Path) -> dict:
    """The committed manifest of an index: NotFoundError when the folder is not an index,
    IndexMismatchError when it is of another format."""
    path = Path(index_dir) / MANIFEST
    if not path.exists():
        raise NotFoundError(f"{index_dir} is not an index (no {MANIFEST}); build one with `index`")
    manifest = json.loads(path.read_text())
    check_format(manifest, index_dir)
    return manifest


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(index_dir: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Write one shard's arrays under a temporary name and rename it into place (the manifest
    that names it is committed after)."""
    shards = Path(index_dir) / SHARDS
    tmp = shards / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key, arr in arrays.items():
        with open(tmp / f"{key}.npy", "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, shards / name)


@contextmanager
def index_lock(index_dir: Path) -> Iterator[None]:
    """One writer per index (a second one gets a clear error instead of interleaving shards)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{index_dir} is being written by another indexing run") from None
        yield


def check_format(manifest: dict, index_dir: Path) -> None:
    if manifest.get("format") != FORMAT_VERSION:
        raise IndexMismatchError(f"{index_dir}: index format {manifest.get('format')} is not {FORMAT_VERSION}; "
                                 "build it again with this version")


def check_compatible(manifest: dict, tile_encoder: str, settings: dict, index_dir: Path) -> None:
    check_format(manifest, index_dir)
    if manifest["model"]["tile_encoder"] != tile_encoder:
        raise IndexMismatchError(f"{index_dir} was built with another model (tile encoder "
                                 f"{manifest['model']['tile_encoder']}, this worker has {tile_encoder}); "
                                 "use that model or build a new index")
    if settings is not None and manifest["tiling"] != settings:
        raise IndexMismatchError(f"{index_dir} was built with tile settings {manifest['tiling']}, not {settings}; "
                                 "extend it with the same settings or build a new index")


