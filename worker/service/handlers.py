"""The protocol's ops: each reads and types its fields, makes a request of worker.app and
returns the reply's fields. Errors are raised (ProtocolError, InputError) and answered by the
loop, so a handler reads as the happy path."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from wire import job_states as states
from wire import protocol
from wire.errors import BAD_REQUEST, BUSY, FORBIDDEN, NOT_FOUND, ProtocolError
from wire.protocol import MAX_RASTER_ENTRIES, MAX_STROKE_POINTS, MAX_STROKES, excerpt, field, new_id
from worker import __version__
from worker.ann import ANN_DIR
from worker.app import (IndexRequest, RemovalRequest, SearchRequest, SketchSource, check_index, check_manifest,
                        given, search_as_it_is, stroke_sketch)
from worker.cancellation import SearchStopped, StopCheck, raise_if_stopped, stop_when
from worker.errors import CorruptIndexError, InputError, NotFoundError
from worker.example_query import Example
from worker.feedback import Feedback
from worker.service.config import ServiceConfig
from worker.service.indexes import MANIFEST, OpenIndexes, index_dirs
from worker.service.jobs import Job, JobManager
from worker.service.paths import TRASH_PREFIX
from worker.store.format import (JOB_LOCK, SHARDS, IndexLocked, held_job_lock, holds_an_index, index_lock,
                                 locked_by_another, manifest_stamp, read_manifest)
from worker.store.maps import MAPS
from worker.store.reader import TileIndex
from worker.tiling import TileSettings

Handler = Callable[[dict, list], dict]
INDEX_FOLDERS = {SHARDS, MAPS, ANN_DIR}  # an index's own folders: no index inside them
EXAMPLE_FIELDS = {"raster", "bbox", "crs"}  # a search's `example`
# a slow op's work, run off the loop until its stop check says so: its answer, or what makes the
# answer on the loop's thread (an index request's: its job is started there, as every job is)
Work = Callable[[StopCheck], "dict | Callable[[], dict]"]

log = logging.getLogger(__name__)


class Handlers:
    """Every op of the protocol, by name."""

    # slow ops: checked on the loop's thread, run in threads of their own (worker.service.loop).
    # Listing opens every index not yet open (5.5 s for a 10M-tile index's 39,000 shards), and an
    # index request looks at every file of the folders it names (10.6 s for 60,000 files) and
    # opens the index it extends: on the loop, pings and job events waited.
    POOLED = frozenset({"search", "list_indexes", "index"})

    def __init__(self, config: ServiceConfig, model, jobs: JobManager, indexes: OpenIndexes):
        self.config = config
        self.model = model
        self.jobs = jobs
        self.indexes = indexes
        self.started = time.time()
        self._ops: dict[str, Handler] = {"ping": self.ping, "info": self.info, "job": self.job,
                                         "cancel": self.cancel, "delete_index": self.delete_index,
                                         "remove_rasters": self.remove_rasters}
        self._pooled: dict[str, Callable[[dict, list], Work]] = {"search": self.search,
                                                                  "list_indexes": self.list_indexes,
                                                                  "index": self.index}
        assert set(self._pooled) == self.POOLED and set(self._ops) | self.POOLED == set(protocol.OPS), \
            "every op of the protocol has a handler"

    def __call__(self, op: str, header: dict, frames: list) -> dict:
        """Answer a quick op."""
        return self._ops[op](header, frames)

    def prepare(self, op: str, header: dict, frames: list) -> Work:
        """Read and check a slow op now (a bad one is refused at once); the work returned keeps
        what it needs of the message, nothing more, and runs off the loop (worker.service.loop)."""
        return self._pooled[op](header, frames)

    # -- about the worker -----------------------------------------------------------------------
    def ping(self, header: dict, frames: list) -> dict:
        return {"pong": time.time()}

    def info(self, header: dict, frames: list) -> dict:
        paths = self.config.paths
        return {"version": __version__, "protocol": protocol.VERSION, "model": self.model.fingerprint(),
                "device": str(self.model.device), "cuda": self.model.device.type == "cuda", "pub": self.config.pub,
                "index_roots": [str(p) for p in paths.index_roots], "raster_roots": [str(p) for p in paths.raster_roots],
                "loaded_indexes": [str(p) for p in self.indexes.loaded()],
                "tiling_defaults": TileSettings().to_json(),  # what an index request leaves out
                "limits": asdict(self.config.limits),
                "uptime_s": round(time.time() - self.started, 1), "host": socket.gethostname()}

    def list_indexes(self, header: dict, frames: list) -> Work:
        """Every index in the index root; one that cannot be read is listed with its error, the
        others as usual. One deleted while the list is made is left out."""
        paths = self.config.paths

        def work(should_stop: StopCheck) -> dict:
            out = []
            for index_dir in index_dirs(paths.index_root):
                if should_stop():
                    raise SearchStopped("listing the next index", "listing the indexes stopped: it ran past the "
                                        "worker's time limit (--search-timeout), or the worker is stopping")
                status = self.indexes.status(index_dir)
                if status["error"] is not None and not holds_an_index(index_dir):
                    continue  # deleted meanwhile (delete_index runs on the loop): not damage
                running = self.jobs.running_for(index_dir)
                last = self.jobs.last_for(index_dir)
                out.append({"name": paths.index_name(index_dir), **status,
                            "job": running.id if running else None, "last_job": last.to_json() if last else None})
            listed = {item["path"] for item in out}
            out += [_not_begun(paths.index_name(job.index_dir), job) for job in self.jobs.active()
                    if job.kind == "index" and str(job.index_dir) not in listed
                    and job.index_dir.is_relative_to(paths.index_root)]  # not one resumed in another root
            return {"indexes": sorted(out, key=lambda item: Path(item["path"]))}

        return work

    # -- indexing -------------------------------------------------------------------------------
    def index(self, header: dict, frames: list) -> Work:
        """Start a job (or return the one running for this index when it asks the same: a resent
        request is safe; `busy` when it asks other work); the folder and the rasters are checked
        first, confined to the worker's roots, and the index it extends opened, off the loop; the
        job is started on the loop (_start_job)."""
        paths = self.config.paths
        name = field(header, "index", str)
        rasters = field(header, "rasters", list, check=lambda v: v and all(isinstance(p, str) for p in v))
        if len(rasters) > MAX_RASTER_ENTRIES:
            raise InputError(f"rasters has {len(rasters):,} entries; at most {MAX_RASTER_ENTRIES:,}: name their folders "
                             "(searched recursively) or a VRT of them instead")
        index_dir = paths.index_dir(name)
        asked = dict(
            tile=field(header, "tile", int, None), overlap=field(header, "overlap", (int, float), None),
            scales=field(header, "scales", list, None, check=lambda v: bool(v) and _ints(v)),
            bands=field(header, "bands", list, None, check=_ints),
            min_valid=field(header, "min_valid", (int, float), None), chunk_tiles=field(header, "chunk_tiles", int, None),
            ann=field(header, "ann", bool, None), tokens=field(header, "tokens", bool, None))
        request_id = header.get("id")  # a resent copy's is the first's

        def work(should_stop: StopCheck) -> Callable[[], dict]:
            seen = _as_checked(self.jobs, index_dir)  # before the checks: what changes during them is seen
            running = self.jobs.running_for(index_dir)  # its folder holds a half-written shard: not checked as new
            try:
                request = IndexRequest.create(index_dir, rasters, access=paths.raster_access,
                                              check_folder=running is None, **asked)
                if running is None:
                    self._check_extendable(request)  # refused now, not as a failed job later
            except FileNotFoundError:  # the index deleted as it was read
                raise _changed_meanwhile(name) from None
            return lambda: self._start_job(name, request, running, seen, request_id)

        return work

    def _start_job(self, name: str, request: IndexRequest, running: Job | None, seen: tuple,
                   request_id: str | None) -> dict:
        """An index request's job, on the loop's thread (as delete_index and remove_rasters look
        at jobs: none starts between their check and their work): the one running for the index
        joined, else a new one where nothing changed the index since the request was checked
        (`running` then, `seen`: _as_checked). Checked beside the loop, a request to extend an
        index deleted meanwhile started a job building it again from nothing. `joined`: the job
        was started by another request than this one (`request_id`; a resent copy is this one),
        so a client's Cancel can leave it to whoever started it."""
        now = self.jobs.running_for(request.index_dir)
        if now is not None:  # never a new job here
            job = self.jobs.joined(now, name, request)
            return {"job": job.to_json(), "joined": request_id is None or job.started_by != request_id}
        if running is not None or _as_checked(self.jobs, request.index_dir) != seen:
            raise _changed_meanwhile(name)
        if locked_by_another(request.index_dir):
            raise _written_elsewhere(name, "ask again")
        return {"job": self.jobs.start(name, request, started_by=request_id).to_json(), "joined": False}

    def delete_index(self, header: dict, frames: list) -> dict:
        """Remove an index's folder: only a folder that is an index (it has the manifest), inside
        the index root, holding no other index, and never while a job writes to it."""
        paths = self.config.paths
        name = field(header, "index", str)
        index_dir = paths.index_dir(name)
        if index_dir == paths.index_root:
            raise ProtocolError(FORBIDDEN, "the index root itself cannot be deleted: name an index inside it")
        running = self.jobs.running_for(index_dir)
        if running is not None:
            raise ProtocolError(BUSY, f"index {name!r} is {running.doing()}: {running.then()}, then delete the index")
        if locked_by_another(index_dir, JOB_LOCK):
            raise ProtocolError(BUSY, f"index {name!r} has an indexing job queued or running in another worker "
                                      "sharing the index root: wait for it to end, then delete the index")
        if not holds_an_index(index_dir):
            raise ProtocolError(NOT_FOUND, f"no index {name!r} in the index root (a folder with {MANIFEST})")
        inner = [paths.index_name(d) for sub in index_dir.iterdir()
                 if sub.is_dir() and not sub.is_symlink() and sub.name not in INDEX_FOLDERS for d in index_dirs(sub)]
        if inner:
            raise ProtocolError(FORBIDDEN, f"index {name!r} holds other indexes ({', '.join(inner)}): delete them first")
        # handlers run on the loop's thread, as jobs are started: no job can start between the check and here;
        # the index's lock keeps out a writer of another process (a command-line run, `build-ann`)
        trash = paths.index_root / f"{TRASH_PREFIX}{new_id()}"  # a short name: any index name fits
        try:  # held while it is moved: no other worker's job queued meanwhile has its job file moved away
            job_lock = held_job_lock(index_dir, patience_s=0)  # on the loop's thread: never waited for
            if job_lock is None:
                raise IndexLocked(str(index_dir))
            with job_lock, index_lock(index_dir, patience_s=0):
                self.indexes.delete(index_dir, trash)
        except IndexLocked:
            raise _written_elsewhere(name, "delete the index") from None
        except OSError as exc:
            raise ProtocolError(BUSY, f"index {name!r} cannot be moved away to be deleted ({excerpt(str(exc))}); it is "
                                      "left whole: close what holds its files (its tiles layer in QGIS) and delete it "
                                      "again") from None
        for parent in index_dir.parents:  # deleting "coast/2024" left an empty "coast", listed as nothing
            if parent == paths.index_root or not parent.is_relative_to(paths.index_root):
                break
            try:
                parent.rmdir()  # only an empty one
            except OSError:
                break
        return {"deleted": name}

    def remove_rasters(self, header: dict, frames: list) -> dict:
        """Start a job taking rasters out of an index (named as list_indexes lists them, matched
        exactly: no path of the client's is looked up on disk). A resent request whose first
        reply was lost is answered with its job, running or done."""
        name = field(header, "index", str)
        rasters = field(header, "rasters", list, check=lambda v: v and all(isinstance(p, str) for p in v))
        if len(rasters) > MAX_RASTER_ENTRIES:
            raise InputError(f"rasters has {len(rasters):,} entries; at most {MAX_RASTER_ENTRIES:,}")
        index_dir = self.config.paths.index_dir(name)
        request = RemovalRequest(index_dir, tuple(rasters))
        running = self.jobs.running_for(index_dir)
        if running is not None:
            return {"job": self.jobs.joined(running, name, request).to_json()}
        if not holds_an_index(index_dir):
            raise ProtocolError(NOT_FOUND, f"no index {name!r} in the index root (a folder with {MANIFEST})")
        held = {entry["path"] for entry in read_manifest(index_dir)["rasters"]}
        unknown = [path for path in rasters if path not in held]
        if unknown:
            last = self.jobs.last_for(index_dir)
            if last is not None and last.state == states.DONE and last.request is not None \
                    and last.request.same_work(request) and not held & set(rasters):
                return {"job": last.to_json()}  # done already: its reply was lost
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise InputError(f"index {name!r} holds no raster {excerpt(unknown[0])}{more}: name rasters as "
                             "list_indexes lists them")
        if locked_by_another(index_dir, JOB_LOCK) or locked_by_another(index_dir):
            raise _written_elsewhere(name, "ask again")
        return {"job": self.jobs.start(name, request).to_json()}

    def _check_extendable(self, request: IndexRequest) -> None:
        """IndexMismatchError for an index the request cannot extend. One whose shards or maps
        are damaged is judged by its manifest: its searches' corrupt_index says to index its
        rasters again, and this request was refused with that same error (a damaged manifest
        still is: nothing can mend it)."""
        try:
            index = self.indexes.get(request.index_dir)
        except NotFoundError:
            return  # a new index
        except CorruptIndexError:
            check_manifest(read_manifest(request.index_dir), request.index_dir, self.model, request.settings,
                           request.tokens)
            return
        check_index(index, self.model, request.settings, request.tokens)

    def _job(self, header: dict) -> Job:
        job_id = field(header, "job", str)
        job = self.jobs.get(job_id)
        if job is None:
            raise ProtocolError(NOT_FOUND, f"no job {job_id!r} on this worker (jobs are forgotten when it restarts)")
        return job

    def job(self, header: dict, frames: list) -> dict:
        return {"job": self._job(header).to_json()}

    def cancel(self, header: dict, frames: list) -> dict:
        """Cancel an indexing job (a search is cancelled by the loop, which holds it)."""
        if "job" not in header:
            raise ProtocolError(BAD_REQUEST, "cancel takes `job` (an indexing job's id) or `search` (the id of a "
                                             "search this connection sent)")
        return {"job": self._job(header).cancel()}

    # -- search ---------------------------------------------------------------------------------
    def search(self, header: dict, frames: list) -> Work:
        """The search's fields, sketch, CRSs and box are checked here; the work opens the index
        and searches it, stopping between stages once its stop check says so."""
        index_dir = self.config.paths.index_dir(field(header, "index", str))
        example = _example(header)
        feedback = field(header, "feedback", dict, None)
        bbox = field(header, "bbox", list, None, check=_four_numbers)
        request = SearchRequest(None if example else _sketch(header, frames), example=example,
                                feedback=None if feedback is None else Feedback.from_json(feedback),
                                access=self.config.paths.raster_access, **given(
            top=field(header, "top", int, None), shortlist=field(header, "shortlist", int, None),
            max_overlap=field(header, "max_overlap", (int, float), None), crs=field(header, "crs", str, None),
            # read only where they count, so a reply's `ignored` names them otherwise: a `bbox_crs` without
            # its `bbox`, or `crop_to_ink` of an example, which is drawn as it is, were taken unsaid (probe)
            bbox=bbox, bbox_crs=field(header, "bbox_crs", str, None) if bbox is not None else None,
            crop_to_ink=field(header, "crop_to_ink", bool, None) if example is None else None,
            ranker=field(header, "ranker", str, None), token_weight=field(header, "token_weight", (int, float), None),
            ann=field(header, "ann", str, None)))

        def work(should_stop: StopCheck) -> dict:
            started = time.perf_counter()
            with stop_when(should_stop):
                raise_if_stopped("opening the index")  # it waited in the queue past its time
            def as_it_is_now(_outdated: TileIndex | None = None) -> TileIndex:
                return self._searchable(index_dir, header["index"])

            try:
                reply = search_as_it_is(request, self.model, as_it_is_now(), as_it_is_now, f"index {header['index']!r}",
                                        should_stop).to_json()
            except CorruptIndexError:
                self.indexes.forget(index_dir)  # opened (and checked) again by the next search
                raise
            reply["timings_ms"]["server_ms"] = round((time.perf_counter() - started) * 1e3, 2)
            return reply

        return work

    def _searchable(self, index_dir: Path, name: str) -> TileIndex:
        """The index to search; `busy` while its job has committed nothing yet (it was `not_found`,
        "build one with `index`", of an index the user had just asked to build)."""
        try:
            return self.indexes.searchable(index_dir)
        except NotFoundError:
            job = self.jobs.running_for(index_dir)
            if job is None and not holds_an_index(index_dir):  # was the command line's "<server path> is not an index"
                raise NotFoundError(f"index {name!r} does not exist (deleted, or never built): list the indexes and "
                                    "choose another, or build it") from None
            if job is None:
                raise
            raise ProtocolError(BUSY, f"index {name!r} {_not_begun_because(job)}") from None


