"""Building and extending an index: tiles -> features -> shards, every committed chunk kept."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from worker import level_maps
from worker.geo import bounds_wgs84
from worker.interrupts import stops_held
from worker.line_drawing import drawing_device
from worker.errors import REMOVE_HOW, InputError, RasterReadError, StorageError, numbered
from worker.store.format import (CHUNK_TILES, LOCK, MANIFEST, RECORD_DTYPE, SHARDS, TILES_LAYER, TMP_PREFIX,
                                 check_compatible, check_index_folder, check_tokens, disk_write, holds_an_index, holds_tokens,
                                 index_lock, manifest_stamp, new_manifest, read_manifest, remove_shards,
                                 remove_temporaries, shard_arrays, shard_name, write_json_atomic, write_shard)
from worker.store.gpkg import CURRENT, tiles_layer_state, write_tiles_gpkg
from worker.store.maps import (damaged_map, remove_maps, remove_maps_of_no_raster, remove_unfinished_maps,
                               write_joined_maps)
from worker.read_twice import copies, read_twice
from worker.store.reader import TileIndex
from worker.store.shard_file import DamagedFile, committed_array
from worker.drawing_pool import (DeviceDrawing, DrawingJob, DrawingPool, DrawnBatch, default_processes, drawn_batches,
                                 run_handles)
from worker.thread_pools import usable_cores
from worker.tile_features import TileFeatures
from worker.tiling import RasterInfo, Tile, TilePlan, TileSettings, open_raster, open_rasters, plan_tiles

log = logging.getLogger(__name__)

# A commit rewrites the whole manifest: it names every raster (each with its CRS's WKT) and
# shard, so one grows with the index and a commit after every chunk cost the run the square of
# its size: at 1,000 small rasters, 16 of 73 s went to encoding manifests. A run commits what it
# computed at most this often, and so that commits take at most a twentieth of its time; a
# stop, an error or its end commits at once. A killed run loses what it computed since.
COMMIT_EVERY_S = 2.0
COMMIT_SHARE = 20  # seconds between commits, at least, per second a commit takes
COMMIT_AT_LEAST_EVERY_S = 60.0  # however slow a commit (a stalled network file system)
OPEN_THREADS = 8  # rasters opened at once before a run (60 Sentinel-2 copies took 12 s one at a time on
# an H200 machine's 16 cores; worker.tiling.open_rasters)


@dataclass
class IndexProgress:
    """Reported after every computed chunk (CLI: tqdm; service: progress messages); committed
    within COMMIT_EVERY_S or so."""

    tiles_done: int
    tiles_total: int
    tiles_skipped: int
    raster: str


class IndexWriter:
    """Builds or extends an index; every committed chunk survives a crash. `tokens`: whether a new
    index stores the tiles' ViT tokens (None: no; an existing index keeps its own choice)."""

    def __init__(self, index_dir: Path, model, settings: TileSettings, chunk_tiles: int = CHUNK_TILES,
                 tokens: bool | None = None, commit_every_s: float = COMMIT_EVERY_S):
        self.dir = Path(index_dir)
        self.model = model
        self.settings = settings
        self.commit_every_s = commit_every_s
        self._asked = (chunk_tiles, tokens)
        self._last_commit = (0.0, 0.0)  # time.monotonic() when the last commit ended, and its seconds
        self._uncommitted = False
        self._in_place: tuple | None = None  # what this run made and wrote last (_check_in_place)
        self.manifest = self._load_or_create(chunk_tiles, tokens)  # refuses another index's settings now
        self.chunk_tiles = self.manifest["chunk_tiles"]  # an existing index keeps its own chunking

    def _load_or_create(self, chunk_tiles: int, tokens: bool | None) -> dict:
        check_index_folder(self.dir)  # an index, or a new or empty folder: never one holding other things
        fp = self.model.fingerprint()
        settings = self.settings.to_json()
        if holds_an_index(self.dir):
            manifest = read_manifest(self.dir)
            check_compatible(manifest, fp, settings, self.dir)
            check_tokens(manifest, tokens, self.dir)
            return manifest
        return new_manifest(fp, settings, chunk_tiles, self.model.img_size, bool(tokens))

    def _index_as_written(self) -> tuple:
        """The lock file and shards folder this run holds (their inodes) and the manifest it
        last committed (manifest_stamp; None before the first): what removing the folder, or
        any part of it, changes."""
        def inode(name: str) -> int | None:
            try:
                return os.stat(self.dir / name).st_ino
            except OSError:
                return None

        return inode(LOCK), inode(SHARDS), manifest_stamp(self.dir)

    def _check_in_place(self) -> None:
        """InputError when the index's folder was removed (or replaced) while this run wrote it:
        a service job whose index was deleted with `rm -rf` made the folder again and committed a
        manifest naming the shards that went with it, an index come back damaged. rm removes a
        folder's entries one by one, and fails on a folder the run wrote into meanwhile: any of
        the lock, the shards folder or the manifest gone or replaced stops the run."""
        if self._in_place is not None and self._index_as_written() != self._in_place:
            raise self._removed()

    def _removed(self) -> InputError:
        return InputError(f"{self.dir} was removed while this run wrote it: nothing more is written; index the "
                          "rasters again to build it anew")

    @contextmanager
    def _writing_in_place(self) -> Iterator[None]:
        """A write into the index's folder: one the disk refused because the folder, or a part of
        it, was removed meanwhile (after _check_in_place; rm -rf reaching this run's temporary
        shard before the folders _check_in_place looks at) is said as its removal, not as a
        storage error telling to run the job again."""
        try:
            yield
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):  # a folder this run made, gone: only a removal does that
                raise self._removed() from None
            self._check_in_place()
            raise

    def _commit(self) -> None:
        self._check_in_place()
        started = time.monotonic()
        self.manifest["updated"] = time.time()
        self.manifest["tile_count"] = sum(s["count"] for s in self.manifest["shards"])
        with self._writing_in_place():
            write_json_atomic(self.dir / MANIFEST, self.manifest)
        if self._in_place is not None:  # the lock and shards folder as checked: only the manifest is new
            self._in_place = (*self._in_place[:2], manifest_stamp(self.dir))
        self._last_commit = (time.monotonic(), time.monotonic() - started)
        self._uncommitted = False

    def _commit_when_due(self) -> None:
        """Commit what was computed since the last commit once COMMIT_EVERY_S (or COMMIT_SHARE
        times the last commit's seconds, at most COMMIT_AT_LEAST_EVERY_S) have passed; after every
        chunk when commit_every_s is 0."""
        ended, took = self._last_commit
        due = min(COMMIT_AT_LEAST_EVERY_S, max(self.commit_every_s, COMMIT_SHARE * took))
        if self.commit_every_s <= 0 or time.monotonic() - ended >= due:
            self._commit()

    def _commit_after_failure(self) -> None:
        """Commit what a failing run computed; a commit that fails too is logged, and the run's
        own error is what is raised."""
        if not self._uncommitted:
            return
        try:
            self._commit()
        except Exception as exc:
            log.warning("%s: what the run computed since its last commit could not be committed: %s", self.dir, exc)

    def _clean_uncommitted(self) -> None:
        """Remove the shard folders no commit names: what a crash left between writing a shard
        and committing it, and the shards of a raster dropped to be indexed again; the level
        maps and manifests a killed run left unfinished, and a killed shortlist build's folder.
        Only shard names (and their temporaries) and unfinished maps', manifests' and builds'
        names are removed; nothing else in the folder is touched. Older versions named each shard
        in a journal (`pending`) before writing it: a second manifest write a chunk, 71 ms at
        39,000 shards; a journal such an index holds is honoured."""
        committed = {s["name"] for s in self.manifest["shards"]}
        folder = self.dir / SHARDS
        written = [name.removeprefix(TMP_PREFIX) for name in (os.listdir(folder) if folder.is_dir() else [])]
        remove_shards(self.dir, {*self.manifest.get("pending", []), *written} - committed)
        remove_unfinished_maps(self.dir)
        remove_temporaries(self.dir, MANIFEST)  # a kill mid-commit's (4 MB at 10M tiles, one a kill: probe)
        from worker.ann import remove_unfinished_builds  # worker.ann reads indexes: imported here, no cycle

        remove_unfinished_builds(self.dir)
        if self.manifest.get("pending"):
            self.manifest["pending"] = []
            self._commit()

    def _repair_damage(self) -> list[dict]:
        """Make again what damage to a committed index lost, instead of refusing the index until
        it is deleted: a damaged shard (a truncated or overwritten file) is uncommitted, so that its
        raster is incomplete and this run computes its tiles again; a complete raster's damaged
        level map is joined again from its tiles. Returns the rasters' entries whose shards were
        uncommitted. A search of a damaged index fails saying to run `index`
        (worker.store.shard_file). Only headers and sizes are checked (a shard's, as opening the
        index checks them): the records are not read."""
        damaged = {}
        for shard in self.manifest["shards"]:
            try:
                self._check_shard(shard)
            except DamagedFile as exc:
                damaged[shard["name"]] = shard
                log.warning("%s: its %d tiles are computed again", exc.what, shard["count"] + shard["skipped"])
        entries = {entry["id"]: entry for entry in self.manifest["rasters"]}
        redone = {shard["raster_id"]: entries[shard["raster_id"]] for shard in damaged.values()}
        if damaged:
            self.manifest["shards"] = [s for s in self.manifest["shards"] if s["name"] not in damaged]
            for shard in damaged.values():
                entries[shard["raster_id"]]["tiles_skipped"] -= shard["skipped"]
            for entry in redone.values():
                entry["complete"] = False
            self._commit()
            for raster_id in redone:  # an incomplete raster's maps are never read (worker.store.maps.on_disk)
                remove_maps(self.dir, raster_id)
            self._clean_uncommitted()  # the damaged shards, no longer committed
        for entry in entries.values():
            wrong = damaged_map(self.dir, self.manifest, entry) if entry["complete"] else None
            if wrong:
                log.warning("%s: joining %s's level maps again from its tiles", wrong.what, entry["path"])
                self._write_maps(entry)
        return list(redone.values())

    def _check_shard(self, shard: dict) -> None:
        """DamagedFile when a committed shard's files do not hold what the manifest says:
        each array's header, rows and size, and the records' dtype (as TileIndex opens them: committed_array), or
        a file is missing. A file that cannot be read now (no access, a failing disk) stops the
        run (worker.store.shard_file.ShardArray.unreadable): a shard is made again only when damaged."""
        if shard["count"] == 0:  # empty tiles only: its records are never read
            return
        for key in shard_arrays(self.manifest):
            committed_array(str(self.dir / SHARDS), shard, key)

    def _also_redone(self, redone: list[dict], infos: list[RasterInfo], drivers: tuple[str, ...] | None
                     ) -> list[RasterInfo]:
        """The rasters whose damaged shards this run computes again though the request did not
        name them: each opened as the request's were; one that cannot be opened now is left
        incomplete, and the run says so."""
        asked = {info.path for info in infos}
        more = []
        for entry in redone:
            if entry["path"] in asked:
                continue
            try:
                more += open_rasters([Path(entry["path"])], self.settings.bands, drivers)
            except InputError as exc:
                log.warning("%s: its damaged tiles cannot be computed again now (%s): index it again once it can be "
                            "read", entry["path"], exc)
        return more

    def _write_maps(self, entry: dict) -> None:
        """A complete raster's level maps, joined from a view of it alone and its shards (a view
        of every raster read each one's entry: the square of the rasters over a run)."""
        index = TileIndex(self.dir, {**self.manifest, "rasters": [entry]},
                          [s for s in self.manifest["shards"] if s["raster_id"] == entry["id"]])
        if len(index):
            write_joined_maps(index)
        else:  # complete, and nothing in it a search could find
            window = self.settings.tile * min(self.settings.scales)  # the smallest a tile covers of the raster
            fits = min(entry["width"], entry["height"]) >= window  # else: too small or thin for a tile
            log.warning("%s: none of its %d tiles holds enough data (at least %.0f%% of a window of %d px) to be "
                        "indexed; %s", entry["path"], entry["tiles_total"] or 0, 100 * self.settings.min_valid,
                        window, "it is nodata (or masked) where a tile falls" if fits else
                        "a raster smaller or thinner than a tile needs a smaller --tile (or --scales 1)")

    def _without_stale_stretch(self, infos: list[RasterInfo], recorded: dict[str, RasterInfo],
                               drivers: tuple[str, ...] | None) -> list[RasterInfo]:
        """`infos` with those whose stretch came from a record (open_raster's `recorded`, read
        before the lock) that another run removed meanwhile opened again: the record may be an
        older version's (a dark 8-bit raster unstretched), and would come back as a new entry."""
        held = {entry["path"] for entry in self.manifest["rasters"]}
        return [open_raster(Path(info.path), self.settings.bands, drivers)
                if info.path in recorded and info.path not in held else info for info in infos]

    def _raster_entry(self, info: RasterInfo) -> dict:
        for entry in self.manifest["rasters"]:
            if entry["path"] == info.path:
                recorded = RasterInfo.from_json(entry)
                if recorded.changed_since(info):  # info: the raster opened afresh
                    self._drop_raster(entry["id"])
                    entry.update(info.to_json(), complete=False, tiles_total=None, tiles_skipped=0)
                    # said: a run indexing the whole raster again said nothing of it (a probe's), even with -v
                    log.warning("%s: changed on disk since it was indexed: indexing it again, whole", info.path)
                elif info.sources is not None and len(info.sources) > len(recorded.sources or ()):
                    entry["sources"] = list(info.sources)  # stamped before its VRTs' files were: from now on, with
                return entry
        entry = {"id": max((r["id"] for r in self.manifest["rasters"]), default=-1) + 1, **info.to_json(),
                 "complete": False, "tiles_total": None, "tiles_skipped": 0}
        self.manifest["rasters"].append(entry)
        return entry

    def _chunks(self, tiles: int) -> int:
        """How many chunks a raster's plan of `tiles` tiles is written in."""
        return (tiles + self.chunk_tiles - 1) // self.chunk_tiles

    def _drop_raster(self, raster_id: int) -> None:
        remove_maps(self.dir, raster_id)
        self.manifest["shards"] = [s for s in self.manifest["shards"] if s["raster_id"] != raster_id]
        self._commit()
        self._clean_uncommitted()  # its shards, no longer committed

    def build(self, raster_paths: list[Path], progress: Callable[[IndexProgress], None] | None = None,
              should_stop: Callable[[], bool] = lambda: False, batch_size: int = 16,
              drivers: tuple[str, ...] | None = None, computer: "ChunkComputer | None" = None) -> dict:
        """Index every raster not yet (fully) indexed; returns the manifest.

        `should_stop` is polled between batches: returning True stops after the last commit
        (cancel), leaving a resumable index. A chunk whose tiles cannot be read (RasterReadError:
        a damaged block, a file gone meanwhile) is left out and the others computed: the run then
        ends in UnreadRasters, everything else committed, and the next run tries it again.
        `drivers` limits the GDAL drivers that may read the rasters (a service client's request).
        `computer` computes the chunks (default: here, one after another; worker.distributed: on a
        cluster); this writer alone commits them.
        """
        computer = computer or LocalChunks(self.model)
        # bad input refused up front, before a new index's folder is made: a refused run left one behind
        recorded = {entry["path"]: RasterInfo.from_json(entry) for entry in self.manifest["rasters"]}  # as last read
        infos = open_rasters(raster_paths, self.settings.bands, drivers, threads=min(OPEN_THREADS, usable_cores()),
                             recorded=recorded)
        given, added = {info.path for info in infos}, [i for i in infos if i.path not in recorded]
        for said in read_twice(added, [r for path, r in recorded.items() if path not in given]):
            log.warning("%s", said)
        for said in copies(added, list(recorded.values())):
            log.warning("%s", said)
        with index_lock(self.dir):
            # read again under the lock: another run may have committed since this writer was made,
            # and cleaning against an older manifest would remove the shards it committed
            self.manifest = self._load_or_create(*self._asked)
            self.chunk_tiles = self.manifest["chunk_tiles"]
            with disk_write(self.dir / SHARDS):
                (self.dir / SHARDS).mkdir(exist_ok=True)
            self._in_place = self._index_as_written()
            self._clean_uncommitted()
            # a killed removal's: once a run, not at each raster dropped (150,000 maps took 0.45 s to list)
            remove_maps_of_no_raster(self.dir, {entry["id"] for entry in self.manifest["rasters"]})
            infos = self._without_stale_stretch(infos, recorded, drivers)
            infos = infos + self._also_redone(self._repair_damage(), infos, drivers)
            plans = []
            for info in infos:
                entry = self._raster_entry(info)
                tiles = plan_tiles(RasterInfo.from_json(entry), self.settings)
                entry["tiles_total"] = len(tiles)
                plans.append((entry, tiles))
            self._commit()
            total = sum(len(t) for _, t in plans)
            jobs, done = [], 0
            for entry, tiles in plans:
                committed = {s["chunk"] for s in self.manifest["shards"] if s["raster_id"] == entry["id"]}
                for chunk in range(self._chunks(len(tiles))):
                    start, stop = chunk * self.chunk_tiles, min(len(tiles), (chunk + 1) * self.chunk_tiles)
                    if entry["complete"] or chunk in committed:
                        done += stop - start
                    else:
                        jobs.append(ChunkJob(entry["id"], chunk, entry, tiles, start, stop, holds_tokens(self.manifest)))
            skipped_total = sum(e["tiles_skipped"] for e, _ in plans)
            remaining = {e["id"]: 0 for e, _ in plans}
            for job in jobs:
                remaining[job.raster_id] += 1
            entries = {e["id"]: e for e, _ in plans}
            self._mark_complete([entries[i] for i, n in remaining.items() if n == 0 and not entries[i]["complete"]])

            reported = None

            def report(tiles_done: int, path: str) -> None:
                """A chunk's last batch and its commit tell the same count: said once."""
                nonlocal reported
                if progress and reported != (tiles_done, skipped_total):
                    reported = (tiles_done, skipped_total)
                    progress(IndexProgress(tiles_done, total, skipped_total, path))

            def batch_done(n: int, path: str) -> None:
                report(done + n, path)

            if jobs:  # the run's size before its first tile: a cluster's first chunk of 256 takes a minute or so
                report(done, jobs[0].raster["path"])
            stopped = False
            unread: dict[int, tuple[RasterReadError, int]] = {}  # by raster id: its first read error, chunks left out
            try:
                for job, result in computer.run(jobs, self.settings, batch_size, should_stop, batch_done):
                    if result is None:  # stopped: what was computed is committed below
                        stopped = True
                        break
                    entry = entries[job.raster_id]
                    if isinstance(result, RasterReadError):  # left for the next run; the raster stays incomplete
                        first, left_out = unread.get(job.raster_id, (None, 0))
                        if first is None:  # said once a raster: a file gone fails each of its chunks
                            log.warning("%s; the run goes on without that chunk", result)
                            first = result.with_traceback(None)  # not the frames (and arrays) it was raised in
                        unread[job.raster_id] = (first, left_out + 1)
                        done += job.count
                        report(done, entry["path"])
                        continue
                    self._commit_chunk(entry, job.chunk, job.count, result)
                    skipped_total += result.skipped
                    remaining[job.raster_id] -= 1
                    if remaining[job.raster_id] == 0:
                        self._mark_complete([entry], commit=False)
                    self._commit_when_due()
                    done += job.count
                    report(done, entry["path"])
            except BaseException:  # failed: what was computed is committed, and the error is the run's
                self._commit_after_failure()
                raise
            if self._uncommitted:
                self._commit()
            if stopped:
                return self.manifest
            # a run that changed nothing leaves it: written again, a 10M-tile layer took minutes
            if tiles_layer_state(self.dir, self.manifest) != CURRENT:
                with disk_write(self.dir / TILES_LAYER):
                    write_tiles_gpkg(self.dir)
            if unread:
                raise UnreadRasters([(entries[i]["path"], left_out, self._chunks(entries[i]["tiles_total"]), first)
                                     for i, (first, left_out) in unread.items()], len(plans))
            return self.manifest

    def _mark_complete(self, entries: list[dict], commit: bool = True) -> None:
        """Mark rasters complete, once their level maps are on disk (worker.store.maps)."""
        if not entries:
            return
        self._check_in_place()
        with stops_held(), self._writing_in_place():  # written with numpy too (_commit_chunk)
            for entry in entries:
                self._write_maps(entry)
                entry["complete"] = True
        if commit:
            self._commit()

    def _commit_chunk(self, entry: dict, chunk: int, tiles: int, result: "ChunkResult") -> None:
        """Write a computed chunk as a shard (committed by the caller; one a crash leaves before
        the commit is removed by the next run: _clean_uncommitted)."""
        name = shard_name(entry["id"], chunk)
        self._check_in_place()
        # a Ctrl-C or SIGTERM raised inside numpy's write came out as numpy's TypeError (it takes
        # the failed flush for a file name): the run's traceback, not "terminated". Held until written.
        with stops_held(), self._writing_in_place():
            write_shard(self.dir, name, result.arrays)
            self.manifest["shards"].append({"name": name, "raster_id": entry["id"], "chunk": chunk,
                                            "count": tiles - result.skipped, "skipped": result.skipped})
            entry["tiles_skipped"] += result.skipped  # with its shard: a stop held till here commits both
            self._uncommitted = True


