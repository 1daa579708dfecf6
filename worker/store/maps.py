"""Level maps on disk: each complete raster's joined cells per scale, read by region.

The maps are derived from the shards (worker.level_maps joins the tiles' cells), so they can
always be made again. Keeping them as files lets a search read only the neighbourhoods it
scores (the ANN shortlist's windows, the refine's spots) instead of holding every map of a
mosaic in memory: 4 KB per tile, 40 GB at 10M tiles. They are read with plain reads whose size
is checked, like the shards (worker.store.shard_file), never memory-mapped: a file that shrinks
under a running worker is a CorruptIndexError, not a crash. A raster still being indexed has no
map file yet: its maps are joined in memory from its committed shards, and after each commit the
tiles it added are painted onto a copy of the last join (join_map); so only while they fit in
PARTIAL_MAPS_BYTES (a 0.3 m state as one VRT would need tens of GB). A larger one is left out of
searches until it is complete, and the search says so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker import level_maps
from worker.edge_cells import CELL, ORIENTATIONS
from worker.level_maps import LevelMap
from worker.store.format import allocated_memmap, disk_write, remove_temporaries, replace_durably, temporary_path
from worker.store.shard_file import DamagedFile, ShardArray
from worker.tiling import RasterInfo

MAPS = "maps"


def map_file(index_dir: Path, raster_id: int, scale: int) -> Path:
    return Path(index_dir) / MAPS / f"r{raster_id:05d}-s{scale}.npy"


MAP_NAME = re.compile(r"r(\d+)-s\d+\.npy")  # map_file's names: the raster id
MAP_GLOB = "r*-s*.npy"  # the same, as a glob


def _maps_by_raster(index_dir: Path) -> list[tuple[int, Path]]:
    """The index's map files, each with its raster's id."""
    folder = Path(index_dir) / MAPS
    named = [(MAP_NAME.fullmatch(name), folder / name) for name in (os.listdir(folder) if folder.is_dir() else [])]
    return [(int(match.group(1)), path) for match, path in named if match]


# memory the joined maps of rasters still being indexed may take in a search, all of them together:
# their cells, each cell's distance kept for the next commit's join, and either the committed tiles' cells
# (a join afresh reads them) or a copy of the map being continued (about a 30,000 px square raster at the
# default tiling; left_out_rasters). `serve --max-partial-maps-mb` sets it.
PARTIAL_MAPS_BYTES = 512 * 1024 * 1024
JOINED_BYTES_PER_CELL = ORIENTATIONS + 4  # a cell, and its float32 distance from its tile's centre

BAND_CELLS = 512  # map rows joined at a time: a band of a wide mosaic and its tiles' cells, never the whole map


def write_joined_maps(index, band_cells: int = BAND_CELLS) -> None:
    """The level maps of an open index's tiles (worker.store.reader.TileIndex; the writer gives
    a view of one raster's shards) joined band by band straight into their files, each under a
    temporary name renamed into place. Joined whole in memory, a 100,000 px square mosaic took
    about 7 GB (its tiles' cells read at once, copied, and the map); a band holds the cells of the
    tiles that meet it. The same cells as join_map, bit for bit."""
    records = index.records
    tile, drawing = index.manifest["tiling"]["tile"], index.manifest["drawing_size"]
    for raster_id, scale in level_maps.map_keys(records):
        rows = np.nonzero((records["raster_id"] == raster_id) & (records["scale"] == scale))[0]
        lp = level_maps.level_pixel(tile, scale, drawing)
        shape = level_maps.map_shape(index.rasters[raster_id], lp)
        first, count = records["cell_row"][rows], records["cell_rows"][rows]
        dest = map_file(index.dir, raster_id, scale)
        tmp = temporary_path(dest)
        with disk_write(dest):
            dest.parent.mkdir(exist_ok=True)
            try:
                out = allocated_memmap(tmp, np.uint8, (*shape, ORIENTATIONS))
                for top in range(0, shape[0], band_cells):
                    bottom = min(top + band_cells, shape[0])
                    meeting = rows[(first < bottom) & (first + count > top)]
                    band = np.zeros((bottom - top, *shape[1:], ORIENTATIONS), np.uint8)
                    level_maps.paint(band, top, records[meeting], index.cells_of(meeting), lp, drawing)
                    out[top:bottom] = band
                out.flush()
                del out
                with open(tmp, "rb") as written:
                    os.fsync(written.fileno())
                replace_durably(tmp, dest)
            finally:
                if tmp.is_file():
                    tmp.unlink()


def remove_unfinished_maps(index_dir: Path) -> None:
    """The maps a killed writer left under a temporary name (a map is about 4 KB a tile: GBs
    of a large raster's, a disk's worth when it was full); only a run holding the index's lock,
    so that no other writer's map is underway."""
    remove_temporaries(Path(index_dir) / MAPS, MAP_GLOB)


def remove_maps_of_no_raster(index_dir: Path, raster_ids: set[int]) -> None:
    """The maps of rasters the index no longer holds (not among `raster_ids`): a removal killed
    after its commit left them for good, GBs of a large raster's (probe). Only a run holding the
    index's lock: a raster is entered in the manifest before its map is written."""
    for raster_id, path in _maps_by_raster(index_dir):
        if raster_id not in raster_ids:
            path.unlink(missing_ok=True)


def remove_maps(index_dir: Path, raster_id: int) -> None:
    """A raster's map files (the unfinished ones a killed writer left: remove_unfinished_maps,
    at the start of every run)."""
    for held, path in _maps_by_raster(index_dir):
        if held == raster_id:
            path.unlink()


class MapFile:
    """A level map's cells on disk, (rows, cols, ORIENTATIONS) uint8, read by row bands and
    blocks (`cells[r0:r1]`, `cells[r0:r1, c0:c1]`) or whole (`np.asarray(cells)`)."""

    def __init__(self, path: Path, rows: int):
        self.array = ShardArray(path, rows)
        self.shape = self.array.shape
        self.dtype = self.array.dtype
        self.nbytes = self.array.nbytes

    def __array__(self, dtype=None, copy=None):
        whole = self.array.read_all()
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        """Cells of a block: one read of each row's columns (a neighbourhood of a wide map
        costs its own bytes, not whole rows)."""
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        r0, r1, _ = rows.indices(self.shape[0])
        c0, c1, _ = cols.indices(self.shape[1])
        r1, c1 = max(r0, r1), max(c0, c1)
        if c0 == 0 and c1 == self.shape[1]:
            return self.array.read_rows(np.arange(r0, r1))
        cell = int(np.prod(self.shape[2:])) * self.dtype.itemsize
        out = np.empty((r1 - r0, c1 - c0, *self.shape[2:]), self.dtype)
        flat = out.reshape(r1 - r0, -1).view(np.uint8)
        length = (c1 - c0) * cell
        fd = self.array.open_checked()
        try:
            for i, r in enumerate(range(r0, r1)):
                data = os.pread(fd, length, self.array.offset + r * self.array.row_bytes + c0 * cell)
                if len(data) != length:
                    raise self.array.corrupt(f"a read of {length} bytes gave {len(data)} (truncated?)")
                flat[i] = np.frombuffer(data, np.uint8)
        finally:
            os.close(fd)
        return out


def region(cells, r0: int, c0: int, span: int, width: int | None = None) -> np.ndarray:
    """A block of `span` rows and `width` (default `span`) columns of a level map's cells from
    (r0, c0), blank where it lies beyond the map; `cells` is an array or a MapFile."""
    width = span if width is None else width
    rows, cols = cells.shape[:2]
    out = np.zeros((span, width, cells.shape[2]), np.uint8)
    a, b = max(r0, 0), min(r0 + span, rows)
    c, d = max(c0, 0), min(c0 + width, cols)
    if a < b and c < d:
        out[a - r0:b - r0, c - c0:d - c0] = cells[a:b, c:d]
    return out


REGION_GROUP = 4  # squares of one map whose corners lie in the same cell of this many spans may be read as one block


def crowds(corners: list[tuple[int, int]], span: int) -> list[tuple[list[int], tuple[int, int, int, int]]]:
    """Squares of `span` cells at top-left `corners` (row, col) of one map grouped for reading:
    (members, (top, left, height, width) of the block they lie in). A search's squares crowd
    around its best places and overlap, so those near each other are one block, where that
    block is no larger than the squares it covers; every other square is a group of its own."""
    near: dict[tuple[int, int], list[int]] = {}
    for i, (r, c) in enumerate(corners):
        near.setdefault((r // (REGION_GROUP * span), c // (REGION_GROUP * span)), []).append(i)
    out = []
    for members in near.values():
        top, left = min(corners[i][0] for i in members), min(corners[i][1] for i in members)
        height = max(corners[i][0] for i in members) - top + span
        width = max(corners[i][1] for i in members) - left + span
        if len(members) > 1 and height * width <= len(members) * span * span:
            out.append((members, (top, left, height, width)))
        else:
            out.extend(([i], (corners[i][0], corners[i][1], span, span)) for i in members)
    return out


def regions(cells, corners: list[tuple[int, int]], span: int) -> np.ndarray:
    """Squares of `span` cells at each top-left corner (row, col) of one map (region, each),
    crowded ones read as one block (crowds): (n, span, span, channels)."""
    out = np.empty((len(corners), span, span, cells.shape[2]), np.uint8)
    for members, (top, left, height, width) in crowds(corners, span):
        block = region(cells, top, left, height, width)
        for i in members:
            r, c = corners[i][0] - top, corners[i][1] - left
            out[i] = block[r:r + span, c:c + span]
    return out


def on_disk(index, complete: set[int], raster_id: int, scale: int) -> bool:
    """Whether a level map is read from its file: its raster is complete and the file is there
    (an index written before maps were kept has none)."""
    return raster_id in complete and map_file(index.dir, raster_id, scale).is_file()


def map_on_disk(index, raster_id: int, scale: int) -> LevelMap:
    """A complete raster's level map, read from its file by region; CorruptIndexError when the
    file's header or size does not fit the raster."""
    raster = index.rasters[raster_id]
    lp = level_maps.level_pixel(index.manifest["tiling"]["tile"], scale, index.manifest["drawing_size"])
    return LevelMap(raster, raster_id, scale, lp, _map_cells(map_file(index.dir, raster_id, scale), raster, lp))


def _map_cells(path: Path, raster, lp: float) -> MapFile:
    rows, cols = level_maps.map_shape(raster, lp)
    cells = MapFile(path, rows)
    if cells.shape[1:] != (cols, ORIENTATIONS) or cells.dtype != np.uint8:
        raise cells.array.corrupt(f"it holds a map of {cells.shape} {cells.dtype}")
    return cells


def damaged_map(index_dir: Path, manifest: dict, entry: dict) -> DamagedFile | None:
    """What is wrong with the first of a raster's map files (its manifest `entry`) that does not
    fit it, from the manifest alone (nothing of its tiles read); None when all fit. A missing
    file is no damage: the map is joined from the tiles instead (an index written before maps
    were kept)."""
    raster = RasterInfo.from_json(entry)
    for scale in manifest["tiling"]["scales"]:
        path = map_file(index_dir, entry["id"], scale)
        if path.is_file():
            try:
                _map_cells(path, raster, level_maps.level_pixel(manifest["tiling"]["tile"], scale,
                                                                manifest["drawing_size"]))
            except DamagedFile as exc:
                return exc
    return None


def open_maps(index, complete: set[int], left_out: dict[int, int], earlier: dict[tuple[int, int], "JoinedMap"]
              ) -> tuple[dict[tuple[int, int], LevelMap], dict[tuple[int, int], "JoinedMap"]]:
    """Every level map of an open index (worker.store.reader.TileIndex) but those of the rasters
    `left_out` (left_out_rasters): read from its file where the raster is complete and the file
    is there, joined in memory from the shards otherwise (a raster being indexed, an index
    written before maps were kept), continuing the joins of an `earlier` view of the index
    (each let go once continued). Also the joined maps of rasters being indexed, for the view
    after the next commit to continue."""
    out: dict[tuple[int, int], LevelMap] = {}
    joined: dict[tuple[int, int], JoinedMap] = {}
    for raster_id, scale in index.map_keys:
        if raster_id in left_out:
            continue
        if on_disk(index, complete, raster_id, scale):
            out[(raster_id, scale)] = map_on_disk(index, raster_id, scale)
        else:
            made = join_map(index, (raster_id, scale), earlier.pop((raster_id, scale), None))
            out[(raster_id, scale)] = made.level
            if raster_id not in complete:  # no commit will add to a complete raster's map
                joined[(raster_id, scale)] = made
    return out, joined


def left_out_rasters(index, complete: set[int], partial_bytes: int = PARTIAL_MAPS_BYTES) -> dict[int, int]:
    """The rasters being indexed whose maps do not fit in `partial_bytes` joined, with those
    before them (by id), and the bytes each would take: from the records alone, nothing joined.
    Its maps are joined one at a time: afresh, one map's committed tiles' cells are read beside
    the maps; continued, a copy of one map is held beside them, with the cells of the tiles a
    commit added (and, added out of tile order, of those reaching into their rows). The first
    grows as tiles are committed, so a raster searched early in its run may be left out later."""
    tile, drawing = index.manifest["tiling"]["tile"], index.manifest["drawing_size"]
    tile_cells = (drawing // CELL) ** 2 * ORIENTATIONS  # each tile's cells, read for the join
    maps: dict[int, list[int]] = {}
    tiles: dict[int, list[int]] = {}
    for raster_id, scale in index.map_keys:
        if on_disk(index, complete, raster_id, scale):
            continue
        rows, cols = level_maps.map_shape(index.rasters[raster_id], level_maps.level_pixel(tile, scale, drawing))
        maps.setdefault(raster_id, []).append(rows * cols * JOINED_BYTES_PER_CELL)
        tiles.setdefault(raster_id, []).append(len(index.rows_of_map(raster_id, scale)) * tile_cells)
    to_join = {r: sum(m) + max(max(tiles[r]), max(m)) for r, m in maps.items()}  # one map joined at a time
    left_out, taken = {}, 0
    for raster_id, size in sorted(to_join.items()):
        if raster_id not in complete and taken + size > partial_bytes:
            left_out[raster_id] = size
        else:  # complete rasters of an index written before maps were kept are always joined
            taken += size
    return left_out


@dataclass
class JoinedMap:
    """A level map joined in memory from its tiles' cells, with what a join after the next
    commit needs to paint only the tiles it adds: each cell's distance from its tile's centre,
    and the index rows painted with their records, in record order."""

    level: LevelMap
    nearest: np.ndarray
    rows: np.ndarray
    records: np.ndarray
    index_created: float | None  # the index's manifest's: one deleted and built again is another
    continued: int = 0  # tiles taken over from an earlier join of the map (0: joined afresh)

    def continued_by(self, index, raster, rows: np.ndarray, records: np.ndarray) -> bool:
        """Whether a later view of the map holds the tiles painted here first, unchanged."""
        n = len(self.rows)
        return (index.manifest.get("created") == self.index_created and self.level.raster == raster
                and n <= len(rows) and np.array_equal(rows[:n], self.rows)
                and records[:n].tobytes() == self.records.tobytes())


def join_map(index, key: tuple[int, int], earlier: JoinedMap | None = None) -> JoinedMap:
    """One level map of an open index joined in memory from its tiles' cells. Given the map as
    an earlier view of the index joined it (before a commit added tiles), a copy of that join
    with only the added tiles painted on (and, where they come before painted ones in tile
    order, the tiles reaching into their rows painted again): the same cells. Joining
    every tile again after each commit took 1.2 s at 24,000 tiles of a 29,000 px raster on a
    2-core CPU, and grows with them; continuing it, 80 ms (most of it the copy)."""
    raster_id, scale = key
    tile, drawing = index.manifest["tiling"]["tile"], index.manifest["drawing_size"]
    raster, lp = index.rasters[raster_id], level_maps.level_pixel(tile, scale, drawing)
    rows = np.sort(index.rows_of_map(raster_id, scale))  # in record order: a later join continues them
    records = index.records[rows]
    if earlier is not None and earlier.continued_by(index, raster, rows, records):
        cells, nearest, start = earlier.level.cells.copy(), earlier.nearest.copy(), len(earlier.rows)
    else:
        cells = np.zeros((*level_maps.map_shape(raster, lp), ORIENTATIONS), np.uint8)
        nearest, start = np.full(cells.shape[:2], np.inf, np.float32), 0
    added = records[start:]
    if 0 < start < len(records) and level_maps.tile_order(added).min() < level_maps.tile_order(records[:start]).max():
        _paint_again(index, cells, nearest, rows, records, added, lp, drawing)
    else:
        level_maps.paint(cells, 0, added, index.cells_of(rows[start:]), lp, drawing, nearest)
    return JoinedMap(LevelMap(raster, raster_id, scale, lp, cells), nearest, rows, records,
                     index.manifest.get("created"), start)


def _paint_again(index, cells: np.ndarray, nearest: np.ndarray, rows: np.ndarray, records: np.ndarray,
                 added: np.ndarray, lp: float, drawing: int) -> None:
    """Paint `added`, tiles that come before some already painted in the raster's tile order (a
    cluster commits its chunks as they finish), into a continued join: a cell two tiles tie for
    goes to the first in tile order (level_maps.paint), which painting on top cannot tell. Each
    run of map rows the added tiles cover is painted afresh, from every tile reaching into it;
    cells outside them are no added tile's. A search after each such commit joined the whole map
    afresh (170 ms for a map of 4,356 tiles, against 19 ms so)."""
    r0, nr = records["cell_row"].astype(np.int64), records["cell_rows"].astype(np.int64)
    tops = added["cell_row"].astype(np.int64)
    runs: list[list[int]] = []
    for top, bottom in sorted(zip(tops.tolist(), (tops + added["cell_rows"]).tolist())):
        if runs and top <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], bottom)
        else:
            runs.append([top, bottom])
    for top, bottom in runs:
        top, bottom = max(0, top), min(bottom, cells.shape[0])
        reaching = np.flatnonzero((r0 < bottom) & (r0 + nr > top))
        cells[top:bottom] = 0
        nearest[top:bottom] = np.inf
        level_maps.paint(cells[top:bottom], top, records[reaching], index.cells_of(rows[reaching]), lp, drawing,
                         nearest[top:bottom])
