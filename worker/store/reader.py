"""Reading a committed index: records in memory, level maps joined on first use, the rest read by rows."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from rasterio.crs import CRS

from worker import edge_cells, level_maps
from wire.protocol import excerpt
from worker.errors import CorruptIndexError, InputError
from worker.store.format import MANIFEST, RECORD_DTYPE, SHARDS, holds_tokens, manifest_stamp, read_manifest
from worker.store.maps import PARTIAL_MAPS_BYTES, JoinedMap, damaged_map, left_out_rasters, open_maps
from worker.store.shard_file import ShardArray, committed_array
from worker.tiling import RasterInfo, Tile

WGS84 = CRS.from_epsg(4326)
OPEN_ATTEMPTS = 3  # opens of an index changed under each of them, before its error is said


class TileIndex:
    """A read-only view of a committed index. What a search scans everywhere (the level maps
    of edge cells, or the global tokens) is loaded into memory when first used; the rest is read
    by rows when asked for. Shard files are checked against the manifest when the index is
    opened and again on every read, so a damaged or truncated shard is a CorruptIndexError,
    never a crash (worker.store.shard_file)."""

    def __init__(self, index_dir: Path, manifest: dict, shards: list[dict], partial_maps_bytes: int | None = None,
                 earlier: "TileIndex | None" = None):
        self.dir = index_dir
        self.manifest = manifest
        self.stamp: tuple | None = None  # the manifest's file when it was read (TileIndex.open)
        self.partial_maps_bytes = PARTIAL_MAPS_BYTES if partial_maps_bytes is None else partial_maps_bytes
        try:
            self.rasters = {r["id"]: RasterInfo.from_json(r) for r in manifest["rasters"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptIndexError(f"{index_dir / MANIFEST} describes its rasters wrongly ({excerpt(str(exc))}): "
                                    "delete the index and build it again") from None
        # what a search last warned of its shortlist (worker.search._warn_once): said once, not once a commit
        self._ann_warned = earlier._ann_warned if earlier else None
        # the shortlist's damage a search read in its windows (worker.search): not asked again, after a commit either
        self._ann_damage = earlier._ann_damage if earlier else None
        given = dict(earlier.joins_to_continue) if earlier else {}  # one step: a search may be taking from it
        self._earlier_joins = {key: joined for key, joined in given.items()
                               if key[0] not in self.complete_rasters}  # a complete raster's map is read from its file
        self._joins: dict[tuple[int, int], JoinedMap] = {}
        self._shards = [s for s in shards if s["count"] > 0]
        self.has_tokens = holds_tokens(manifest)
        kept = ("tokens", "positions", "cells") if self.has_tokens else ("cells",)
        before = earlier if _opened_before(earlier, self) else None
        new = self._shards[len(before._shards) if before else 0:]
        self.records = self._read_records(before, new)
        self._arrays = {key: [*(before._arrays[key] if before else []), *(self._array(s, key) for s in new)]
                        for key in kept}
        self._offsets = np.cumsum([0] + [s["count"] for s in self._shards])
        self.dim = self._arrays["tokens"][0].shape[-1] if self._shards and self.has_tokens else 0

    def _array(self, shard: dict, key: str) -> ShardArray:
        return committed_array(self._shards_dir, shard, key)

    @cached_property
    def _shards_dir(self) -> str:
        return str(self.dir / SHARDS)

    def _read_records(self, before: "TileIndex | None", new: list[dict]) -> np.ndarray:
        """Every shard's tile records in one array: `before`'s, then those of the `new` shards,
        each read in place (concatenating 10,000 structured arrays cost more than reading them)."""
        kept = len(before.records) if before else 0
        records = np.empty(kept + sum(s["count"] for s in new), RECORD_DTYPE)
        if before:
            records[:kept] = before.records
        start = kept
        for shard in new:
            self._array(shard, "records").read_all(records[start:start + shard["count"]])
            start += shard["count"]
        return records
    def _rows_in_memory(self, key: str, dim: int) -> np.ndarray:
        """One (n, dim) array filled shard by shard, so only one shard is held twice at a time
        (concatenating whole arrays peaked at twice the array: 5.9 GB at 1M tiles)."""
        if not self._shards:
            return np.zeros((0, dim), np.float16)
        arrays = [self._array(s, key) for s in self._shards]
        rows = np.empty((len(self), *arrays[0].shape[1:]), arrays[0].dtype)
        for array, start in zip(arrays, self._offsets):
            rows[start:start + array.shape[0]] = array.read_all()
        return rows

    def require_tokens(self, what: str) -> None:
        """InputError, saying what to do, when this index holds no ViT tokens for `what`."""
        if not self.has_tokens:
            raise InputError(f"{what} needs the tiles' ViT tokens, and {self.dir} was built without them: build a new "
                             "index with tokens (`index --tokens`, or the index op's `tokens: true`); the default "
                             "search needs none")

    @cached_property
    def global_tokens(self) -> np.ndarray:
        """(n, D) fp16 global tokens (the "tokens" ranker's shortlist)."""
        self.require_tokens("the global-token shortlist")
        return self._rows_in_memory("global", self.dim or 1)

    @cached_property
    def maps(self) -> dict[tuple[int, int], level_maps.LevelMap]:
        """One map of edge cells per (raster id, scale), of the rasters a search scans: a
        complete raster's read from its file by region (worker.store.maps), the others joined
        from the tiles' cells, but for those `left_out`."""
        maps, self._joins = open_maps(self, self.complete_rasters, self.left_out, self._earlier_joins)
        self._earlier_joins = {}
        return maps

    def maps_of(self, rasters: set[int]) -> dict[tuple[int, int], level_maps.LevelMap]:
        """The level maps of `rasters` alone (complete ones: a shortlist's build), this view's
        where it has them open, else opened for these: `maps` joined a stopped run's raster's
        maps in memory (up to `partial_maps_bytes`, reading every committed tile's cells) for a
        build that then left them out."""
        if "maps" in self.__dict__:
            return {key: level for key, level in self.maps.items() if key[0] in rasters}
        others = {raster_id: 0 for raster_id in self.rasters if raster_id not in rasters}
        return open_maps(self, self.complete_rasters, others, {})[0]

    def check_map_files(self) -> None:
        """CorruptIndexError when a complete raster's level map file is damaged (shard files are
        checked when the index is opened; the maps when a search first reads them, or here, once
        a view: damage after that is found by the read that meets it)."""
        if self.__dict__.get("_maps_checked"):
            return
        if self.damaged_maps:
            raise self.damaged_maps[0]
        self._maps_checked = True

    @property
    def damaged_maps(self) -> list[CorruptIndexError]:
        """Why each complete raster's level map file that does not fit it is damaged (its header
        and size, read again each time: worker.store.maps.damaged_map)."""
        m = self.manifest
        return [wrong for r in m["rasters"] if r["complete"] and (wrong := damaged_map(self.dir, m, r))]

    @property
    def joins_to_continue(self) -> dict[tuple[int, int], JoinedMap]:
        """The maps of rasters being indexed joined in memory, for a view of the index opened after
        a commit to continue (worker.store.maps.join_map): this view's own once searched, else
        those it was given."""
        return self._joins if "maps" in self.__dict__ else self._earlier_joins

    @cached_property
    def left_out(self) -> dict[int, int]:
        """Rasters still being indexed that searches leave out until they are complete, by id:
        the bytes their maps would take joined, over `partial_maps_bytes` (worker.store.maps)."""
        return left_out_rasters(self, self.complete_rasters, self.partial_maps_bytes)

    @property
    def complete_rasters(self) -> set[int]:
        """The ids of the rasters whose every tile is committed (the others: a run under way or stopped)."""
        return {r["id"] for r in self.manifest["rasters"] if r.get("complete")}

    @classmethod
    def open(cls, index_dir: Path, partial_maps_bytes: int | None = None, earlier: "TileIndex | None" = None
             ) -> "TileIndex":
        """The committed index in `index_dir`; `partial_maps_bytes`: the memory the maps of its
        rasters still being indexed may take joined (worker.store.maps.PARTIAL_MAPS_BYTES);
        `earlier`: a view of it opened before, whose joined maps this one continues."""
        index_dir = Path(index_dir)
        for attempt in range(1, OPEN_ATTEMPTS + 1):
            stamp = manifest_stamp(index_dir)  # before reading: a commit meanwhile makes the view outdated, not newer
            manifest = read_manifest(index_dir)
            try:
                index = cls(index_dir, manifest, manifest["shards"], partial_maps_bytes, earlier)
            except CorruptIndexError:
                # a raster removed or indexed again while its shards were checked (opening 10M tiles
                # takes seconds) is no damage: opened as it is now
                if attempt == OPEN_ATTEMPTS or manifest_stamp(index_dir) == stamp:
                    raise
                continue
            index.stamp = stamp
            return index

    def held_by(self, manifest: dict) -> bool:
        """Whether `manifest`, the index's as read later, still holds all this view reads: the
        same build (`created`), every shard this view opened, first and as they were, and each of
        their rasters as it was. An indexing run's commits only add shards; a raster removed or
        indexed again takes its shards away, and its id and shard names may come back for other
        pixels."""
        if manifest.get("created") != self.manifest.get("created") or holds_tokens(manifest) != self.has_tokens:
            return False
        if self._shards != [s for s in manifest["shards"] if s["count"] > 0][:len(self._shards)]:
            return False
        rasters = {r["id"]: r for r in manifest["rasters"]}
        return all(r in rasters and RasterInfo.from_json(rasters[r]) == self.rasters[r]
                   for r in {s["raster_id"] for s in self._shards})

    def outdated(self) -> bool:
        """Whether the index on disk no longer holds what this view reads (held_by), or is gone:
        a search of the view may have failed on removed files, or read a raster's features under
        another's name."""
        if self.stamp is not None and manifest_stamp(self.dir) == self.stamp:
            return False
        try:
            return not self.held_by(read_manifest(self.dir))
        except (InputError, KeyError, TypeError, ValueError):  # gone, or unreadable as it is now
            return True

    def __len__(self) -> int:
        return len(self.records)

    def _gather(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Rows of one array, in the order asked, read shard by shard."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} outside the index's {len(self)} tiles")
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        out = None
        for s in np.unique(shard):
            picked = np.nonzero(shard == s)[0]
            values = self._arrays[key][s].read_rows(rows[picked] - self._offsets[s])
            if out is None:
                out = np.empty((len(rows), *values.shape[1:]), values.dtype)
            out[picked] = values
        return out

    def tokens_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patch tokens (len(rows), K, D) and their patch positions (len(rows), K), read
        from the shards."""
        self.require_tokens("the token re-rank")
        if not len(rows):
            return np.zeros((0, 1, self.dim), np.float16), np.zeros((0, 1), np.int16)
        return self._gather("tokens", rows), self._gather("positions", rows)

    def cells_of(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), G, G, ORIENTATIONS) uint8 stored edge cells (worker.edge_cells)."""
        if not len(rows):
            return np.zeros((0, 1, 1, edge_cells.ORIENTATIONS), np.uint8)
        return self._gather("cells", rows)

    @cached_property
    def _rows_by_map(self) -> dict[tuple[int, int], np.ndarray]:
        keys = self.records["raster_id"].astype(np.int64) * 65536 + self.records["scale"]
        order = np.lexsort((self.records["cell_row"], keys))  # by map, then first cell row (stable)
        uniq, starts = np.unique(keys[order], return_index=True)
        bounds = list(starts[1:]) + [len(order)]
        return {(int(k // 65536), int(k % 65536)): order[a:b] for k, a, b in zip(uniq, starts, bounds)}

    @property
    def map_keys(self) -> list[tuple[int, int]]:
        """The (raster id, scale) of every level map the tiles make, in order."""
        return sorted(self._rows_by_map)

    @property
    def tiles_per_raster(self) -> dict[int, int]:
        """Tiles per raster id, every scale (an open index's records never change)."""
        out: dict[int, int] = {}
        for (raster_id, _), rows in self._rows_by_map.items():
            out[raster_id] = out.get(raster_id, 0) + len(rows)
        return out

    @property
    def not_started(self) -> list[int]:
        """Rasters being indexed with no tile committed yet, by id: a search finds nothing of them."""
        tiles = self.tiles_per_raster
        return [r["id"] for r in self.manifest["rasters"] if not r["complete"] and not tiles.get(r["id"])]

    @property
    def partly_indexed(self) -> dict[int, tuple[int, int]]:
        """Rasters being indexed that a search meets in part, by id: (tiles done, committed or
        skipped, of every scale; tiles planned). Those not started and those left out are not, nor
        one whose every tile is done (its run failed writing its maps, after its last commit)."""
        tiles, left_out = self.tiles_per_raster, self.left_out
        done = {r["id"]: tiles.get(r["id"], 0) + r["tiles_skipped"] for r in self.manifest["rasters"]}
        return {r["id"]: (done[r["id"]], r["tiles_total"]) for r in self.manifest["rasters"]
                if not r["complete"] and tiles.get(r["id"]) and r["id"] not in left_out
                and done[r["id"]] < r["tiles_total"]}

    def rows_of_map(self, raster_id: int, scale: int) -> np.ndarray:
        """Index rows of the tiles of one raster at one scale, by their first cell row (so a search
        finds the tiles a window's rows meet as one band: worker.tile_windows)."""
        return self._rows_by_map.get((raster_id, scale), np.zeros(0, np.int64))

    @cached_property
    def map_boxes_wgs84(self) -> dict[tuple[int, int], tuple[float, float, float, float]]:
        """The lon/lat box (west, south, east, north) around each level map's tiles, made once a
        view: a search in an area looked at every map's tiles (12 ms a search at 1,000 rasters).
        A map across 180 degrees has its east past 180 (its tiles lie on both sides: their plain
        box went round the world, and a search of the whole world failed on it)."""
        b = self.records["bounds4326"]
        return {key: _box_round(b[rows]) for key, rows in self._rows_by_map.items()}

    def tile(self, row: int) -> Tile:
        r = self.records[row]
        return Tile(self.rasters[int(r["raster_id"])], int(r["col_off"]), int(r["row_off"]), int(r["width"]),
                    int(r["height"]), int(r["scale"]))

    def footprints_wgs84(self, rows: np.ndarray) -> list:
        """Densified WGS84 polygons of tiles (shapely), reprojected per raster in one call each."""
        from worker.geo import reproject_rings

        tiles = [self.tile(int(r)) for r in rows]
        return reproject_rings(tiles, WGS84)

    def info(self) -> dict:
        """What `info` says of the index; `damaged`: why each complete raster's damaged level map
        is so (a search meeting it fails; an `index` run joins it again)."""
        damaged = [str(wrong) for wrong in self.damaged_maps]
        sizes = {"tokens_bytes": int(sum(t.nbytes for t in self._arrays.get("tokens", []))),
                 "disk_bytes": int(sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file()))}
        return {**manifest_info(self.dir, self.manifest), "tile_count": len(self), "damaged": damaged,
                "sizes": {**sizes, "bytes_per_tile": sizes["disk_bytes"] / max(1, len(self))}}


def manifest_info(index_dir: Path, manifest: dict) -> dict:
    """What `info` says of an index by its manifest alone: also of one whose shards are damaged,
    which cannot be opened (its rasters are the ones to index again)."""
    m = manifest
    return {"index": str(index_dir), "format": m["format"], "model": m["model"], "tiling": m["tiling"],
            "tokens": holds_tokens(m), "tile_count": m.get("tile_count", 0),
            "tiles_skipped": sum(r["tiles_skipped"] for r in m["rasters"]),
            "complete": all(r["complete"] for r in m["rasters"]),
            "rasters": [{"id": r["id"], "path": r["path"], "width": r["width"], "height": r["height"],
                         "bands": r["bands"], "complete": r["complete"], "tiles_total": r["tiles_total"],
                         "tiles_skipped": r["tiles_skipped"]} for r in m["rasters"]]}


def _opened_before(earlier: TileIndex | None, view: TileIndex) -> bool:
    """Whether an `earlier` view of the same index opened the first of a new `view`'s shards,
    so that the view keeps its records and checked arrays and opens only the shards added since:
    an index being built only gains shards, and opening every one again after each commit took
    seconds at 10,000 shards. Not when the index was built again since (its `created` differs),
    lost shards, or one of the earlier view's rasters changed (dropped and indexed again, its
    shards may bear the same names)."""
    return earlier is not None and earlier.held_by(view.manifest)


def _box_round(bounds: np.ndarray) -> tuple[float, float, float, float]:
    """The lon/lat box round footprints' (n, 4) bounds: as they are, or, where that goes more
    than half round the world, with those west of Greenwich moved a world east when that is
    narrower (footprints on both sides of 180 degrees; widths alone differ by rounding)."""
    south, north = float(bounds[:, 1].min()), float(bounds[:, 3].max())
    west, east = bounds[:, 0].min(), bounds[:, 2].max()
    shift = np.where(bounds[:, 0] < 0, 360.0, 0.0)
    west_moved, east_moved = (bounds[:, 0] + shift).min(), (bounds[:, 2] + shift).max()
    if east - west > 180.0 and east_moved - west_moved < east - west:
        west, east = west_moved, east_moved
    return float(west), south, float(east), north