class UnreadRasters(InputError):
    """A run that indexed all it could, but not every chunk of some rasters: their tiles could
    not be read (RasterReadError). What was read is committed and searchable; those rasters stay
    partly indexed until a run reads them whole. A file repaired or replaced since is changed to
    the index, and indexed anew (worker.tiling.changed_since); one unchanged, as after a passing
    network error, keeps the chunks read."""

    def __init__(self, unread: list[tuple[str, int, int, RasterReadError]], rasters: int):
        """`unread`: (path, chunks left out, its chunks, the first of their errors) per raster."""
        named = numbered([f"{error} ({left} of {chunks} chunks left out)" for _, left, chunks, error in unread], "; ")
        which = "the run's raster" if rasters == 1 else f"{len(unread)} of the run's {rasters} rasters"
        it, the_file = ("it", "the file") if len(unread) == 1 else ("them", "the files")
        super().__init__(f"{which} could not be read whole: {named}. What could be read is indexed and "
                         f"searchable. Index {it} again once {the_file} can be read (a file repaired or replaced "
                         f"since is indexed anew, one unchanged keeps the chunks read), or take {it} out of the "
                         f"index ({REMOVE_HOW})")
        self.paths = tuple(path for path, *_ in unread)


@dataclass(frozen=True)
class ChunkJob:
    """One chunk of one raster's tile plan: what a computer turns into a shard's arrays."""

    raster_id: int
    chunk: int
    raster: dict  # the raster's manifest entry (RasterInfo's JSON): enough to read it anywhere
    plan: TilePlan  # the raster's, of which this chunk is the tiles start to stop
    start: int
    stop: int
    tokens: bool  # store the tiles' ViT tokens too (the index's choice: worker.store.format.holds_tokens)

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def tiles(self) -> list[Tile]:
        return self.plan[self.start:self.stop]


