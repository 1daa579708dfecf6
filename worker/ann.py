"""A compressed approximate shortlist for mosaics too large to scan whole (FAISS).

Every level map is cut into windows of one tile (224 level px) at half-tile steps; each
window's coarse HOG (the coarse scan's descriptor, worker.edge_cells) is compressed with an OPQ rotation and
product quantisation in an inverted-file index (FAISS OPQ + IVF-PQ, memory-mapped from disk). A query
asks with its upright and turned templates, each also shifted by 64 px in x, y or both, so that
some shift lies within 32 px of any window's place relative to the grid, plus the small
template centred in a tile's frame. PQ codes rank the candidates only roughly, so FAISS is
asked for many (ann_neighbours a query vector) and they are re-ranked in two stages, each from
codes read from disk by row (CodeWriter, Codes): all of them by their vectors after the
rotation (256 dimensions, 8 bits a dimension), then the best FULL_RERANK of those by their full
vectors (1296 dimensions at 16 bits). PQ's own order of 256 a query vector held 0.78 of the
exact best 200 windows (450k synthetic windows); the rotated codes alone hold 0.92 at 1M tiles,
since the rotation to 256 dimensions loses some of the ranking; with the full codes see CODES.
The windows found
are the neighbourhoods the exact dense scan then searches (worker.placement_scan), so the
ranking stays exact on the candidates.

Files in INDEX_DIR/ann/: index.faiss, windows.npy (per vector: raster id, scale, stored-cell
row and column of the window's top-left), refine.npy (per vector: its rotated vector at 8 bits)
with refine_range.npy (each dimension's range of those codes), refine_full.npy (per vector: the
vector itself at 16 bits), ann.json (what was built, from which rasters, each file's size;
written last). A shortlist is written whole into a folder of its own and swapped in for the old
one (_swap_in): a crash at any point leaves the old shortlist or, for the moment between two
renames, none (the next build or update puts the old one back), never a mix of two.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import shutil
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wire.protocol import excerpt
from worker import edge_cells
from worker.edge_cells import CELL, COARSE
from worker.cancellation import current_stop
from worker.errors import CorruptIndexError, InputError, errno_named_in
from worker.interrupts import StoppedOnceDone, stops_held
from worker.placement_scan import COARSE_STEP, WINDOW_CELLS
from worker.search_area import KEY_SPAN
from worker.store import TileIndex, write_json_atomic
from worker.store.format import allocated_memmap, disk_write, index_lock, replace_durably
from worker.thread_pools import shared_pool, wait_all

log = logging.getLogger(__name__)

ANN_DIR = "ann"
WINDOW = WINDOW_CELLS * CELL  # level px: one tile
WINDOW_DIM = COARSE.dim * COARSE.blocks_per_side(WINDOW) ** 2  # a window vector's length
STRIDE_CELLS = WINDOW_CELLS // 2  # windows every half tile (112 level px)
SHIFT_HOG_CELLS = 2  # queries also shifted by 64 level px: any window lies within 32 px of a query's grid window
AUTO_MIN_TILES = 50_000  # from here on an index gets an ANN shortlist, and a search asks it first

# 64 bytes a window: an OPQ rotation down to 256 dimensions, then product quantisation; an HNSW
# graph finds the inverted lists fast. Not PCA: FAISS's PCA subtracts the mean, which changes a
# ranking by inner product (measured on 100k windows: 10-recall@200 0.46 with PCA256, 0.98 with
# OPQ64_256, 0.995 uncompressed).
DEFAULT_FACTORY = "OPQ64_256,IVF{nlist}_HNSW32,PQ64"  # from SMALL_VECTORS up to LARGE_VECTORS windows
SMALL_FACTORY = "IVF{nlist},Flat"  # under SMALL_VECTORS windows compression is not worth its loss
SMALL_VECTORS = 50_000
# 128 bytes a window from LARGE_VECTORS windows (about 2.2M tiles) on. Among 22.5M windows (10M
# tiles) PQ64's order lost the sketch's best windows before any re-rank could see them: FAISS's
# candidates held 0.872 of the exact best 200, PQ128's 0.965; re-ranked, 0.868 -> 0.941, and
# 0.955 -> 0.995 of the exact best 10 (lab.ann_tuning, docs/benchmarks/ann_tuning.md). At 2.25M
# windows (1M tiles) it gained little (0.962-0.971 -> 0.975) for about 70 ms more a query, so smaller
# indexes keep PQ64; the threshold lies between the two measured sizes. A shortlist keeps the
# codes it was built with when rasters are added; `build-ann` rebuilds it with these.
LARGE_FACTORY = "OPQ128_256,IVF{nlist}_HNSW32,PQ128"
LARGE_VECTORS = 5_000_000
# Windows the rotation, the lists and the quantiser are trained on: FAISS's k-means asks for at
# least POINTS_PER_LIST a list (train_size), never fewer than TRAIN_MIN nor more than TRAIN_MAX
# (3.9 GB of vectors while training; it caps the lists at TRAIN_MAX // POINTS_PER_LIST). At 10M
# tiles 100,000 windows trained 18,973 lists before: about 5 a list.
TRAIN_MIN = 100_000
TRAIN_MAX = 750_000
POINTS_PER_LIST = 39
# Inverted lists a query visits, and how many list heads the HNSW quantiser explores to find
# them (its default, 16, is below NPROBE). Measured on 450k synthetic windows, 512 asked a query
# vector and re-ranked by the full vectors: recall of the exact 200 0.94 at 32 lists, 0.97 at
# 64, for 8 ms more (0.95 re-ranked by the 8-bit codes). At 1M tiles (2.25M windows, 6000
# lists), re-ranked by the 8-bit codes: 0.86 at 32, 0.89 at 64, 0.90 at 128, 0.91 at 256 lists
# (512 asked), 0.92 at 128 lists with 1024 asked; the FAISS candidates then hold 0.98 of the
# exact 200, and the re-rank codes lose the rest (0.94 with the rotated vectors unquantised,
# 0.98 with the full vectors, which would take 1296 bytes a window instead of 256).
NPROBE = 128
QUANTISER_EF = 2 * NPROBE
ADD_BATCH = 100_000
# The re-rank codes, each file's name and what a dimension is stored as: the rotated vectors for
# all of FAISS's candidates, at 8 bits over each dimension's range, then the full vectors for the
# best FULL_RERANK of those (code_transforms), at 16 bits. At 1M tiles (lab.ann_tuning, 20
# sketches) the re-ranked best 200 held 0.962 of the exact best 200 with full codes of 8 bits
# (0.923 by the rotated codes alone; FAISS's candidates 0.979), the same with the best 512, 1024
# or 2048 re-ranked, 0.960 with 256. The best 200 of millions of windows are near ties, which 8
# bits a dimension cannot order: ranking all of 450k synthetic windows by codes of their full
# vectors kept 0.990 of the exact best 200 at 8 bits, 0.9995 at 16 (float16; 0.993 at 8 bits
# over each vector's own range, 0.988 over square-root steps; docs/benchmarks/ann_tuning.md).
# 16 bits cost 2592 bytes a window on disk (5.8 KB a tile), read for FULL_RERANK rows a query.
CODES = {"refine": np.uint8, "refine_full": np.float16}
# the codes of 8 bits over each dimension's range (NAME_range.npy); the others are the values themselves
RANGED = tuple(name for name, dtype in CODES.items() if dtype == np.uint8)
# A search's rows are read by READ_THREADS threads at once, each a run of them in file order, so
# that from a cold page cache (the first searches after a restart; an index larger than memory)
# the disk has many reads to serve at once instead of one page fault at a time (RowFile.rows).
READ_THREADS = 8
ROWS_A_RELEASE = 256  # rows a thread reads before their pages are let go (RowFile.rows)
# Rows asked closer than this on average (bytes) are read with the kernel's read-around, not as
# random pages (RowFile.rows): nearly every page between them is read anyway, and read-around
# asks for them in large reads. 15,000 rows of the 36 MB windows.npy of 1M tiles took 19 ms
# from a cold cache so and 128 ms as random pages; 512 rows took 24 ms so and 9 as random pages.
# It applies to the re-rank codes too, of indexes under about 200k tiles: 15,000 rows of the
# 57 MB rotated codes of 100k tiles took 41-80 ms so, 127-155 as random pages (cold, scratch).
DENSE_GAP = 8192
FAULT_AROUND = 64 * 1024  # the most the kernel maps around a faulted page (its default fault_around_bytes)
FULL_RERANK = 512
FORMAT = 4  # 2: the rotated re-rank codes; 3: and the full ones at 8 bits; 4: at 16. Another is rebuilt by `update`
# the files a shortlist maps or reads: sizes recorded in ann.json, checked on opening
MAPPED_FILES = ("index.faiss", "windows.npy", *(f"{name}.npy" for name in CODES),
                *(f"{name}_range.npy" for name in RANGED))


GROWTH_RETRAIN = 4  # windows over those trained for, as a multiple, that train a shortlist again (outgrown)
MIN_WINDOWS = 256  # fewer cannot train even a small IVF, and the exact scan of so few is quick


class TooFewWindows(InputError):
    """An index holds too few windows for a shortlist."""


class ShortlistStopped(InputError):
    """A shortlist's build or update stopped by its job (_windows_of); the old one, if any, stays."""