def _not_begun_because(job: Job) -> str:
    """Why a new index has nothing to search yet: its job has committed no tile."""
    when = ("waits behind other jobs: search again once it runs" if job.state == states.QUEUED
            else "has committed nothing yet: search again in a few seconds")
    return f"is being built by job {job.id}, which {when}"


def _not_begun(name: str, job: Job) -> dict:
    """How `list_indexes` lists a new index whose job has committed nothing yet (queued behind
    others, or just begun): its folder holds no manifest, and it was left out of the list, so the
    index a user had just asked for was nowhere to be seen beside the others, nor its job."""
    return {"name": name, "path": str(job.index_dir), "tiles_layer": None, "tile_count": 0, "rasters": [],
            "complete": False, "tiling": job.request.settings.to_json(), "tokens": bool(job.request.tokens),
            "compatible": False, "reason": f"nothing to search yet: it {_not_begun_because(job)}", "error": None,
            "job": job.id, "last_job": job.to_json()}


def _as_checked(jobs: JobManager, index_dir: Path) -> tuple:
    """What an index request was checked against: the index's manifest (a commit, a delete) and
    its last job here."""
    last = jobs.last_for(index_dir)
    return manifest_stamp(index_dir), last.id if last else None


def _changed_meanwhile(name: str) -> ProtocolError:
    """`busy`: the index was written, deleted, or had a job start or end while the request was checked."""
    return ProtocolError(BUSY, f"index {name!r} changed while this request was checked (a job wrote it, or it was "
                               "deleted): ask again")


