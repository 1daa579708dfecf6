"""The indexes a worker serves: each opened once and kept while unchanged on disk, listed with
whether this worker's model can search them, and deleted on request."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from worker.app import check_index, open_index
from worker.errors import IndexMismatchError
from worker.store import MANIFEST, TILES_LAYER, TileIndex


class OpenIndexes:
    """Opened indexes by directory, reopened when an indexing job has committed more."""

    def __init__(self, model):
        self.model = model
        self._open: dict[Path, tuple[int, TileIndex]] = {}
        self._lock = threading.Lock()  # searches run in a thread pool

    def get(self, index_dir: Path) -> TileIndex:
        """The index in `index_dir` (NotFoundError, or IndexMismatchError for another format)."""
        manifest = index_dir / MANIFEST
        stamp = manifest.stat().st_mtime_ns if manifest.exists() else None
        with self._lock:
            cached = self._open.get(index_dir)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        index = open_index(index_dir)
        with self._lock:
            self._open[index_dir] = (stamp, index)
        return index

    def searchable(self, index_dir: Path) -> TileIndex:
        """The index, refused (IndexMismatchError) when this worker's model did not build it."""
        index = self.get(index_dir)
        check_index(index, self.model)
        return index

    def loaded(self) -> list[Path]:
        with self._lock:
            return list(self._open)

    def delete(self, index_dir: Path) -> None:
        """Forget the index and remove its folder. The manifest goes first, so a folder left half
        removed (a crash, a file in use) is no longer an index and is never listed or searched."""
        with self._lock:
            self._open.pop(index_dir, None)
        (index_dir / MANIFEST).unlink()
        shutil.rmtree(index_dir)

    def status(self, index_dir: Path) -> dict:
        """What `list_indexes` says of one index; one this worker cannot search is listed with
        `compatible: false` and the reason, not refused."""
        tiles_layer = index_dir / TILES_LAYER
        where = {"path": str(index_dir), "tiles_layer": str(tiles_layer) if tiles_layer.is_file() else None}
        try:
            index = self.get(index_dir)
        except IndexMismatchError as exc:  # another format: nothing more can be read safely
            return {**where, "tile_count": None, "rasters": [], "complete": None, "tiling": None,
                    "compatible": False, "reason": str(exc)}
        try:
            check_index(index, self.model)
            reason = None
        except IndexMismatchError as exc:
            reason = str(exc)
        info = index.info()
        return {**where, "tile_count": info["tile_count"], "rasters": [r["path"] for r in info["rasters"]],
                "complete": info["complete"], "tiling": info["tiling"], "compatible": reason is None, "reason": reason}


def index_dirs(root: Path) -> list[Path]:
    """Every index under `root` (at any depth: index names are relative paths)."""
    return sorted(p.parent for p in root.rglob(MANIFEST))