@dataclass
class ChunkResult:
    arrays: dict[str, np.ndarray]  # a shard's arrays (worker.store.format.SHARD_ARRAYS)
    skipped: int  # tiles left out as mostly empty


class ChunkComputer(Protocol):
    def run(self, jobs: list[ChunkJob], settings: TileSettings, batch_size: int, should_stop: Callable[[], bool],
            batch_done: Callable[[int, str], None]) -> Iterator[tuple[ChunkJob, ChunkResult | RasterReadError | None]]:
        """Yield each job with its result, in any order, or the RasterReadError that left it out
        (the other jobs still computed); a None result means stop now."""


class LocalChunks:
    """Chunks computed here, one after another, with progress after every batch. Tiles are read,
    drawn and described in `processes` other processes while this one encodes (None: none on a
    GPU, else as default_processes says for the run's index and size; 0: none); without them, on
    a GPU, drawn there and read in threads ahead (worker.drawing_pool.DeviceDrawing), else here
    on the CPU."""

    def __init__(self, model, processes: int | None = None):
        self.model = model
        self.processes = processes

    def run(self, jobs, settings, batch_size, should_stop, batch_done):
        device = drawing_device(self.model.device)
        processes = self.processes
        if processes is None:  # a GPU draws its own tiles
            processes = 0 if device is not None else default_processes(any(job.tokens for job in jobs),
                                                                        sum(job.count for job in jobs))
        pool: DrawingPool | DeviceDrawing | None = None
        if jobs and processes:
            pool = DrawingPool(processes)
        elif jobs and device is not None:
            pool = DeviceDrawing(device)
        handles = run_handles()  # drawn here: the rasters kept open from chunk to chunk, closed with the run
        try:
            work = ((drawing_job(self.model, job, settings), job.tiles) for job in jobs)  # tiles as needed
            each = pool.each_job(work, batch_size) if pool else \
                (drawn_batches(d, t, batch_size, handles=handles) for d, t in work)
            for job, batches in zip(jobs, each):
                if should_stop():
                    yield job, None
                    return
                try:
                    result = compute_chunk(self.model, job, settings, batch_size, should_stop,
                                           lambda n, _path=job.raster["path"]: batch_done(n, _path), batches)
                except RasterReadError as exc:
                    yield job, exc
                    continue
                yield job, result
                if result is None:
                    return
        finally:
            if pool is not None:
                pool.close()
            handles.close()