@dataclass(frozen=True)
class AnnInfo:
    vectors: int
    rasters: list[int]
    factory: str
    build_s: float
    bytes_on_disk: int

    def to_json(self) -> dict:
        return {"vectors": self.vectors, "rasters": self.rasters, "factory": self.factory, "build_s": self.build_s,
                "bytes_on_disk": self.bytes_on_disk}


def window_vectors(cells: np.ndarray, device: torch.device | str = "cpu", batch_rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Unit coarse HOG descriptors (n, COARSE dim) of a level map's grid windows and their
    top-left stored cells (n, 2); blank windows (nothing drawn) are left out. Read in bands of
    rows, so a map kept on disk (worker.store.maps) is never held whole."""
    height, width = cells.shape[:2]
    side = WINDOW_CELLS
    vectors, origins = [], []
    starts = list(grid_starts(height))
    band_windows = max(1, batch_rows // STRIDE_CELLS)
    for b in range(0, len(starts), band_windows):
        r0 = starts[b]
        rows = starts[b:b + band_windows]
        band = edge_cells.dequantise(cells[r0:rows[-1] + side], device)
        blocks = edge_cells.block_map(band, COARSE, step=COARSE_STEP)
        gap = COARSE.span // COARSE_STEP
        n = COARSE.blocks_per_side(WINDOW)
        for r in rows:
            for c in grid_starts(width):
                i, j = (r - r0) // COARSE_STEP, c // COARSE_STEP
                window = blocks[0, :, i:i + (n - 1) * gap + 1:gap, j:j + (n - 1) * gap + 1:gap]
                if window.shape[1:] != (n, n):
                    continue
                vectors.append(window.permute(1, 2, 0).reshape(-1))
                origins.append((r, c))
    if not vectors:
        return np.zeros((0, WINDOW_DIM), np.float32), np.zeros((0, 2), np.int32)
    stacked = torch.stack(vectors)
    norms = stacked.norm(dim=1)
    keep = norms > 0
    unit = (stacked[keep] / norms[keep, None]).cpu().numpy().astype(np.float32)
    return unit, np.asarray(origins, np.int32)[keep.cpu().numpy()]


def query_vectors(coarse_templates: dict[int, torch.Tensor]) -> np.ndarray:
    """The ANN queries of a sketch: each upright or turned template of a tile's size, shifted by
    0 or a quarter tile in x and y, each smaller template centred in a tile's frame, and the
    middle of each larger one."""
    out = []
    for size, templates in coarse_templates.items():
        n = COARSE.blocks_per_side(WINDOW)
        for t in templates.cpu():  # (m, m, dim) blocks on a grid of one HOG cell (4 stored cells)
            m = t.shape[0]
            grid = torch.zeros(n, n, t.shape[2])
            if size == WINDOW:
                for dr in (0, SHIFT_HOG_CELLS):
                    for dc in (0, SHIFT_HOG_CELLS):
                        shifted = torch.zeros_like(grid)
                        shifted[dr:, dc:] = t[:n - dr, :n - dc]
                        out.append(shifted.flatten())
            elif m < n:
                off = (n - m) // 2
                grid[off:off + m, off:off + m] = t
                out.append(grid.flatten())
            else:  # a larger template: its middle, a window's size
                off = (m - n) // 2
                out.append(t[off:off + n, off:off + n].flatten())
    q = torch.stack(out)
    return F.normalize(q, dim=1).numpy().astype(np.float32)


def ann_dir(index_dir: Path) -> Path:
    return Path(index_dir) / ANN_DIR


def big_enough(tiles: int) -> bool:
    """Whether `tiles` tiles are enough for the ANN shortlist by default: built when an index
    holding them is complete, asked first by a search over them."""
    return tiles >= AUTO_MIN_TILES


def nlist_for(n: int) -> int:
    """Inverted lists for n windows: about 4 sqrt(n), as FAISS's guidelines suggest, with
    POINTS_PER_LIST training windows for each (so at most TRAIN_MAX // POINTS_PER_LIST)."""
    return int(max(4, min(4 * np.sqrt(n), n // POINTS_PER_LIST, TRAIN_MAX // POINTS_PER_LIST)))


def train_size(n: int) -> int:
    """Windows to train on for an index of n: POINTS_PER_LIST a list, within TRAIN_MIN..TRAIN_MAX."""
    return int(min(n, max(TRAIN_MIN, POINTS_PER_LIST * nlist_for(n))))


def factory_for(n: int, factory: str | None = None) -> str:
    """The FAISS factory string for n windows (`factory` instead, when given), lists filled in."""
    if factory is None:
        factory = SMALL_FACTORY if n < SMALL_VECTORS else DEFAULT_FACTORY if n < LARGE_VECTORS else LARGE_FACTORY
    return factory.format(nlist=nlist_for(n))


def _windows_of(maps: dict):
    """(raster id, scale, unit vectors, top-left cells) of each of `maps` (TileIndex.maps_of),
    one map at a time. Between maps, ShortlistStopped once the stop check in force
    says so (worker.cancellation.stop_when: a job cancelled, or its worker stopping): a build of
    a 10M-tile index's shortlist takes minutes, and its job went on unstoppable to the end."""
    for (raster_id, scale), level in sorted(maps.items()):
        should_stop = current_stop()
        if should_stop is not None and should_stop():
            raise ShortlistStopped("the shortlist was stopped before it was done (its job cancelled, or the worker "
                                   "stopping): the next index run, removal or build-ann builds it; searches scan "
                                   "exactly meanwhile")
        vectors, origins = window_vectors(level.cells)
        yield raster_id, scale, vectors, origins


def build(index: TileIndex, factory: str | None = None, seed: int = 0) -> AnnInfo:
    """Build (or rebuild) the ANN shortlist of every level map of a committed index. Two passes
    over the maps (count and sample, then add), so no more than a map's windows and the training
    sample are ever in memory. Holds the index's lock: not beside an indexing run or another build."""
    with index_lock(index.dir):
        _sweep(index.dir)
        return _rebuild(index, factory, seed) if ann_dir(index.dir).exists() else _build(index, factory, seed)


def _build(index: TileIndex, factory: str | None = None, seed: int = 0) -> AnnInfo:
    import faiss

    began = time.perf_counter()
    rasters = {int(r) for r in covered(index)}
    maps = index.maps_of(rasters)
    n, sample = _count_and_sample(maps, np.random.default_rng(seed))
    if n < MIN_WINDOWS:
        unfinished = " (rasters still being indexed are not counted until they are complete)" \
            if rasters != set(index.tiles_per_raster) else ""
        raise TooFewWindows(f"{n} windows are too few for an ANN shortlist{unfinished}; the exact scan is the right "
                            "tool")
    factory = factory_for(n, factory)
    ann = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ann.train(sample)
    with staging(index.dir) as folder:
        codes = code_writers(folder, ann, sample, n)
        del sample
        rows = []
        for raster_id, scale, vectors, origins in _windows_of(maps):
            for start in range(0, len(vectors), ADD_BATCH):
                ann.add(vectors[start:start + ADD_BATCH])
                for writer in codes:
                    writer.add(vectors[start:start + ADD_BATCH])
            rows.append(_window_rows(raster_id, scale, origins))
        return _write(index, ann, rows, codes, factory, began, folder, trained_for=n)


def _count_and_sample(maps: dict, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """How many windows `maps` have, and a uniform sample of train_size of them
    (the windows with the smallest random keys: one pass, whatever the total; sized by the grid
    windows of the maps' shapes, of which blank ones are left out later)."""
    keep_at_most = train_size(sum(grid_windows(level.cells.shape[:2]) for level in maps.values()))
    n, sample, keys = 0, None, np.zeros(0)
    for _, _, vectors, _ in _windows_of(maps):
        n += len(vectors)
        drawn = rng.random(len(vectors))
        sample = vectors if sample is None else np.concatenate([sample, vectors])
        keys = np.concatenate([keys, drawn])
        if len(keys) > keep_at_most:
            keep = np.argpartition(keys, keep_at_most)[:keep_at_most]
            sample, keys = sample[keep], keys[keep]
    return n, sample if sample is not None else np.zeros((0, 1), np.float32)


def grid_starts(length: int) -> range:
    """Where the grid windows of a level map start along a side of `length` stored cells."""
    return range(0, max(1, length - WINDOW_CELLS + 1), STRIDE_CELLS)


def grid_windows(shape: tuple[int, int]) -> int:
    """Grid windows of a level map of `shape` stored cells (window_vectors walks these)."""
    return int(np.prod([len(grid_starts(side)) for side in shape]))


def _window_rows(raster_id: int, scale: int, origins: np.ndarray) -> np.ndarray:
    """windows.npy's rows for one map's windows: raster id, scale, top-left stored cell."""
    return np.column_stack([np.full(len(origins), raster_id), np.full(len(origins), scale), origins]).astype(np.int32)


def rotate(ann, vectors: np.ndarray) -> np.ndarray:
    """Vectors as the index's quantiser sees them: through its pre-transforms (OPQ), if any."""
    import faiss

    ann = faiss.downcast_index(ann)
    if isinstance(ann, faiss.IndexPreTransform):
        for i in range(ann.chain.size()):
            vectors = faiss.downcast_VectorTransform(ann.chain.at(i)).apply_py(np.ascontiguousarray(vectors))
    return vectors


def code_transforms(ann) -> dict[str, object]:
    """What each re-rank code file holds: the window vectors as the index's quantiser sees
    them (rotated, 256 dimensions), and the vectors themselves (1296 dimensions)."""
    return dict(zip(CODES, (lambda vectors: rotate(ann, vectors), lambda vectors: vectors)))


class CodeWriter:
    """Writes NAME.npy as windows are added: each window's vector (through `transform`) in the
    file's dtype (CODES), into a file of the final size in a new shortlist's folder (staging). 8-bit codes span
    the range their training sample spans (values beyond it clipped); NAME_range.npy holds each
    dimension's low end and step. Float16 codes are the values themselves (no range file)."""

    def __init__(self, folder: Path, name: str, transform, code_range: np.ndarray | None, total: int, dims: int):
        self.name, self.transform, self.range, self.folder = name, transform, code_range, folder
        with disk_write(folder / f"{name}.npy"):
            self.codes = allocated_memmap(folder / f"{name}.npy", CODES[name], (total, dims))
        self.filled = 0

    @classmethod
    def trained(cls, folder: Path, name: str, transform, sample: np.ndarray, total: int) -> "CodeWriter":
        """A writer of `total` codes; 8-bit ones over the range of the transformed training sample."""
        seen = transform(sample)
        code_range = None
        if name in RANGED:
            low, high = seen.min(0), seen.max(0)
            code_range = np.stack([low, np.maximum(high - low, 1e-12) / 255]).astype(np.float32)
        return cls(folder, name, transform, code_range, total, seen.shape[1])

    @classmethod
    def extending(cls, built: Path, folder: Path, name: str, transform, added: int) -> "CodeWriter":
        """A writer into `folder` of the NAME codes in `built` (copied in blocks, over their
        range) and `added` more."""
        old = np.load(built / f"{name}.npy", mmap_mode="r")
        code_range = np.load(built / f"{name}_range.npy") if name in RANGED else None
        writer = cls(folder, name, transform, code_range, len(old) + added, old.shape[1])
        for start in range(0, len(old), ADD_BATCH):
            writer.add_codes(np.asarray(old[start:start + ADD_BATCH]))
        return writer

    def add(self, vectors: np.ndarray) -> None:
        values = self.transform(vectors)
        if self.range is None:
            self.add_codes(values.astype(self.codes.dtype))
        else:
            self.add_codes(np.clip(np.rint((values - self.range[0]) / self.range[1]), 0, 255).astype(np.uint8))

    def add_codes(self, codes: np.ndarray) -> None:
        self.codes[self.filled:self.filled + len(codes)] = codes
        self.filled += len(codes)

    def commit(self) -> None:
        if self.filled != len(self.codes):
            raise RuntimeError(f"{self.filled} {self.name} codes written of {len(self.codes)}")
        with disk_write(self.folder / f"{self.name}.npy"):
            self.codes.flush()
            del self.codes
            if self.range is not None:
                np.save(self.folder / f"{self.name}_range.npy", self.range)


def code_writers(folder: Path, ann, sample: np.ndarray, total: int) -> list[CodeWriter]:
    """Writers of both re-rank code files of `total` windows, over the (trained) index's sample."""
    return [CodeWriter.trained(folder, name, f, sample, total) for name, f in code_transforms(ann).items()]


def _write(index: TileIndex, ann, rows: list[np.ndarray], codes: list[CodeWriter], factory: str,
           began: float, folder: Path, trained_for: int) -> AnnInfo:
    """Write the FAISS index, its window table, the re-rank codes and ann.json (last) into the
    new shortlist's `folder` (staging), each on disk before it is swapped in for the old one.
    `trained_for`: the windows its lists and codes were trained for (ann.json keeps it: outgrown)."""
    import faiss

    with disk_write(folder):
        try:
            faiss.write_index(ann, str(folder / "index.faiss"))
        except RuntimeError as exc:  # FAISS's own: "Error in ... write error ... (No space left on device)"
            said = str(exc).strip().splitlines()[-1]
            raise OSError(errno_named_in(said), excerpt(said)) from exc
        np.save(folder / "windows.npy", np.concatenate(rows))
        for writer in codes:
            writer.commit()
        for name in MAPPED_FILES:
            with open(folder / name, "rb") as written:
                os.fsync(written.fileno())
    covers = covered(index)
    info = AnnInfo(int(ann.ntotal), sorted(int(r) for r in covers), factory, round(time.perf_counter() - began, 2),
                   sum(f.stat().st_size for f in folder.iterdir() if f.is_file()))
    sizes = {name: (folder / name).stat().st_size for name in MAPPED_FILES}
    write_json_atomic(folder / "ann.json", {**info.to_json(), "format": FORMAT, "covers": covers,
                                            "sources": sources(index, covers), "paths": paths(index, covers),
                                            "file_bytes": sizes, "trained_for": trained_for})
    _swap_in(folder, index.dir)
    return info


@contextmanager
def staging(index_dir: Path) -> Iterator[Path]:
    """An empty folder for a new shortlist (INDEX/.ann.new.PID), removed if writing it fails."""
    folder = Path(index_dir) / f".{ANN_DIR}.new.{os.getpid()}"
    _discard(folder)
    with disk_write(folder):
        folder.mkdir()
    try:
        yield folder
    finally:
        _discard(folder)  # gone already once swapped in


def _swap_in(folder: Path, index_dir: Path) -> None:
    """The written shortlist in `folder` in place of the old one, by two renames. Between them
    there is none (searches scan exactly); if the process dies there, _sweep puts the old one
    back. A Ctrl-C, SIGTERM or SIGHUP is held over the renames (stops_held): between them it
    discarded the new one, whole (hours of a continent's build), for the old one put back.
    A shortlist open in a worker keeps reading its own files (Codes keeps them open)."""
    live, old = ann_dir(index_dir), Path(index_dir) / f".{ANN_DIR}.old.{os.getpid()}"
    _discard(old)
    try:
        with stops_held():
            if os.path.lexists(live):  # a link whose target is gone too
                os.replace(live, old)
            replace_durably(folder, live)
        _discard(old)  # stopped here, it is the next build's or update's to remove (_sweep)
    except KeyboardInterrupt as stop:  # held over the renames, a second one at once, or removing the old
        if os.path.lexists(folder) or not os.path.lexists(live):
            raise
        raise StoppedOnceDone(stop, "the new shortlist was written whole and is in place") from stop


def _sweep(index_dir: Path) -> None:
    """What a killed build or update left (run holding the index's lock): its half-written
    folder is removed, and when it died between _swap_in's two renames the old shortlist is put
    back."""
    index_dir = Path(index_dir)
    remove_unfinished_builds(index_dir)
    olds = list(index_dir.glob(f".{ANN_DIR}.old.*"))
    whole = sorted((p for p in olds if _whole(p)), key=lambda p: p.stat().st_mtime_ns)
    # the newest whole one is put back: a link whose target is gone (INDEX/ann kept on another disk)
    # came back as a dangling INDEX/ann, and the build failed at its swap, its work lost
    if whole and not os.path.lexists(ann_dir(index_dir)):
        os.replace(whole[-1], ann_dir(index_dir))
        olds.remove(whole[-1])
    for folder in olds:
        _discard(folder)


def _discard(folder: Path) -> None:
    """A shortlist's folder removed (a set-aside old one, a half-written new one): one this worker
    may not list (mode 000 on a shared disk: built again for that) is still its own to remove;
    it stayed beside the new one for good, unsaid (gigabytes at a continent's tiles). What cannot
    be removed all the same is said."""
    try:
        if not os.path.isdir(folder) or os.path.islink(folder):
            os.unlink(folder)  # a file in a shortlist's place
            return
        os.chmod(folder, 0o700)
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: could not be removed (%s); delete it by hand", folder, exc.strerror or exc)


def remove_unfinished_builds(index_dir: Path) -> None:
    """The half-written folders of killed builds or updates (about 3 KB a window: GBs at
    continental scale); only by a run holding the index's lock. Indexing runs remove them too:
    only the next build-ann did, and an index with no shortlist yet is never updated."""
    for folder in Path(index_dir).glob(f".{ANN_DIR}.new.*"):
        _discard(folder)


def kept(index_dir: Path) -> bool:
    """Whether the index has a shortlist to keep up to date (one a killed swap left aside too)."""
    return AnnShortlist.exists(index_dir) or left_mid_swap(index_dir)


SET_ASIDE = ("a build or update of the shortlist was stopped or killed as it swapped the new one in: the old one is set "
             "aside, and the next index run, removal or build-ann puts it back and brings it up to date (in seconds "
             "where it is current); searches scan exactly meanwhile")


def left_mid_swap(index_dir: Path) -> bool:
    """Whether a build killed between _swap_in's two renames left the old shortlist under its
    swap's name and none in place: the index still has one, which the next update puts back."""
    index_dir = Path(index_dir)
    return not ann_dir(index_dir).exists() and any(_whole(p) for p in index_dir.glob(f".{ANN_DIR}.old.*"))


def _whole(folder: Path) -> bool:
    """Whether a set-aside shortlist's folder holds its ann.json (written last); not one this
    worker may not enter (mode 000 on a shared disk: Path.is_file raised, and every build,
    update and index run failed on it; _discard removes it). Any other error is raised: a
    network disk's passing one must not discard the only shortlist there is."""
    try:
        return (folder / "ann.json").is_file()
    except PermissionError:
        return False


REBUILD = ("run `python -m worker build-ann` again, or search without the shortlist (`--ann off`; over the "
           "protocol `\"ann\": \"off\"`)")


def read_built(folder: Path) -> dict:
    """A shortlist's ann.json (what was built); CorruptIndexError when it is not what a build
    writes (FileNotFoundError passes: between a swap's two renames there is none). A field of the
    wrong type failed index runs, searches and `info` with a traceback (_check_built)."""
    path = folder / "ann.json"
    try:
        built = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptIndexError(f"{path}: unreadable ({excerpt(str(exc))}); {REBUILD}") from None
    wrong = _check_built(built)
    if wrong:
        raise CorruptIndexError(f"{path}: not what a build writes ({wrong}); {REBUILD}")
    return built


BUILT_FIELDS = {"vectors": int, "rasters": list, "factory": str, "build_s": (int, float), "bytes_on_disk": int,
                "format": int, "covers": dict, "file_bytes": dict, "sources": dict, "trained_for": int, "paths": dict}
OPTIONAL_FIELDS = ("sources", "trained_for", "paths")  # not in shortlists built before they were recorded


def _check_built(built: object) -> str | None:
    """What is wrong with an ann.json's content (None: nothing). Every field is checked where
    present; one of this FORMAT holds them all but OPTIONAL_FIELDS (an older one is rebuilt)."""
    if not isinstance(built, dict):
        return "not a JSON object"
    for name, kind in BUILT_FIELDS.items():
        if name not in built:
            if built.get("format") == FORMAT and name not in OPTIONAL_FIELDS:
                return f"no {name}"
        elif not isinstance(built[name], kind) or isinstance(built[name], bool) or \
                (kind is int and built[name] < 0):
            return f"{name} is {excerpt(json.dumps(built[name]))}"
    covers, sizes, files = built.get("covers", {}), built.get("file_bytes", {}), built.get("sources", {})
    if not all(map(_is_count, [*covers.values(), *sizes.values(), *built.get("rasters", [])])):
        return "a tile count, file size or raster id that is no count"
    paths = built.get("paths", {})
    if not all(str(r).isdigit() for r in (*covers, *files, *paths)) or \
            not all(isinstance(f, list) for f in files.values()) or not all(isinstance(p, str) for p in paths.values()):
        return "a raster's entry that is not what a build writes"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_windows(index: TileIndex, rows: np.ndarray, maps: dict | None = None) -> None:
    """Refuse window rows (raster id, scale, stored-cell row and column) that lie in no level map of
    `index` (of `maps`, when given): a damaged windows.npy would otherwise fail a search with a KeyError, or hand on
    places outside every map and find nothing, without a word."""
    rows = np.asarray(rows).reshape(-1, 4).astype(np.int64)
    keys, where = np.unique(rows[:, 0] * KEY_SPAN + rows[:, 1], return_inverse=True)  # one a map: fast at 22M rows
    maps = index.maps if maps is None else maps
    named = [(int(key) // KEY_SPAN, int(key) % KEY_SPAN) for key in keys]
    shapes = np.array([maps[k].cells.shape[:2] if k in maps else (0, 0) for k in named], np.int64)
    outside = (rows[:, 1] < 0) | (rows[:, 1] >= KEY_SPAN) | (rows[:, 2:] < 0).any(1)
    outside |= (rows[:, 2:] >= shapes.reshape(-1, 2)[where]).any(1)
    if outside.any():
        raster_id, scale, row, col = rows[outside][0].tolist()
        raise CorruptIndexError(f"{ann_dir(index.dir) / 'windows.npy'}: a window (raster {raster_id}, scale {scale}, "
                                f"cell {row}, {col}) outside the index's maps; {REBUILD}")


def check_sizes(folder: Path, info: dict) -> None:
    """Refuse memory-mapped files whose size is not what was written (a truncated file, mapped,
    would crash the worker at the first read past its end instead of failing here)."""
    for name, size in info.get("file_bytes", {}).items():
        path = folder / name
        found = path.stat().st_size if path.exists() else None
        if found != size:
            raise CorruptIndexError(f"{path}: {found if found is not None else 'missing'}, written as {size} bytes; "
                                    f"{REBUILD}")


def covered(index: TileIndex) -> dict[str, int]:
    """What an ANN shortlist built now covers: tiles per raster id (a raster added or removed
    changes it), of the complete rasters: one being indexed (a run under way or stopped) is
    scanned exactly beside it, or left out (TileIndex.left_out), and added once complete.
    Covered with part of its tiles, it made the shortlist stale for good once its run went on:
    every search scanned every map exactly, then the shortlist was trained again from nothing."""
    complete = index.complete_rasters
    return {str(r): n for r, n in sorted(index.tiles_per_raster.items()) if r in complete}


def sources(index: TileIndex, rasters: Iterable[str]) -> dict[str, list[int]]:
    """The file each raster id of `rasters` (a shortlist's covers) was indexed from, as its size
    and modification time (and a VRT's sources'): a raster changed on disk and indexed again keeps
    its id, and often its tile count. Of every raster of the index, `info` said a shortlist that
    covered all it could was not current (a raster not covered, still being indexed, or of no
    tile, had been recorded)."""
    wanted = set(rasters)
    return {str(r["id"]): [r.get("size"), r.get("mtime_ns"), *(r.get("sources") or [])]
            for r in index.manifest["rasters"] if str(r["id"]) in wanted}


def paths(index: TileIndex, rasters: Iterable[str]) -> dict[str, str]:
    """The path of each raster id of `rasters` (a shortlist's covers)."""
    wanted = set(rasters)
    return {str(r["id"]): r["path"] for r in index.manifest["rasters"] if str(r["id"]) in wanted}


def answers_for(built: dict, index: TileIndex) -> set[int] | None:
    """The rasters a shortlist whose ann.json says `built` can still answer for: those it covers,
    when each is in the index unchanged (its tile count, and its files where recorded), but those
    this view leaves out (TileIndex.left_out: a worker with a smaller --max-partial-maps-mb than
    the shortlist's builder); None when it can answer for none (another format, or a raster it
    covers changed or gone). A raster added since, or being indexed, is not among them: a search
    scans it exactly beside."""
    then, left_out, now = built.get("covers", {}), index.left_out, index.tiles_per_raster
    kept = [r for r in then if int(r) not in left_out]  # those grow, unsearched, while indexed
    if built.get("format") != FORMAT or any(now.get(int(r)) != then[r] for r in kept) or \
            not _files_as_built(built, index, kept):
        return None
    return {int(r) for r in then} - set(left_out)


def current(built: dict, index: TileIndex) -> bool:
    """Whether a shortlist's ann.json says it was built, in this format, from the index as it is
    now (shortlists from before `sources` was recorded are judged by their tile counts)."""
    covers = covered(index)
    return built.get("format") == FORMAT and built.get("covers") == covers and _files_as_built(built, index, covers)


def why_not_current(built: dict, index: TileIndex) -> str | None:
    """Why a shortlist whose ann.json says `built` is not current, the first reason found (`info`
    and a search's advice said only that it was not, or was older than the tiles, and the user
    could not tell what had changed); None when it is."""
    if current(built, index):
        return None
    if built.get("format") != FORMAT:
        made = "no format recorded" if built.get("format") is None else f"format {built.get('format')}"
        return f"built in another format ({made}; this worker's is {FORMAT})"
    then, now = built.get("covers", {}), index.tiles_per_raster
    names = {**built.get("paths", {}), **paths(index, then)}
    changed = _files_changed(built, index, then)
    for r in then:
        name = names.get(r, f"raster {r}")
        if int(r) not in index.rasters:
            return f"{name} was removed from the index since it was built"
        if int(r) not in index.complete_rasters or now.get(int(r)) != then[r] or r in changed:
            doing = "is being indexed again" if int(r) not in index.complete_rasters else "was indexed again"
            return f"{name} {doing} since it was built (tiles: {then[r]} then, {now.get(int(r), 0)} now)"
    added = [r for r in covered(index) if r not in then]
    return f"{len(added)} raster{'s' if len(added) > 1 else ''} indexed since it was built, scanned exactly beside it"


def _files_as_built(built: dict, index: TileIndex, rasters: Iterable[str]) -> bool:
    """Whether each raster id of `rasters` names the file a shortlist (its ann.json, `built`) was
    built from: its path, and its size and time (and a VRT's sources'); shortlists from before a
    field was recorded are judged without it. Without paths, a shortlist copied from another
    index of the same sheets, indexed in another order, was taken as current and answered with
    the other sheets' places."""
    return not _files_changed(built, index, rasters)


def _files_changed(built: dict, index: TileIndex, rasters: Iterable[str]) -> set[str]:
    """The raster ids of `rasters` whose file is not the one the shortlist was built from
    (_files_as_built), each looked up once: by raster, it took 2.6 s at 4,000 rasters."""
    rasters = list(rasters)
    changed = set()
    for field, now in (("sources", sources(index, rasters)), ("paths", paths(index, rasters))):
        then = built.get(field)
        if then is not None:
            changed.update(r for r in rasters if now.get(r) != then.get(r))
    return changed


def describe(index: TileIndex) -> dict | None:
    """What `info` says of an index's ANN shortlist: what it holds, whether it covers the index
    as it is now, and whether a search asks it (None: the index has none; `damaged`: why it
    cannot be read; `set_aside`: an update killed mid-swap, said as none before)."""
    if left_mid_swap(index.dir):
        return {"set_aside": SET_ASIDE}
    if not AnnShortlist.exists(index.dir):
        return None
    try:
        shortlist = AnnShortlist.open(index.dir)
        if shortlist is not None and shortlist.current_format:
            shortlist.check_ids()  # about 0.1 s at 10M tiles: else said current while every search of it failed
    except CorruptIndexError as exc:  # the index itself is fine, and `info` says what to do
        return {"damaged": str(exc)}
    if shortlist is None:  # between the two renames of a swap
        return None
    built = shortlist.info
    answered = answers_for(built, index)
    beside = None if answered is None else sorted(r for r in index.tiles_per_raster
                                                  if r not in answered and r not in index.left_out)
    why = why_not_current(built, index)
    return {**{k: v for k, v in built.items() if k not in ("covers", "sources", "paths")}, "current": why is None,
            "why_not_current": why, "asked_by_default": answered is not None and big_enough(len(index)),
            "rasters_scanned_exactly_beside": beside}


def update(index: TileIndex) -> AnnInfo | None:
    """Bring an index's ANN shortlist up to date after indexing: the windows of rasters added
    since it was built are added; when a raster was indexed again or removed, or the shortlist
    is of another format or does not hold what its ann.json says, it is rebuilt. None when the
    index has no ANN shortlist (nothing to keep up to date). Holds the index's lock."""
    with index_lock(index.dir):
        _sweep(index.dir)
        return _update(index)


def _update(index: TileIndex) -> AnnInfo | None:
    built_dir = ann_dir(index.dir)
    if not AnnShortlist.exists(index.dir):
        return None
    began = time.perf_counter()
    try:
        shortlist = AnnShortlist(index.dir)  # ann.json, the files' sizes, and each file readable
        built = shortlist.info
        if shortlist.current_format:
            shortlist.check_ids()
        answered = answers_for(built, index)
        if answered is None or {int(r) for r in built["covers"]} - answered:
            answered = None  # a covered raster this view leaves out would lose its place in `covers`, not its windows
        else:
            new = [int(r) for r in covered(index) if int(r) not in answered]
            if not new:  # its windows' rows are not read (360 MB at 10M tiles): a search checks those it uses
                return AnnInfo(built["vectors"], built["rasters"], built["factory"], 0.0, built["bytes_on_disk"])
            rows = [np.load(built_dir / "windows.npy")]
            # else copied into the new shortlist, under sizes that then match
            check_windows(index, rows[0], index.maps_of(answered))
    except (CorruptIndexError, KeyError, TypeError, ValueError, OSError) as exc:
        log.warning("%s: its ANN shortlist cannot be read (%s); building it again", index.dir, excerpt(str(exc)))
        answered = None
    if answered is None:
        return _rebuild(index)
    # the new windows are counted first (made twice: holding them all could take more memory than
    # there is), so that the codes files are written at their final size
    maps = index.maps_of(set(new))
    added = sum(len(v) for _, _, v, _ in _windows_of(maps))
    if outgrown(built, built["vectors"] + added):
        log.info("%s: its ANN shortlist, trained for %d windows, would hold %d: trained again", index.dir,
                 built.get("trained_for", built["vectors"]), built["vectors"] + added)
        return _rebuild(index)
    ann = _read_faiss(built_dir / "index.faiss")  # whole, to add to (opened above mapped: readable)
    with staging(index.dir) as folder:
        codes = [CodeWriter.extending(built_dir, folder, name, f, added) for name, f in code_transforms(ann).items()]
        for raster_id, scale, vectors, origins in _windows_of(maps):
            ann.add(vectors)
            for writer in codes:
                writer.add(vectors)
            rows.append(_window_rows(raster_id, scale, origins))
        return _write(index, ann, rows, codes, built["factory"], began, folder,
                      trained_for=built.get("trained_for", built["vectors"]))


def outgrown(built: dict, total: int) -> bool:
    """Whether a shortlist (its ann.json) that would hold `total` windows is trained again rather
    than added to: at GROWTH_RETRAIN times the windows it was trained for, or past a compression
    tier of the product's factories. An index grown region by region from a small first one kept
    its first training for good: a few inverted lists of millions of uncompressed windows each
    (factory IVF6,Flat), far over the memory and time the shortlist is for. Retrained at each
    fourfold growth, the work of all retrainings stays under twice the last one's."""
    trained_for = built.get("trained_for", built["vectors"])

    def tier(factory: str) -> str:
        return re.sub(r"IVF\d+", "IVF", factory)

    ours = tier(built["factory"]) in {tier(f.format(nlist=1)) for f in (SMALL_FACTORY, DEFAULT_FACTORY, LARGE_FACTORY)}
    return total >= GROWTH_RETRAIN * trained_for or (ours and tier(factory_for(total)) != tier(built["factory"]))


def _rebuild(index: TileIndex, factory: str | None = None, seed: int = 0) -> AnnInfo:
    """The shortlist built again from the index as it is; one the index now has too few windows
    for (rasters removed) is removed, and TooFewWindows says so. Kept, it stayed older than its
    index for good: never asked, `info` describing rasters that were gone, every removal and
    build-ann failing on it (a removal killed before its rebuild: searches said to run
    build-ann, which said too few and left it there), and index runs leaving it there."""
    try:
        return _build(index, factory, seed)
    except TooFewWindows as exc:
        discarded = Path(index.dir) / f".{ANN_DIR}.new.{os.getpid()}"  # what remove_unfinished_builds sweeps
        _discard(discarded)
        os.replace(ann_dir(index.dir), discarded)
        _discard(discarded)
        raise TooFewWindows(f"{exc}: the index's old shortlist was removed") from None


def _read_faiss(path: Path, flags: int = 0):
    """A FAISS index read from `path`; CorruptIndexError when FAISS cannot read it."""
    import faiss

    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        last_line = (str(exc).strip().splitlines() or ["?"])[-1]  # FAISS's own message, after its C++ trace
        raise CorruptIndexError(f"{path}: FAISS cannot read it ({excerpt(last_line)}); {REBUILD}") from None


def _npy_header(file) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of the .npy file open as `file` (C order only)."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(file)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = read(file)
    except ValueError as exc:
        raise CorruptIndexError(f"{file.name}: not a .npy file ({exc}); {REBUILD}") from None
    if fortran_order:
        raise CorruptIndexError(f"{file.name}: in Fortran order; {REBUILD}")
    return shape, dtype, file.tell()


class RowFile:
    """A .npy file of rows (2-D, of one dtype) of a shortlist, read by row: the re-rank codes
    (Codes) and windows.npy. The file is mapped for one read at a time, with random access
    advised unless rows are asked densely (DENSE_GAP): else the kernel's read-around reads
    128 KB from disk for each row and, from a cold cache, the whole file.

    Rows are read by READ_THREADS threads. 15,000 scattered rows of a 576 MB file (the refine
    codes of 1M tiles) took 1.36 s from a cold page cache in one thread, 0.23 s in 8, 0.17 s in
    16; 12-17 ms from a warm one in any (medians; docs/benchmarks/speed.md).

    The pages of every ROWS_A_RELEASE rows a thread reads are let go as soon as they are read:
    the kernel maps up to 64 KB of cached pages around each row it faults in (fault-around), so
    one read of 15,000 rows of a warm 576 MB file counted all 576 MB to the worker's resident
    memory while it lasted, and a mapping kept open counted every page ever touched (7.7 GB at
    10M tiles). With releases, at most READ_THREADS * ROWS_A_RELEASE rows' 64 KB are mapped at
    once (128 MB, where rows lie 64 KB apart or more: at 10M tiles, not measured); 8,000 rows of
    a warm 256 MB file, 32 KB apart, raised the peak by 13-15 MB in one thread, 12-72 MB in 8,
    67-95 MB in 16 (measured), so 8 threads.

    The file is kept open, so that a shortlist rebuilt meanwhile (_swap_in) does not change what
    this one reads."""

    def __init__(self, path: Path, dtype, what: str):
        self.path = path
        try:
            self.file = open(self.path, "rb")
        except FileNotFoundError:  # between a swap's two renames: AnnShortlist.open asks again
            raise
        except OSError as exc:  # not a file, or not this worker's to read: failed searches with a traceback
            raise CorruptIndexError(f"{self.path}: cannot be read ({exc.strerror or exc}); {REBUILD}") from None
        weakref.finalize(self, self.file.close)
        self.shape, self.dtype, self.offset = _npy_header(self.file)  # where the rows start; none is read
        if self.dtype != dtype or len(self.shape) != 2:
            raise CorruptIndexError(f"{self.path}: {self.dtype} {self.shape}, expected {what} of "
                                    f"{np.dtype(dtype)}; {REBUILD}")

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids`, in their order: (len(ids), columns) of the file's dtype."""
        ids = np.asarray(ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"{self.path.name}: rows {ids.min()}..{ids.max()} asked of {self.shape[0]}")
        order = np.argsort(ids, kind="stable")
        picked = np.empty((len(ids), self.shape[1]), self.dtype)
        row_bytes = self.shape[1] * self.dtype.itemsize
        size = self.offset + self.shape[0] * row_bytes
        with mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            mapped.madvise(mmap.MADV_NORMAL if len(ids) * DENSE_GAP >= size else mmap.MADV_RANDOM)
            table = np.frombuffer(mapped, self.dtype, self.shape[0] * self.shape[1], self.offset).reshape(self.shape)

            def read_run(run: np.ndarray) -> None:
                for start in range(0, len(run), ROWS_A_RELEASE):
                    part = run[start:start + ROWS_A_RELEASE]
                    picked[part] = table[ids[part]]  # copies: the mapping closes with nothing pointing into it
                    first = (self.offset + int(ids[part[0]]) * row_bytes) // FAULT_AROUND * FAULT_AROUND
                    end = min(size, -(-(self.offset + (int(ids[part[-1]]) + 1) * row_bytes) // FAULT_AROUND) * FAULT_AROUND)
                    mapped.madvise(mmap.MADV_DONTNEED, first, end - first)

            readers, reads = shared_pool("ann-read", READ_THREADS), []
            try:
                for run in np.array_split(order, READ_THREADS):
                    if len(run):
                        reads.append(readers.submit(read_run, run))
            finally:
                try:
                    wait_all(reads)  # all, even after a failure or Ctrl-C: none may read the mapping once it closes
                finally:
                    del table  # also when Ctrl-C is raised on: the mapping cannot close while an array points into it
            for read in reads:
                read.result()
        return picked


class Codes(RowFile):
    """One file of re-rank codes (NAME.npy, of CODES[NAME]'s dtype), read by row (RowFile), and
    the range its 8-bit codes stand for (NAME_range.npy)."""

    def __init__(self, folder: Path, name: str):
        super().__init__(folder / f"{name}.npy", CODES[name], "codes")
        if name in RANGED:  # each dimension's (CodeWriter); a pickle is refused, not loaded
            try:
                self.low, self.step = np.load(folder / f"{name}_range.npy").reshape(2, self.shape[1])
            except (OSError, ValueError) as exc:
                raise CorruptIndexError(f"{folder / f'{name}_range.npy'}: {excerpt(str(exc))}; {REBUILD}") from None
        else:  # the values themselves
            self.low, self.step = np.zeros(self.shape[1], np.float32), np.ones(self.shape[1], np.float32)

    def best_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Each row's best inner product with any of `queries` (in this file's space), from its
        codes; the decoding is folded into the queries. Multiplied in torch, not numpy: numpy's
        OpenBLAS keeps its own threads spinning for a while after a product, and on this 2-core
        CPU they took a core from the torch scans that follow (the local scans after the
        shortlist took 95-121 ms instead of 49-59; docs/benchmarks/speed.md)."""
        codes = torch.from_numpy(self.rows(ids)).float()
        q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
        step, low = torch.from_numpy(self.step), torch.from_numpy(self.low)
        return ((q * step) @ codes.T + (q @ low)[:, None]).amax(0).numpy()


class AnnShortlist:
    """A built ANN shortlist, memory-mapped: which grid windows a sketch may lie near."""

    def __init__(self, index_dir: Path, nprobe: int = NPROBE, full_rerank: int = FULL_RERANK):
        import faiss

        self.full_rerank = full_rerank
        folder = ann_dir(index_dir)
        self.stamp = AnnShortlist.stamp_of(index_dir)  # before anything is read: a swap meanwhile shows next time
        self.folder = folder
        self.info = read_built(folder)
        self.current_format = self.info.get("format") == FORMAT
        if not self.current_format:
            return  # built by an older worker: never asked (covers), rebuilt by `update`
        check_sizes(folder, self.info)
        self.index = _read_faiss(folder / "index.faiss", faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:
            raise CorruptIndexError(f"{folder / 'index.faiss'}: not an inverted-file index; {REBUILD}") from None
        ivf.nprobe = nprobe
        quantiser = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantiser, faiss.IndexHNSW):
            quantiser.hnsw.efSearch = QUANTISER_EF
        self.windows = RowFile(folder / "windows.npy", np.int32, "windows")
        self.codes = {name: Codes(folder, name) for name in CODES}
        counts = {"ann.json": self.info["vectors"], "index.faiss": self.index.ntotal,
                  "windows.npy": self.windows.shape[0], **{f"{n}.npy": codes.shape[0] for n, codes in self.codes.items()}}
        if len(set(counts.values())) > 1:
            raise CorruptIndexError(f"{folder}: its files hold different numbers of windows {counts}; {REBUILD}")

    def _check_window(self, window: int) -> None:
        """Refuse a window index.faiss names past windows.npy's rows (damaged in its ids alone,
        it loads, and is the size it was written at)."""
        if not 0 <= window < self.windows.shape[0]:
            raise CorruptIndexError(f"{self.folder / 'index.faiss'}: window {window} of {self.windows.shape[0]}; "
                                    f"{REBUILD}")

    def check_ids(self) -> None:
        """_check_window for every window index.faiss names (its ids, 8 bytes a window: 80 MB at
        10M), as an index run asks (update): it builds again a shortlist every search of which
        failed, where it had kept it as current."""
        import faiss

        lists = faiss.extract_index_ivf(self.index).invlists
        for number in range(lists.nlist):
            size = lists.list_size(number)
            if size:
                pointer = lists.get_ids(number)
                ids = faiss.rev_swig_ptr(pointer, size)
                low, high = int(ids.min()), int(ids.max())
                lists.release_ids(number, pointer)
                self._check_window(low)
                self._check_window(high)

    def check_files(self) -> None:
        """Refuse files changed in size since this shortlist was opened (truncated in place, or
        copied over): FAISS maps index.faiss, and a read past a mapped file's new end kills the
        worker (SIGBUS). A search asks before each use (worker.search.ann_shortlist)."""
        if self.current_format:
            check_sizes(self.folder, self.info)

    @classmethod
    def open(cls, index_dir: Path) -> "AnnShortlist | None":
        """The shortlist on disk now; opened again if it was swapped for another while it was
        being opened (which could pair one's ann.json with the other's files); None if there
        is none, or none yet: between the two renames of a swap."""
        for _ in range(3):
            try:
                shortlist = cls(index_dir)
            except (FileNotFoundError, CorruptIndexError):
                if cls.stamp_of(index_dir) is None:
                    return None
                shortlist = None
            if shortlist is not None and cls.stamp_of(index_dir) == shortlist.stamp:
                return shortlist
        return cls(index_dir)  # still changing: what it says now (a damaged shortlist says so)

    @staticmethod
    def exists(index_dir: Path) -> bool:
        """Whether the index has a shortlist: one that cannot be looked at (a folder this worker
        may not enter) has one, which opening it says is damaged."""
        try:
            return AnnShortlist.stamp_of(index_dir) is not None
        except CorruptIndexError:
            return True

    @staticmethod
    def stamp_of(index_dir: Path) -> tuple | None:
        """Which shortlist is on disk now (its ann.json's inode, size and time; None: none): a
        worker holding an older one opens this one (worker.search.ann_shortlist). CorruptIndexError
        when it cannot be looked at: searches and `info` failed with a traceback."""
        try:
            st = os.stat(ann_dir(index_dir) / "ann.json")
        except (FileNotFoundError, NotADirectoryError):  # none, or a file in the shortlist's place
            return None
        except OSError as exc:
            raise CorruptIndexError(f"{ann_dir(index_dir)}: cannot be read ({exc.strerror or exc}); {REBUILD}") \
                from None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def answers_for(self, index: TileIndex) -> set[int] | None:
        """The rasters of `index` it can answer for (module function answers_for)."""
        return answers_for(self.info, index)

    def candidates(self, queries: np.ndarray, k: int, keep=None) -> tuple[np.ndarray, np.ndarray]:
        """Ids and scores of the best `full_rerank` distinct windows among FAISS's best `k` per
        query vector, best first: all of them re-ranked by their best inner product with any query
        from their rotated codes, then the best `full_rerank` of those from their full codes (the
        rotation to 256 dimensions alone kept 0.94 of the exact best 200 at 1M tiles). `keep`:
        which windows a search may hand on (rows of windows.npy -> bool), asked before the
        re-rank's cuts (worker.search_area)."""
        _, ids = self.index.search(queries, k)
        ids = np.unique(ids[ids >= 0])
        if len(ids):
            self._check_window(int(ids[-1]))
        if keep is not None and len(ids):
            ids = ids[keep(self.windows.rows(ids))]
        if not len(ids):
            return ids, np.zeros(0, np.float32)
        rough = self.codes["refine"].best_scores(rotate(self.index, queries), ids)
        best = np.sort(ids[np.argsort(-rough, kind="stable")[:self.full_rerank]])
        scores = self.codes["refine_full"].best_scores(queries, best)
        order = np.argsort(-scores, kind="stable")
        return best[order], scores[order]

    def search(self, queries: np.ndarray, k: int, keep=None) -> tuple[np.ndarray, np.ndarray]:
        """Window rows (raster id, scale, row, col) and re-ranked scores of the windows among the
        best `k` per query vector (AnnShortlist.candidates), best first."""
        ids, scores = self.candidates(queries, k, keep)
        return self.windows.rows(ids) if len(ids) else np.zeros((0, 4), np.int32), scores
