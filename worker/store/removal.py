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

from worker.errors import InputError
from worker.store.format import (MANIFEST, TILES_LAYER, disk_write, index_lock, read_manifest, remove_shards,
                                 write_json_atomic)
from worker.store.gpkg import write_tiles_gpkg
from worker.store.maps import remove_maps


class Removed(NamedTuple):
    """The rasters taken out, as the index named them, and the tiles the index holds after."""

    rasters: list[str]
    tile_count: int


def remove_rasters(index_dir: Path, paths: Sequence[str]) -> Removed:
    """Take the rasters at `paths` (as given, or as the index names them: links resolved where
    they still resolve) out of the index at `index_dir`: their entries, tiles and level maps;
    the tiles layer is written again. InputError, changing nothing, when the index does not
    hold one of them."""
    with index_lock(index_dir):
        manifest = read_manifest(index_dir)
        held = {entry["path"]: entry for entry in manifest["rasters"]}
        named = {path: _as_indexed(path, held) for path in paths}
        unknown = [path for path, indexed in named.items() if indexed is None]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise InputError(f"{index_dir} holds no raster {unknown[0]}{more}: name rasters as `info` lists them")
        ids = {held[indexed]["id"] for indexed in named.values()}
        gone = [s["name"] for s in manifest["shards"] if s["raster_id"] in ids]
        manifest["rasters"] = [entry for entry in manifest["rasters"] if entry["id"] not in ids]
        manifest["shards"] = [s for s in manifest["shards"] if s["raster_id"] not in ids]
        manifest["tile_count"] = sum(s["count"] for s in manifest["shards"])
        manifest["updated"] = time.time()
        write_json_atomic(index_dir / MANIFEST, manifest)
        for raster_id in ids:
            remove_maps(index_dir, raster_id)
        remove_shards(index_dir, gone)
        with disk_write(index_dir / TILES_LAYER):
            write_tiles_gpkg(index_dir)
    return Removed(sorted(set(named.values())), manifest["tile_count"])


def _as_indexed(path: str, held: dict) -> str | None:
    """The path under which the index holds `path`: as written, or absolute with its links resolved."""
    if path in held:
        return path
    resolved = str(Path(path).expanduser().resolve())
    return resolved if resolved in held else None
