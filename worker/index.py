"""The token store on disk: a manifest, one shard per chunk of tiles, atomic commits, resume.

Layout of INDEX_DIR:
  manifest.json        model fingerprint, tile settings, rasters, committed shards (replaced atomically)
  shards/<name>/       records.npy (tile windows + WGS84 bounds), global.npy (n, D) fp16,
                       tokens.npy (n, K, D) fp16, positions.npy (n, K) int16,
                       layout_coarse.npy (n, Dc) fp16, layout_fine.npy (n, Df) uint8 (worker.edge_layout)
  tiles.gpkg           the indexed tiles as polygons (EPSG:4326) for QGIS, rebuilt after each run
A shard directory is written under a temporary name and renamed into place, then the manifest
naming it is replaced: a crash at any point leaves the last committed state, and a rerun
recomputes only the chunks that were not committed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

from worker import edge_layout
from worker.errors import IndexMismatchError, InputError, NotFoundError
from worker.tiling import RasterInfo, Tile, TileSettings, iter_tile_pixels, open_raster, plan_tiles

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: edge layouts per tile; 3: backbones named by their source (worker.model.identity)
CHUNK_TILES = 256
WGS84 = CRS.from_epsg(4326)
RECORD_DTYPE = np.dtype([("raster_id", "<i4"), ("col_off", "<i4"), ("row_off", "<i4"), ("width", "<i4"),
                         ("height", "<i4"), ("scale", "<i2"), ("valid", "<f4"), ("bounds4326", "<f8", (4,))])


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def index_lock(index_dir: Path) -> Iterator[None]:
    """One writer per index (a second one gets a clear error instead of interleaving shards)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{index_dir} is being written by another indexing run") from None
        yield


def tile_bounds_wgs84(tiles: list[Tile]) -> np.ndarray:
    """(n, 4) lon/lat bounds of each tile's densified footprint."""
    if not tiles:
        return np.zeros((0, 4))
    rings = np.stack([t.ring() for t in tiles])  # n, P, 2
    xs, ys = warp_transform(CRS.from_wkt(tiles[0].raster.crs_wkt), WGS84, rings[..., 0].ravel(), rings[..., 1].ravel())
    xs = np.asarray(xs).reshape(rings.shape[:2])
    ys = np.asarray(ys).reshape(rings.shape[:2])
    return np.column_stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)])


@dataclass
class IndexProgress:
    """Reported after every committed chunk (CLI: tqdm; service: progress messages)."""

    tiles_done: int
    tiles_total: int
    tiles_skipped: int
    raster: str


