"""The indexes a worker serves: each opened once and kept while unchanged on disk, listed with
whether this worker's model can search them, and deleted on request.

"Unchanged" means its manifest has the size and modification time it had when the index was
opened: every commit rewrites it. A shard or map truncated under a running worker is found by
the read that meets it (worker.store.shard_file checks each file's size as it reads), which
answers `corrupt_index` and has the index opened, and so checked, afresh. Listing checks the
level maps' headers too. Each search stat'ed every shard file before: 2 files a shard, 312 ms
at 10,000 shards, so about 1.2 s a search at the 39,000 shards of a 10M-tile index.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from pathlib import Path

from worker.app import check_index, open_index
from worker.errors import IndexMismatchError, InputError, error_object
from worker.service.paths import TRASH_PREFIX
from worker.store import MANIFEST, TILES_LAYER, TileIndex
from worker.store.format import holds_an_index, manifest_stamp

log = logging.getLogger(__name__)


class OpenIndexes:
    """Opened indexes by directory, reopened when an indexing job has committed more (continuing
    the maps the last view joined of rasters being indexed)."""

    def __init__(self, model, partial_maps_bytes: int | None = None):
        self.model = model
        self.partial_maps_bytes = partial_maps_bytes  # worker.store.maps.PARTIAL_MAPS_BYTES when None
        self._open: dict[Path, TileIndex] = {}  # by folder (TileIndex.stamp: its manifest's file when read)
        self._lock = threading.Lock()  # searches run in a thread pool
        self._emptying = threading.Lock()  # one thread at a time removes the trash (delete)

    def get(self, index_dir: Path) -> TileIndex:
        """The index in `index_dir` (NotFoundError, IndexMismatchError for another format,
        CorruptIndexError for damaged files), opened again when its manifest changed."""
        with self._lock:
            cached = self._open.get(index_dir)
        if cached is not None and cached.stamp == manifest_stamp(index_dir):
            return cached
        with self._lock:
            self._open.pop(index_dir, None)  # a damaged index is not kept
        index = open_index(index_dir, self.partial_maps_bytes, earlier=cached)
        if index.stamp is not None and holds_an_index(index_dir):  # deleted meanwhile (or before): not kept
            with self._lock:
                self._open[index_dir] = index
        return index

    def forget(self, index_dir: Path) -> None:
        """Open the index again at its next use (a search found one of its files damaged)."""
        with self._lock:
            self._open.pop(index_dir, None)

    def searchable(self, index_dir: Path) -> TileIndex:
        """The index, refused (IndexMismatchError) when this worker's model did not build it."""
        index = self.get(index_dir)
        check_index(index, self.model)
        return index

    def loaded(self) -> list[Path]:
        with self._lock:
            return list(self._open)

    def delete(self, index_dir: Path, trash: Path) -> None:
        """Forget the index and remove its folder, moved to `trash` first in one step: a folder
        that cannot be moved (a file of it in use) is left whole, an index, and the OSError says
        why; one moved is no longer an index, and its name is free at once. Before, the manifest
        went first and a removal that then failed left a folder that was neither an index nor
        free, which no client could delete or reuse. The trash is removed on a thread of its
        own: removed here, on the service's loop, a 10M-tile index's 39,000 shards took 13.7 s,
        in which no client was answered (the concurrency probe). What is left (a worker stopped
        meanwhile, files that cannot be removed) is a hidden folder of the index root, removed
        at the next delete or start (empty_trash_left_in)."""
        root = trash.parent
        try:
            index_dir.rename(trash)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            trash = index_dir  # on another file system (a linked folder): removed where it is, manifest first
        with self._lock:
            self._open.pop(index_dir, None)
        try:  # moved: what fails from here on is left in the trash, never reported as the index left whole
            (trash / MANIFEST).unlink(missing_ok=True)
        except OSError:
            pass
        if trash == index_dir:  # its name is free only once it is gone
            self._empty_trash(root, trash, index_dir)
        else:
            threading.Thread(target=self._empty_trash, args=(root, trash, index_dir), name="delete-index",
                             daemon=True).start()

    def empty_trash_left_in(self, root: Path) -> None:
        """Remove, on a thread of its own, what deletes left in index root `root`: a worker
        stopped while it removed a deleted index (the plugin's, as QGIS closes) left its files,
        gigabytes of them, until the next delete."""
        if any(root.glob(TRASH_PREFIX + "*")):
            threading.Thread(target=self._empty_trash, args=(root,), name="delete-index", daemon=True).start()

    def _empty_trash(self, root: Path, trash: Path | None = None, deleted: Path | None = None) -> None:
        """Remove `trash` (index `deleted`, moved there) and what earlier deletes left in `root`."""
        with self._emptying:
            for old in [*filter(None, [trash]), *sorted(root.glob(TRASH_PREFIX + "*"))]:
                shutil.rmtree(old, ignore_errors=True)
            if trash is not None and trash.exists():
                log.warning("deleted index %s: some of its files could not be removed, left in %s", deleted, trash)

    def status(self, index_dir: Path) -> dict:
        """What `list_indexes` says of one index; one this worker cannot search is listed with
        `compatible: false` and the reason, and one that cannot be read (a damaged manifest or
        shard) also with its `error`: never a failure of the whole list."""
        tiles_layer = index_dir / TILES_LAYER
        where = {"path": str(index_dir), "tiles_layer": str(tiles_layer) if tiles_layer.is_file() else None}
        unreadable = {**where, "tile_count": None, "rasters": [], "complete": None, "tiling": None, "tokens": None,
                      "compatible": False}
        try:
            index = self.get(index_dir)
            index.check_map_files()
            try:
                check_index(index, self.model)
                reason = None
            except IndexMismatchError as exc:
                reason = str(exc)
        except IndexMismatchError as exc:  # another format: nothing more can be read safely
            return {**unreadable, "reason": str(exc), "error": None}
        except Exception as exc:  # damaged (CorruptIndexError), or a bug: this index alone is flagged
            if not isinstance(exc, InputError):
                log.exception("listing the index in %s failed", index_dir)
            error = error_object(exc)
            return {**unreadable, "reason": error["message"], "error": error}
        rasters = index.manifest["rasters"]
        return {**where, "tile_count": len(index), "rasters": [r["path"] for r in rasters],
                "complete": all(r["complete"] for r in rasters), "tiling": index.manifest["tiling"],
                "tokens": index.has_tokens, "compatible": reason is None, "reason": reason, "error": None}


def index_dirs(root: Path, marks: tuple[str, ...] = (MANIFEST,)) -> list[Path]:
    """Every index under `root` (at any depth: index names are relative paths), but those being
    removed (OpenIndexes.delete): the folders holding one of `marks` (a job's index before its
    first commit holds its JOB_LOCK alone). An index's own folders are not walked (no index lies
    inside one): looking through a 10M-tile index's 39,000 shard folders took seconds at every list."""
    found = []
    for folder, subfolders, files in os.walk(root):
        # another program's manifest.json (a web app's) marks no index, and indexes below it are found
        if any(mark in files and (mark != MANIFEST or holds_an_index(Path(folder))) for mark in marks):
            found.append(Path(folder))
            subfolders.clear()
        else:
            subfolders[:] = [d for d in subfolders if not d.startswith(TRASH_PREFIX)]
    return sorted(found)