def _written_elsewhere(name: str, then: str) -> ProtocolError:
    """`busy`: another process holds the index's lock."""
    return ProtocolError(BUSY, f"index {name!r} is being written by another process (a command-line `index` or "
                               f"`build-ann` run, or another worker's job): wait for it to end or stop it, then {then}")


def _example(header: dict) -> Example | None:
    """The example place of a search ({raster, bbox, crs}), or None; a sketch beside it is refused."""
    example = field(header, "example", dict, None)
    if example is None:
        return None
    if "sketch_frame" in header or "strokes" in header:
        raise ProtocolError(BAD_REQUEST, "give a sketch (sketch_frame or strokes) or an example, not both")
    unknown = sorted(set(example) - EXAMPLE_FIELDS)
    if unknown:  # e.g. a search's `bbox_crs` written here: the box was read in EPSG:4326, and the error spoke of that
        raise ProtocolError(BAD_REQUEST, f"example has no field {excerpt(', '.join(map(str, unknown)))}: it takes "
                                         f"{', '.join(sorted(EXAMPLE_FIELDS))} (its CRS is `crs`)")
    return Example(field(example, "raster", str), tuple(field(example, "bbox", list, check=_four_numbers)),
                   field(example, "crs", str, "EPSG:4326"))


def _sketch(header: dict, frames: list) -> SketchSource:
    """The sketch of a search: a PNG/JPEG payload frame, or strokes (not both: one would be dropped unsaid)."""
    if "sketch_frame" in header and "strokes" in header:
        raise ProtocolError(BAD_REQUEST, "give the sketch as sketch_frame or as strokes, not both")
    if "sketch_frame" in header:
        n = field(header, "sketch_frame", int)
        if not 1 <= n <= len(frames):
            raise ProtocolError(BAD_REQUEST, f"sketch_frame {n} but the message has {len(frames)} payload frame(s)")
        return frames[n - 1]
    if "strokes" not in header:  # was "field 'strokes' is required", to a search by example sent `example: null`
        raise ProtocolError(BAD_REQUEST, "search takes a sketch (sketch_frame or strokes) or an example; this one "
                                         "has none")
    strokes = field(header, "strokes", list)
    _count_strokes(strokes)  # before every point is looked at
    _check_strokes(strokes)
    return stroke_sketch(strokes, field(header, "strokes_crs", str, None),
                         field(header, "strokes_frame", list, None, check=_four_numbers))


