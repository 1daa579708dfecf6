"""The index on disk: its layout, version and compatibility rules, written down once.

Layout of INDEX_DIR:
  manifest.json        model fingerprint, tile settings, rasters, committed shards (replaced atomically)
  shards/<name>/       records.npy (tile windows, WGS84 bounds, where the tile's cells lie on its level's
                       grid), cells.npy (n, G, G, 9) uint8 (worker.edge_cells, worker.level_maps); in an
                       index built with tokens (`index --tokens`) also global.npy (n, D) fp16,
                       tokens.npy (n, K, D) fp16, positions.npy (n, K) int16
  tiles.gpkg           the indexed tiles as polygons (EPSG:4326) for QGIS, rebuilt after each run
  .lock                held by the one process writing the index
  job.json             the service's indexing request while its job runs (resumed after a crash)
A shard directory is written under a temporary name and renamed into place, then the manifest
naming it as committed is replaced: a crash at any point leaves the last committed state, a
rerun recomputes only the chunks that were not committed, and cleaning up (under the index's
lock, against the manifest read under it) removes only shard folders, by their names' form,
that no commit names: never a file the index did not write. (Older versions named each shard
in a journal, the manifest's `pending`, before writing it: a second manifest write a chunk.)
A folder that holds anything else is not made an index. A shard of only empty tiles holds its records alone
(readers skip shards of count 0).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from wire import errors as codes
from wire.protocol import excerpt
from worker.errors import (CorruptIndexError, IndexMismatchError, InputError, NotFoundError, StorageError,
                           storage_advice)

log = logging.getLogger(__name__)

# 2: edge layouts per tile; 3: backbones named by their source (worker.model.identity);
# 4: edge cells on shared level grids instead of per-tile layouts (search at every placement);
# 5: the ViT tokens only when asked (the manifest's `tokens`). A format 4 index holds them all and
# stays readable and extendable as it is; a worker of format 4 refuses a format 5 index as of
# another format, rather than calling its missing token files damaged.
FORMAT_VERSION = 5
READABLE_FORMATS = (4, FORMAT_VERSION)
CHUNK_TILES = 256
MANIFEST = "manifest.json"
SHARDS = "shards"
TILES_LAYER = "tiles.gpkg"
LOCK = ".lock"
JOB_FILE = "job.json"
# held by the worker whose job owns the index's job file, queued or running (worker.service.jobs): a
# queued job does not hold LOCK yet, and another worker sharing the index root overwrote its job
# file, and then lost its own when the first one's job ended
JOB_LOCK = ".job.lock"
RECORD_DTYPE = np.dtype([("raster_id", "<i4"), ("col_off", "<i4"), ("row_off", "<i4"), ("width", "<i4"),
                         ("height", "<i4"), ("scale", "<i2"), ("valid", "<f4"), ("bounds4326", "<f8", (4,)),
                         ("cell_row", "<i4"), ("cell_col", "<i4"), ("cell_rows", "<i2"), ("cell_cols", "<i2")])
TOKEN_ARRAYS = ("global", "tokens", "positions")  # only in an index built with tokens (holds_tokens)
SHARD_ARRAYS = ("records", *TOKEN_ARRAYS, "cells")
SHARD_NAME = re.compile(r"r\d{5}-c\d{6}")  # shard_name's form
TMP_PREFIX = ".tmp-"


def shard_name(raster_id: int, chunk: int) -> str:
    return f"r{raster_id:05d}-c{chunk:06d}"


def new_manifest(model_fingerprint: dict, tiling: dict, chunk_tiles: int, drawing_size: int, tokens: bool) -> dict:
    """The manifest of an index with nothing committed yet."""
    now = time.time()
    return {"format": FORMAT_VERSION, "model": model_fingerprint, "tiling": tiling, "chunk_tiles": chunk_tiles,
            "drawing_size": drawing_size, "tokens": tokens, "rasters": [], "shards": [], "tile_count": 0,
            "created": now, "updated": now}


def holds_tokens(manifest: dict) -> bool:
    """Whether the index's shards hold ViT tokens (TOKEN_ARRAYS): only what the "tokens" ranker
    and a token weight use. A manifest that does not say (format 4, from before the choice) is of
    an index that holds them."""
    return manifest.get("tokens") is not False


def check_tokens(manifest: dict, tokens: bool | None, index_dir: Path) -> None:
    """IndexMismatchError when a request to extend an index asks otherwise of its tokens than it
    was built with (None asks nothing)."""
    if tokens is not None and tokens != holds_tokens(manifest):
        built = "with" if holds_tokens(manifest) else "without"
        raise IndexMismatchError(f"{index_dir} was built {built} the tiles' ViT tokens, and an index keeps that choice: "
                                 "extend it without asking for tokens (leave out --tokens or the index op's `tokens`), "
                                 "or build a new index")


def shard_arrays(manifest: dict) -> tuple[str, ...]:
    """The arrays each shard of the index holds."""
    return SHARD_ARRAYS if holds_tokens(manifest) else tuple(a for a in SHARD_ARRAYS if a not in TOKEN_ARRAYS)


def manifest_stamp(index_dir: Path) -> tuple | None:
    """The index's manifest's file, size and change time (None when there is none): every
    commit writes a new file and renames it into place, so a new stamp is a new commit."""
    try:
        st = os.stat(Path(index_dir) / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def holds_an_index(folder: Path) -> bool:
    """Whether `folder` is an index's: nothing is built or written inside one but by its own
    writer. It holds a manifest and its shards folder, or a manifest that reads as an index's or
    cannot be read (a damaged index's); another program's manifest.json (a web app's, one in the
    home folder) is no index's."""
    if not (Path(folder) / MANIFEST).is_file():
        return False
    if (Path(folder) / SHARDS).is_dir():
        return True
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return True
    return isinstance(manifest, dict) and {"format", "shards"} <= manifest.keys()


def read_manifest(index_dir: Path) -> dict:
    """The committed manifest of an index: NotFoundError when the folder is not an index,
    IndexMismatchError when it is of another format, CorruptIndexError when it cannot be read."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise NotFoundError(f"{index_dir} is not an index (no {MANIFEST}); build one with `index`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptIndexError(f"{path} cannot be read ({str(exc)[:120]}): delete the index and build it "
                                "again") from None
    if not isinstance(manifest, dict):
        raise CorruptIndexError(f"{path} is not a manifest: delete the index and build it again")
    check_format(manifest, index_dir)
    check_manifest_shape(manifest, path)
    return manifest


RASTER_FIELDS = {"id": int, "path": str, "size": int, "mtime_ns": int, "width": int, "height": int, "crs_wkt": str,
                 "transform": list, "bands": list, "stretch": (list, type(None)), "complete": bool,
                 "tiles_total": (int, type(None)), "tiles_skipped": int}  # what readers take of a raster's entry
OPTIONAL_RASTER_FIELDS = {"sources": list, "palette": bool}  # a VRT's sources, a paletted raster


def _listed(manifest: dict, name: str) -> list:
    """A manifest's list field, or [] where it is no list (said as malformed by its own check)."""
    return manifest[name] if isinstance(manifest.get(name), list) else []


def _raster_entry_readable(entry: object) -> bool:
    """Whether a raster's entry holds RASTER_FIELDS, and OPTIONAL_RASTER_FIELDS where it has them, of their types."""
    return isinstance(entry, dict) and all(isinstance(entry.get(k, ...), kind) for k, kind in RASTER_FIELDS.items()) \
        and all(isinstance(entry[k], kind) for k, kind in OPTIONAL_RASTER_FIELDS.items() if k in entry)


def check_manifest_shape(manifest: dict, path: Path) -> None:
    """The fields readers rely on are there, with their types (a damaged or hand-edited manifest
    is refused here with what to do, not deep inside a search)."""
    kinds = {"model": dict, "tiling": dict, "rasters": list, "shards": list, "drawing_size": int}
    wrong = [k for k, kind in kinds.items() if not isinstance(manifest.get(k), kind)]
    wrong += [f"rasters[{i}]" for i, r in enumerate(_listed(manifest, "rasters")) if not _raster_entry_readable(r)]
    wrong += [f"shards[{i}]" for i, s in enumerate(_listed(manifest, "shards"))
              if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int)
                      and SHARD_NAME.fullmatch(s["name"]))]
    if wrong:
        raise CorruptIndexError(f"{path} is damaged ({', '.join(wrong[:5])} missing or malformed): delete the index "
                                "and build it again")