def drawing_job(model, job: ChunkJob, settings: TileSettings) -> DrawingJob:
    """How the CPU reads, draws and describes a chunk's tiles for `model`: the pixels its ViT
    encodes travel back only when the index stores tokens."""
    pixels = model.config.tile_view if job.tokens else None
    return DrawingJob(job.raster, model.img_size, settings.tile, settings.min_valid, pixels)


def stored_features(model, drawn: DrawnBatch) -> TileFeatures:
    """What the index stores of a drawn batch: its cells, and its ViT tokens (the model's device)
    when the pixels for them came with it."""
    if drawn.pixels is None:
        return TileFeatures(drawn.cells, drawn.cell_origins)
    out = model.tile_tokens(drawn.pixels)
    return TileFeatures(drawn.cells, drawn.cell_origins, out.global_token, out.tokens, out.positions)


def compute_chunk(model, job: ChunkJob, settings: TileSettings, batch_size: int,
                  should_stop: Callable[[], bool] = lambda: False,
                  batch_done: Callable[[int], None] = lambda n: None,
                  batches: Iterator[tuple[int, DrawnBatch]] | None = None) -> ChunkResult | None:
    """Read, draw and encode one chunk's tiles (None when stopped between batches). Runs
    wherever the model and the raster files are: this process or a cluster's worker. `batches`:
    the chunk's batches drawn elsewhere (a DrawingPool), else they are drawn here."""
    kept: list[Tile] = []
    valid: list[float] = []
    outputs: list[TileFeatures] = []
    if batches is None:
        batches = drawn_batches(drawing_job(model, job, settings), job.tiles, batch_size, drawing_device(model.device))
    for n, drawn in batches:
        if should_stop():
            return None
        if drawn.tiles:
            kept += drawn.tiles
            valid += drawn.valid_share
            outputs.append(stored_features(model, drawn))
        batch_done(n)  # progress within the chunk (its shard is written at its end)
    return _chunk_result(job, kept, valid, outputs)


def _chunk_result(job: ChunkJob, kept: list[Tile], valid: list[float], outputs: list[TileFeatures]) -> ChunkResult:
    """A chunk's encoded tiles as a shard's arrays."""
    records = np.zeros(len(kept), RECORD_DTYPE)
    records["raster_id"] = job.raster_id
    for field_name in ("col_off", "row_off", "width", "height", "scale"):
        records[field_name] = [getattr(t, field_name) for t in kept]
    records["valid"] = valid
    records["bounds4326"] = bounds_wgs84(kept)
    arrays = {"records": records}  # a shard of empty tiles holds its records only (readers skip it)
    if outputs:
        origins = np.concatenate([o.cell_origin for o in outputs])
        for i, f in enumerate(level_maps.CELL_ORIGIN_FIELDS):
            records[f] = origins[:, i]
        arrays["cells"] = np.concatenate([o.cells for o in outputs])
        if job.tokens:
            arrays.update({"global": np.concatenate([o.global_token for o in outputs]),
                           "tokens": np.concatenate([o.tokens for o in outputs]),
                           "positions": np.concatenate([o.positions for o in outputs])})
    return ChunkResult(arrays, job.count - len(kept))