def _count_strokes(strokes: list) -> None:
    """InputError for more strokes or points than the wire allows (worker.sketch checks the same)."""
    if len(strokes) > MAX_STROKES:
        raise InputError(f"sketch has {len(strokes)} strokes; at most {MAX_STROKES}: draw fewer")
    points = sum(len(s) for s in strokes if isinstance(s, list))
    if points > MAX_STROKE_POINTS:
        raise InputError(f"sketch has {points} points; at most {MAX_STROKE_POINTS}: draw fewer or simpler strokes")


def _ints(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _four_numbers(values: list) -> bool:
    """A bbox or frame: [x0, y0, x1, y1]."""
    return len(values) == 4 and all(_is_number(x) for x in values)


def _check_strokes(strokes: list) -> None:
    """`bad_request` unless the strokes are polylines of [x, y] numbers, naming the stroke and
    point at fault: "field 'strokes' has an invalid value" and an excerpt of the first strokes
    did not say that the fault was the seventh stroke, empty."""
    if not strokes:
        raise ProtocolError(BAD_REQUEST, "field 'strokes' has no strokes: draw at least one")
    for i, stroke in enumerate(strokes, 1):
        which = f"stroke {i} of {len(strokes)}"
        if not isinstance(stroke, list):
            raise ProtocolError(BAD_REQUEST, f"{which} must be a list of [x, y] points, got {type(stroke).__name__}")
        if not stroke:
            raise ProtocolError(BAD_REQUEST, f"{which} has no points: leave it out, or give it at least one [x, y]")
        for j, point in enumerate(stroke, 1):
            if not (isinstance(point, list) and len(point) == 2 and all(_is_number(c) for c in point)):
                raise ProtocolError(BAD_REQUEST, f"{which}, point {j} of {len(stroke)}: must be [x, y], two numbers, "
                                                 f"got {excerpt(point)}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