class IndexWriter:
    """Builds or extends an index; every committed chunk survives a crash."""

    def __init__(self, index_dir: Path, model, settings: TileSettings, chunk_tiles: int = CHUNK_TILES):
        self.dir = Path(index_dir)
        self.model = model
        self.settings = settings
        self.manifest = self._load_or_create(chunk_tiles)
        self.chunk_tiles = self.manifest["chunk_tiles"]  # an existing index keeps its own chunking

    def _load_or_create(self, chunk_tiles: int) -> dict:
        path = self.dir / "manifest.json"
        fp = self.model.fingerprint()
        settings = self.settings.to_json()
        if path.exists():
            manifest = json.loads(path.read_text())
            check_compatible(manifest, fp["tile_encoder"], settings, self.dir)
            return manifest
        return {"format": FORMAT_VERSION, "model": fp, "tiling": settings, "chunk_tiles": chunk_tiles,
                "rasters": [], "shards": [],
                "created": time.time(), "updated": time.time()}

    def _commit(self) -> None:
        self.manifest["updated"] = time.time()
        self.manifest["tile_count"] = sum(s["count"] for s in self.manifest["shards"])
        write_json_atomic(self.dir / "manifest.json", self.manifest)

    def _clean_uncommitted(self) -> None:
        committed = {s["name"] for s in self.manifest["shards"]}
        shards = self.dir / "shards"
        for entry in shards.iterdir() if shards.exists() else []:
            if entry.name not in committed:
                shutil.rmtree(entry, ignore_errors=True)

    def _raster_entry(self, info: RasterInfo) -> dict:
        for entry in self.manifest["rasters"]:
            if entry["path"] == info.path:
                if (entry["size"], entry["mtime_ns"]) != (info.size, info.mtime_ns):
                    self._drop_raster(entry["id"])
                    entry.update(info.to_json(), complete=False, tiles_total=None, tiles_skipped=0)
                    log.info("%s changed on disk since it was indexed: indexing it again", info.path)
                return entry
        entry = {"id": max((r["id"] for r in self.manifest["rasters"]), default=-1) + 1, **info.to_json(),
                 "complete": False, "tiles_total": None, "tiles_skipped": 0}
        self.manifest["rasters"].append(entry)
        return entry

    def _drop_raster(self, raster_id: int) -> None:
        self.manifest["shards"] = [s for s in self.manifest["shards"] if s["raster_id"] != raster_id]
        self._commit()
        self._clean_uncommitted()

    def build(self, raster_paths: list[Path], progress: Callable[[IndexProgress], None] | None = None,
              should_stop: Callable[[], bool] = lambda: False, batch_size: int = 16) -> dict:
        """Index every raster not yet (fully) indexed; returns the manifest.

        `should_stop` is polled between batches: returning True stops after the last commit
        (cancel), leaving a resumable index.
        """
        with index_lock(self.dir):
            (self.dir / "shards").mkdir(exist_ok=True)
            self._clean_uncommitted()
            infos = [open_raster(p, self.settings.bands) for p in raster_paths]  # refuse bad input up front
            plans = []
            for info in infos:
                entry = self._raster_entry(info)
                tiles = plan_tiles(RasterInfo.from_json(entry), self.settings)
                entry["tiles_total"] = len(tiles)
                plans.append((entry, tiles))
            self._commit()
            total = sum(len(t) for _, t in plans)
            done = sum(len(t) for e, t in plans if e["complete"])
            done += sum(min(self.chunk_tiles, len(t) - s["chunk"] * self.chunk_tiles) for e, t in plans if not e["complete"]
                        for s in self.manifest["shards"] if s["raster_id"] == e["id"])
            skipped_total = sum(e["tiles_skipped"] for e, _ in plans)
            for entry, tiles in plans:
                if entry["complete"]:
                    continue
                committed = {s["chunk"] for s in self.manifest["shards"] if s["raster_id"] == entry["id"]}
                for chunk in range(0, (len(tiles) + self.chunk_tiles - 1) // self.chunk_tiles):
                    if chunk in committed:
                        continue
                    if should_stop():
                        return self.manifest
                    part = tiles[chunk * self.chunk_tiles:(chunk + 1) * self.chunk_tiles]

                    def batch_done(n: int, _done=done, _path=entry["path"]) -> None:
                        if progress:
                            progress(IndexProgress(_done + n, total, skipped_total, _path))

                    skipped = self._write_chunk(entry, chunk, part, batch_size, should_stop, batch_done)
                    if skipped is None:
                        return self.manifest
                    entry["tiles_skipped"] += skipped
                    skipped_total += skipped
                    self._commit()
                    done += len(part)
                    if progress:
                        progress(IndexProgress(done, total, skipped_total, entry["path"]))
                entry["complete"] = True
                self._commit()
            write_tiles_gpkg(self.dir, self.manifest)
            return self.manifest

    def _write_chunk(self, entry: dict, chunk: int, tiles: list[Tile], batch_size: int,
                     should_stop: Callable[[], bool], batch_done: Callable[[int], None]) -> int | None:
        """Encode one chunk and commit it as a shard; returns how many tiles were skipped as empty."""
        name = f"r{entry['id']:05d}-c{chunk:06d}"
        kept: list[Tile] = []
        valid: list[float] = []
        outputs = []
        batch: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for n, (tile, image, mask) in enumerate(iter_tile_pixels(RasterInfo.from_json(entry), tiles,
                                                                 self.model.img_size), start=1):
            fraction = float(mask.mean())
            if fraction < self.settings.min_valid:
                continue
            kept.append(tile)
            valid.append(fraction)
            batch.append(image)
            masks.append(mask)
            if len(batch) == batch_size:
                if should_stop():
                    return None
                outputs.append(self.model.encode_tiles(np.stack(batch), np.stack(masks)))
                batch, masks = [], []
                batch_done(n)  # progress within the chunk (committed only at its end)
        if batch:
            outputs.append(self.model.encode_tiles(np.stack(batch), np.stack(masks)))
        records = np.zeros(len(kept), RECORD_DTYPE)
        records["raster_id"] = entry["id"]
        for field_name in ("col_off", "row_off", "width", "height", "scale"):
            records[field_name] = [getattr(t, field_name) for t in kept]
        records["valid"] = valid
        records["bounds4326"] = tile_bounds_wgs84(kept)
        dim, k = self.model.vit.embed_dim, self.model.config.tile_tokens
        arrays = {
            "records": records,
            "global": np.concatenate([o.global_token for o in outputs]) if outputs else np.zeros((0, dim), np.float16),
            "tokens": np.concatenate([o.tokens for o in outputs]) if outputs else np.zeros((0, k, dim), np.float16),
            "positions": np.concatenate([o.positions for o in outputs]) if outputs else np.zeros((0, k), np.int16),
            "layout_coarse": (np.concatenate([o.layout.coarse for o in outputs]) if outputs
                              else np.zeros((0, edge_layout.COARSE.dim), np.float16)),
            "layout_fine": (np.concatenate([o.layout.fine for o in outputs]) if outputs
                            else np.zeros((0, edge_layout.FINE.dim), np.uint8)),
        }
        tmp = self.dir / "shards" / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for key, arr in arrays.items():
            with open(tmp / f"{key}.npy", "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.dir / "shards" / name)
        self.manifest["shards"].append({"name": name, "raster_id": entry["id"], "chunk": chunk,
                                        "count": len(kept), "skipped": len(tiles) - len(kept)})
        return len(tiles) - len(kept)


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


def write_tiles_gpkg(index_dir: Path, manifest: dict) -> None:
    """The indexed tiles as EPSG:4326 polygons in tiles.gpkg, for a user to see in QGIS."""
    import pyogrio.raw
    import shapely

    index = TileIndex.open(index_dir)
    rec = index.records
    geoms = [shapely.to_wkb(p) for p in index.footprints_wgs84(np.arange(len(rec)))]
    paths = np.array([index.rasters[r].path for r in rec["raster_id"]], dtype=object)
    fields = ["tile_id", "raster", "col_off", "row_off", "width", "height", "scale", "valid"]
    data = [np.arange(len(rec), dtype=np.int64), paths, rec["col_off"], rec["row_off"], rec["width"],
            rec["height"], rec["scale"].astype(np.int32), rec["valid"].astype(np.float64)]
    tmp = index_dir / ".tiles.tmp.gpkg"
    tmp.unlink(missing_ok=True)
    pyogrio.raw.write(str(tmp), np.array(geoms, dtype=object), data, fields, layer="tiles", driver="GPKG",
                      crs="EPSG:4326", geometry_type="Polygon")
    os.replace(tmp, index_dir / "tiles.gpkg")


class TileIndex:
    """A read-only view of a committed index. The rows a shortlist scans (global tokens or
    coarse layouts) are loaded into memory when first used; the rest stays memory-mapped."""

    def __init__(self, index_dir: Path, manifest: dict, shards: list[dict]):
        self.dir = index_dir
        self.manifest = manifest
        self.rasters = {r["id"]: RasterInfo.from_json(r) for r in manifest["rasters"]}
        self._shards = [s for s in shards if s["count"] > 0]
        self.records = (np.concatenate([self._load(s, "records", None) for s in self._shards]) if self._shards
                        else np.zeros(0, RECORD_DTYPE))
        self._mapped = {key: [self._load(s, key, "r") for s in self._shards]
                        for key in ("tokens", "positions", "layout_fine")}
        self._offsets = np.cumsum([0] + [s["count"] for s in self._shards])
        self.dim = self._mapped["tokens"][0].shape[-1] if self._shards else 0

    def _load(self, shard: dict, key: str, mmap: str | None) -> np.ndarray:
        return np.load(self.dir / "shards" / shard["name"] / f"{key}.npy", mmap_mode=mmap)

    def _rows_in_memory(self, key: str, dim: int) -> np.ndarray:
        """One (n, dim) array filled shard by shard, so only one shard is held twice at a time
        (concatenating memory maps peaked at twice the array: 5.9 GB at 1M tiles)."""
        if not self._shards:
            return np.zeros((0, dim), np.float16)
        first = self._load(self._shards[0], key, "r")
        rows = np.empty((len(self), *first.shape[1:]), first.dtype)
        del first
        for shard, start in zip(self._shards, self._offsets):
            rows[start:start + shard["count"]] = self._load(shard, key, None)
        return rows

    @cached_property
    def global_tokens(self) -> np.ndarray:
        """(n, D) fp16 global tokens (the "tokens" ranker's shortlist)."""
        return self._rows_in_memory("global", self.dim or 1)

    @cached_property
    def coarse_layouts(self) -> np.ndarray:
        """(n, COARSE.dim) fp16 unit edge layouts (the "layout" ranker's shortlist)."""
        return self._rows_in_memory("layout_coarse", edge_layout.COARSE.dim)

    @classmethod
    def open(cls, index_dir: Path) -> "TileIndex":
        index_dir = Path(index_dir)
        path = index_dir / "manifest.json"
        if not path.exists():
            raise NotFoundError(f"{index_dir} is not an index (no manifest.json); build one with `index`")
        manifest = json.loads(path.read_text())
        check_format(manifest, index_dir)
        return cls(index_dir, manifest, manifest["shards"])

    def __len__(self) -> int:
        return len(self.records)

    def _gather(self, key: str, rows: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        return np.stack([self._mapped[key][s][r - self._offsets[s]] for s, r in zip(shard, rows)])

    def tokens_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patch tokens (len(rows), K, D) and their patch positions (len(rows), K), gathered
        from the memory-mapped shards."""
        if not len(rows):
            return np.zeros((0, 1, self.dim), np.float16), np.zeros((0, 1), np.int16)
        return self._gather("tokens", rows), self._gather("positions", rows)

    def fine_layouts_of(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), FINE.dim) uint8 fine edge layouts."""
        if not len(rows):
            return np.zeros((0, edge_layout.FINE.dim), np.uint8)
        return self._gather("layout_fine", rows)

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
        m = self.manifest
        sizes = {"tokens_bytes": int(sum(t.nbytes for t in self._mapped["tokens"])),
                 "disk_bytes": int(sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file()))}
        return {"index": str(self.dir), "format": m["format"], "model": m["model"], "tiling": m["tiling"],
                "tile_count": len(self), "tiles_skipped": sum(r["tiles_skipped"] for r in m["rasters"]),
                "complete": all(r["complete"] for r in m["rasters"]),
                "rasters": [{"id": r["id"], "path": r["path"], "width": r["width"], "height": r["height"],
                             "bands": r["bands"], "complete": r["complete"], "tiles_total": r["tiles_total"],
                             "tiles_skipped": r["tiles_skipped"]} for r in m["rasters"]],
                "sizes": {**sizes, "bytes_per_tile": sizes["disk_bytes"] / max(1, len(self))}}
