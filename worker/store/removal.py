"""Taking rasters out of an index: a file deleted for good, a sheet withdrawn from a mosaic.

A raster that is gone is left out of every search, said `unreadable`, for as long as the index
names it; indexing its folder again keeps it (a drive unplugged for a day must not cost its
tiles), so only this takes it out. The manifest is committed first, without the rasters: a run
killed after it leaves files no commit names, which the next run of the writer removes
(IndexWriter._clean_uncommitted)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple, Sequence

from wire.protocol import excerpt
from worker.errors import InputError
from worker.interrupts import StoppedOnceDone
from worker.store.format import (MANIFEST, TILES_LAYER, disk_write, index_lock, read_manifest, remove_shards,
                                 write_json_atomic)
from worker.store.gpkg import write_tiles_gpkg
from worker.store.maps import remove_maps


class Removed(NamedTuple):
    """The rasters taken out, as the index named them, and the tiles the index holds after."""

    rasters: list[str]
    tile_count: int


def remove_rasters(index_dir: Path, paths: Sequence[str]) -> Removed:
    """Take the rasters at `paths` out of the index at `index_dir`: their entries, tiles and
    level maps; the tiles layer is written again. A path names a raster as given, or as the index
    names it (links resolved where they still resolve), or a folder: every raster the index holds
    below it, as `index` takes a folder (there or gone). InputError, changing nothing, when a path
    names none of the index's rasters, or folders alone would take out all of them (`.`, `/`, or
    an empty argument from an unset shell variable, emptied an index unasked)."""
    with index_lock(index_dir):
        manifest = read_manifest(index_dir)
        held = {entry["path"]: entry for entry in manifest["rasters"]}
        named = {path: _as_indexed(path, held) for path in paths}
        unknown = [path for path, indexed in named.items() if not indexed]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise InputError(f"{index_dir} holds no raster {excerpt(unknown[0])}{more}, nor, for a folder, any below "
                             "it: name rasters, or their folders, as `info` lists them")
        taken = {indexed for found in named.values() for indexed in found}
        by_folder = [path for path, found in named.items() if found != [_as_file(path, held)]]
        if by_folder and taken == held.keys():
            raise InputError(f"{excerpt(by_folder[0])} holds every raster of {index_dir} ({len(held)}): to empty the "
                             "index, delete it; else name the rasters to take out")
        ids = {held[indexed]["id"] for indexed in taken}
        gone = [s["name"] for s in manifest["shards"] if s["raster_id"] in ids]
        manifest["rasters"] = [entry for entry in manifest["rasters"] if entry["id"] not in ids]
        manifest["shards"] = [s for s in manifest["shards"] if s["raster_id"] not in ids]
        manifest["tile_count"] = sum(s["count"] for s in manifest["shards"])
        manifest["updated"] = time.time()
        # gone before the commit: a removal killed after it left the layer showing the rasters taken
        # out, in QGIS, until a run wrote it again (probe); the index's next complete run writes it
        with disk_write(index_dir / TILES_LAYER):
            (index_dir / TILES_LAYER).unlink(missing_ok=True)
        write_json_atomic(index_dir / MANIFEST, manifest)
        try:
            for raster_id in ids:
                remove_maps(index_dir, raster_id)
            remove_shards(index_dir, gone)
            with disk_write(index_dir / TILES_LAYER):
                write_tiles_gpkg(index_dir)
        except KeyboardInterrupt as exc:  # said "interrupted" alone, the removal looked undone (probe)
            raise StoppedOnceDone(exc, f"{taken_out(len(taken))} (their files, and the tiles layer, are seen to by "
                                       "the index's next run)") from None
    return Removed(sorted(taken), manifest["tile_count"])


def taken_out(count: int) -> str:
    """How a removal stopped once committed says what it did."""
    return f"{count} raster{'s were' if count > 1 else ' was'} taken out of the index"


def _as_indexed(path: str, held: dict) -> list[str]:
    """The paths under which the index holds `path`: a raster (_as_file), or, for a folder,
    those of every raster it holds below it (an imagery year indexed as a folder was taken out
    a file at a time): named below it, or, in a folder still there, linked from it (the index
    holds a link's target, as `index` found it)."""
    as_file = _as_file(path, held)
    if as_file is not None:
        return [as_file]
    if not path.strip():  # "" is the working folder to pathlib
        return []
    written, resolved = Path(path).expanduser().absolute(), Path(path).expanduser().resolve()
    below = {p for p in held if any(Path(p).is_relative_to(folder) for folder in {written, resolved})}
    if resolved.is_dir():
        from worker.tiling import files_under  # worker.tiling reads indexes: imported here, no cycle

        below |= {str(file.resolve()) for file in files_under(resolved)} & held.keys()
    return sorted(below)


def _as_file(path: str, held: dict) -> str | None:
    """The path under which the index holds the raster at `path`: as written, or absolute with
    its links resolved."""
    if path in held:
        return path
    resolved = str(Path(path).expanduser().resolve())
    return resolved if resolved in held else None