INDEXING_THEN = "then run the job again: committed chunks are kept"


@contextmanager
def disk_write(path: Path, then: str = INDEXING_THEN) -> Iterator[None]:
    """Writes to `path`: an OSError (a full, read-only or failing disk) becomes a StorageError
    that says where, how much space is left, what to do (worker.errors.storage_advice), and `then`."""
    try:
        yield
    except OSError as exc:
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 1e6:.1f} MB left there"
        except OSError:
            free = "free space unknown"
        reason = exc.strerror or str(exc)  # numpy's short writes say "N requested and M written"
        raise StorageError(f"cannot write {path}: {reason} ({free}); {storage_advice(exc)}; {then}") from exc


def allocated_memmap(path: Path, dtype, shape: tuple[int, ...]):
    """numpy's open_memmap of a new .npy file, its blocks allocated on disk at once: writing
    through a memory map into a sparse file past the disk's free space raises SIGBUS, which
    killed the process (a worker service, every client's searches with it) with no message;
    allocated first, a full disk is an OSError here, which disk_write says as a storage error."""
    from numpy.lib.format import open_memmap

    out = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):  # not on macOS or Windows
        descriptor = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(descriptor, 0, os.fstat(descriptor).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # a file system without it
                del out
                raise
        finally:
            os.close(descriptor)
    return out


def sync_folder(folder: Path) -> None:
    """Put a folder's renames on disk: a rename is not durable until its folder is synced, so a
    power cut could otherwise keep a manifest that names a shard and lose the shard's rename."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: .NAME.PID.tmp beside it, a name
    no reader opens and no other process writes (a killed writer's is found by is_temporary)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temporary(name: str, of: str) -> bool:
    """Whether `name` is a temporary_path of a file whose name matches the glob `of`."""
    return fnmatch.fnmatchcase(name, f".{of}.*.tmp")


def replace_durably(tmp: Path, dest: Path) -> None:
    """Rename a written file or folder into place, the rename on disk before anything after it."""
    os.replace(tmp, dest)
    sync_folder(Path(dest).parent)


def write_json_atomic(path: Path, obj: dict, then: str = INDEXING_THEN) -> None:
    """`obj` as JSON at `path`, all or nothing; a failed write is disk_write's storage error,
    ending with `then`. On one line: indented, the manifest of a 10M-tile index (39,000 shards,
    4 MB) took 227 ms to write, and it was written for every chunk (json's indenting encoder is
    pure Python); 44 ms to encode as one line."""
    tmp = temporary_path(path)
    text = json.dumps(obj)
    with disk_write(path, then):
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            replace_durably(tmp, path)
        finally:
            if tmp.is_file():  # a write that failed leaves nothing behind
                tmp.unlink()


def write_shard(index_dir: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Write one shard's arrays under a temporary name and rename it into place (the manifest
    that names it is committed after; one a crash leaves uncommitted is removed by the next run)."""
    shards = Path(index_dir) / SHARDS
    tmp = shards / f"{TMP_PREFIX}{name}"
    with disk_write(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()  # not its parents: an index folder removed meanwhile stays removed (IndexWriter._check_in_place)
        try:
            for key, arr in arrays.items():
                with open(tmp / f"{key}.npy", "wb") as f:
                    np.save(f, arr)
                    f.flush()
                    os.fsync(f.fileno())
            sync_folder(tmp)  # its files' names
            replace_durably(tmp, shards / name)
        except BaseException:
            # a write that failed leaves nothing: on a full disk, its part filled the last bytes, and
            # the commit of the shards written before it failed too, and they were computed again (probe)
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def remove_temporaries(folder: Path, of: str) -> None:
    """The files a killed writer left in `folder` under the temporary name (temporary_path) of a
    file whose name matches the glob `of`; only a run holding the index's lock, so that no other
    writer's is underway."""
    for name in os.listdir(folder) if Path(folder).is_dir() else []:
        if is_temporary(name, of):
            (Path(folder) / name).unlink(missing_ok=True)


def remove_shards(index_dir: Path, names: Iterable[str]) -> None:
    """Remove shards (and their half-written temporaries) by name: only names of this format,
    so nothing but what an index writer wrote is ever removed."""
    shards = Path(index_dir) / SHARDS
    for name in names:
        if SHARD_NAME.fullmatch(name):
            for entry in (shards / name, shards / f"{TMP_PREFIX}{name}"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)


def check_index_folder(index_dir: Path) -> None:
    """A folder an index may be built in: an index already, absent, or holding only what an
    index writer leaves before its first commit. A folder with anything else (a user's files,
    other indexes, another program's manifest.json) or inside another index is refused:
    building there must never delete or mix."""
    index_dir = Path(index_dir)
    for parent in index_dir.parents:
        if holds_an_index(parent):
            raise InputError(f"{index_dir} is inside the index {parent}: name a folder outside it")
    if not index_dir.exists():
        return
    if not index_dir.is_dir():
        raise InputError(f"{index_dir} is a file, not an index folder: name another folder")
    if holds_an_index(index_dir):
        return
    foreign = sorted(entry.name for entry in index_dir.iterdir() if not _left_by_a_writer(entry))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(f"{index_dir} already holds other things ({shown}) and is not an index: name a new or empty "
                         "folder")


def _left_by_a_writer(entry: Path) -> bool:
    """What an index writer creates before its first commit: the lock, the job file, temporary
    manifests, and an empty shards folder."""
    name = entry.name
    temporary = is_temporary(name, MANIFEST) or is_temporary(name, JOB_FILE)
    if name in (LOCK, JOB_LOCK, JOB_FILE) or temporary:
        return entry.is_file() and not entry.is_symlink()
    return name == SHARDS and entry.is_dir() and not entry.is_symlink() and not any(entry.iterdir())


class IndexLocked(InputError):
    """Another writer holds the index (an indexing run or a shortlist build, in any process):
    `busy` to a client, whose request may be made again once it ends."""

    code = codes.BUSY


LOCK_PATIENCE_S = 0.5  # a lock held this briefly is no writer's: a service looking whether one holds it


@contextmanager
def index_lock(index_dir: Path, patience_s: float = LOCK_PATIENCE_S) -> Iterator[None]:
    """One writer per index (a second one gets a clear error instead of interleaving shards),
    once the lock has been held `patience_s` past the first try."""
    with disk_write(index_dir / LOCK):
        index_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(index_dir / LOCK, "w")
    with lock_file:
        if not _locked_within(lock_file, patience_s):
            raise IndexLocked(f"{index_dir} is being written by another indexing run: wait for it to end, "
                              "or stop it, and run this again")
        yield


def _locked_within(lock_file: IO, patience_s: float) -> bool:
    """Whether this process got the exclusive lock of `lock_file` within `patience_s` of the
    first try (tried again every 20 ms)."""
    waited = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= waited:
                return False
            time.sleep(0.02)


def locked_by_another(index_dir: Path, lock: str = LOCK) -> bool:
    """Whether a writer holds the index now (a command-line run, in another process): a service
    refuses a job at once rather than start one that fails. A writer may take it a moment after.
    With JOB_LOCK: whether a job of another worker owns the index's job file (held_job_lock)."""
    try:
        with open(Path(index_dir) / lock, "rb") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file: no writer yet
        return False
    return False


def held_job_lock(index_dir: Path, patience_s: float = LOCK_PATIENCE_S) -> IO | None:
    """The index's JOB_LOCK, made and held (the open file: closing it lets go), or None when
    another process holds it `patience_s` past the first try (locked_by_another takes it for a
    moment to look). OSError when it cannot be made or locked."""
    lock_file = open(Path(index_dir) / JOB_LOCK, "a")
    try:
        if _locked_within(lock_file, patience_s):
            return lock_file
    except BaseException:
        lock_file.close()
        raise
    lock_file.close()
    return None


def remove_unborn(index_dir: Path) -> None:
    """Remove an index folder left without a first commit (its run failed or was cancelled
    first; or made empty by hand): only the lock and an empty shards folder in it, and no writer
    holding it. Left behind, it kept the name in the index root as a folder that was not an
    index. Never raises: what cannot be removed is left as it is."""
    if not index_dir.is_dir() or (index_dir / MANIFEST).exists():
        return
    try:
        with index_lock(index_dir):
            entries = list(index_dir.iterdir())
            if (index_dir / MANIFEST).exists() or any(e.name == JOB_FILE or not _left_by_a_writer(e) for e in entries):
                return
            for entry in entries:
                entry.rmdir() if entry.is_dir() else entry.unlink()
            index_dir.rmdir()
    except (InputError, OSError) as exc:  # written meanwhile (IndexLocked), or the disk refused (StorageError)
        log.info("%s left as it is: %s", index_dir, exc)


# the parts of a model's fingerprint a user chooses, and how a refusal names them
MODEL_CHOICES = (("timm_name", "model (--model)"), ("backbone_id", "backbone weights (--weights, --random-weights)"),
                 ("img_size", "input size (--img-size)"), ("tile_view", "tile view (--tile-view)"))


def check_format(manifest: dict, index_dir: Path) -> None:
    if manifest.get("format") not in READABLE_FORMATS:
        raise IndexMismatchError(f"{index_dir}: index format {excerpt(manifest.get('format'))} is not "
                                 f"{' or '.join(map(str, READABLE_FORMATS))}; build it again with this version")


def check_compatible(manifest: dict, model: dict, settings: dict | None, index_dir: Path) -> None:
    """IndexMismatchError unless the index was built by `model` (its fingerprint) with `settings`
    (None: any), naming what differs."""
    check_format(manifest, index_dir)
    built = manifest["model"]
    if built.get("tile_encoder") != model["tile_encoder"]:
        differs = [f"{what} {built.get(key)}, this worker's {model[key]}" for key, what in MODEL_CHOICES
                   if key in built and built[key] != model[key]]  # a user's options: --model, --img-size, ...
        why = "; ".join(differs) or (f"tile encoder {built.get('tile_encoder')}, this worker's {model['tile_encoder']}: "
                                     "tiles drawn another way by another version")
        raise IndexMismatchError(f"{index_dir} was built with another model ({why}); use that model and version, or "
                                 "build a new index")
    if settings is not None and manifest["tiling"] != settings:
        raise IndexMismatchError(f"{index_dir} was built with tile settings {manifest['tiling']}, not {settings}; "
                                 "extend it with the same settings or build a new index")


