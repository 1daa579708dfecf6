"""Background indexing jobs: a bounded queue, progress, cancel, and resume after the worker was killed.

A job indexes rasters into an index, or takes rasters out of one (its kind, `remove`): both
write the index, so they queue in the same line, one job per index at a time.

A job writes INDEX_DIR/job.json (its request) before it starts and removes it when it ends
(done, failed or cancelled), holding the index's JOB_LOCK from the one to the other, queued too:
workers sharing an index root never take up or remove each other's job file. A worker that
starts and finds a job file no worker holds resumes that job, or, when it
cannot (its rasters were moved, the file is damaged), lists it as failed with the reason and
serves on. A job the worker stops on SIGTERM ends `interrupted` and keeps its job.json for the
same reason. At most `max_jobs` jobs run at once; the others wait `queued`, up to
`max_queued_jobs` (more are refused `busy`): many jobs at once would only share the CPU and
memory, and slow every search.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from wire import job_states as states
from wire.errors import BUSY, ProtocolError
from wire.protocol import MAX_ID_CHARS, new_id
from worker.app import IndexRequest, RemovalRequest, build_index, remove_rasters
from worker.distributed import Cluster
from worker.errors import InputError, error_object
from worker.raster_access import OutsideRoots, RasterAccess
from worker.service.indexes import index_dirs
from worker.store import JOB_FILE, MANIFEST, IndexProgress, read_manifest, write_json_atomic
from worker.store.format import (JOB_LOCK, LOCK, disk_write, held_job_lock, holds_an_index, locked_by_another,
                                 remove_unborn)
from worker.tiling import RasterMissing

log = logging.getLogger(__name__)
KEPT_FOR_NEXT_START = "; the job is kept, and the worker's next start tries it again (or ask for the index again)"
SLOT_WAIT_S = 0.25  # how often a queued job looks whether it was cancelled
MAX_FINISHED_JOBS = 1000  # finished jobs remembered for the `job` op; older ones are forgotten


JobRequest = IndexRequest | RemovalRequest


class Job:
    """One indexing run (or removal) of one index, as the `job` op and progress events report it."""

    def __init__(self, index_name: str, index_dir: Path, request: JobRequest | None, job_id: str | None = None,
                 resumed: bool = False):
        self.id = job_id or new_id()  # a resumed job keeps its id (its job file's): a client follows it again
        self.index_name = index_name
        self.index_dir = index_dir
        self.request = request  # None for a job that could not be resumed
        self.kind = "remove" if isinstance(request, RemovalRequest) else "index"
        self.removed: list[str] | None = None  # a removal's rasters, as the index named them, once done
        self.state = states.QUEUED
        self.error: dict | None = None
        self.tiles_done = 0
        self.tiles_total = 0
        self.tiles_skipped = 0
        self.ann: dict | None = None  # what became of the approximate shortlist (IndexSummary.ann), once done
        self.without_tiles: list[str] = []  # its rasters with no tile a search can find, once done
        self.tile_count: int | None = None  # the tiles its index holds once it ended (its progress counts the run's)
        self.unfinished: list[str] = []  # the index's other rasters an earlier run left unfinished, once ended
        self.started = time.time()
        self.finished: float | None = None
        self.cancel_requested = threading.Event()
        self._starting = threading.Lock()  # a cancel and the job's start, one at a time (start, cancel)
        self.thread: threading.Thread | None = None
        self.job_lock = None  # the index's JOB_LOCK, held from the job's start to its end (JobManager.start)
        self.resumed = resumed  # restarted from the job file a stopped worker left (JobManager.resume_interrupted)
        self.started_by: str | None = None  # the id of the request that started it (None: resumed, a removal)
        self.kept = False  # its job file stays for the worker's next start: its rasters are not there now
        self._rate_start: tuple[float, int] | None = None  # (time, tiles done) the ETA's rate counts from

    def to_json(self) -> dict:
        fraction = self.tiles_done / self.tiles_total if self.tiles_total else (1.0 if self.state == states.DONE else 0.0)
        eta = None
        if self._rate_start and self.state == states.RUNNING:
            t0, n0 = self._rate_start
            rate = (self.tiles_done - n0) / max(1e-6, time.time() - t0)
            eta = (self.tiles_total - self.tiles_done) / rate if rate > 0 else None
        return {"id": self.id, "kind": self.kind, "index": self.index_name, "state": self.state,
                "progress": round(fraction, 4), "removed": self.removed,
                "tiles_done": self.tiles_done, "tiles_total": self.tiles_total, "tiles_skipped": self.tiles_skipped,
                "eta_s": round(eta, 1) if eta is not None else None, "error": self.error, "ann": self.ann,
                "without_tiles": self.without_tiles, "tile_count": self.tile_count, "unfinished": self.unfinished,
                "started": self.started, "finished": self.finished}

    def cancel(self) -> dict:
        """Ask the job to stop; what it is now, as the `cancel` op answers. Answered `queued`, it
        never runs: a removal cancelled while queued was then run (its slot came free as the
        cancel came), and its rasters removed (probe)."""
        with self._starting:
            self.cancel_requested.set()
            return self.to_json()

    def start(self) -> bool:
        """`running` from now, unless cancelled while it was queued (False)."""
        with self._starting:
            if self.cancel_requested.is_set():
                return False
            self.state = states.RUNNING
            return True

    def doing(self) -> str:
        """What the job does to its index, as a refusal says it."""
        return f"{'having rasters removed' if self.kind == 'remove' else 'being built'} by job {self.id}"

    def then(self) -> str:
        """What a refused client can do about the job (a removal running is one commit: no cancel)."""
        if self.kind == "remove" and self.state == states.RUNNING:
            return "wait for it to end (its shortlist, if any, is rebuilt last)"
        return "wait for it to end, or cancel it (it stops after its batch)"

    def on_progress(self, p: IndexProgress) -> None:
        if self._rate_start and self._rate_start[1] == 0 and self.tiles_done == 0:
            self._rate_start = (time.time(), p.tiles_done)  # the rate counts from the first chunk on
        self.tiles_done, self.tiles_total, self.tiles_skipped = p.tiles_done, p.tiles_total, p.tiles_skipped


class JobManager:
    """Runs each indexing job in its own thread; at most one job per index at a time, at most
    `max_jobs` at once."""

    def __init__(self, model, publish: Callable[[dict], None], access: RasterAccess = RasterAccess(),
                 max_jobs: int = 1, max_queued: int = 16, cluster: Cluster | None = None):
        self.model = model
        self.publish = publish  # called from job threads with the job's JSON after every change
        self.access = access  # what resumed jobs may read (the service's raster roots)
        self.cluster = cluster  # where jobs compute their tiles (None: in this process)
        self.max_queued = max_queued
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_jobs)
        self.stopping = threading.Event()

    def running_for(self, index_dir: Path) -> Job | None:
        """The job queued or running for an index, if any."""
        with self._lock:
            return next((j for j in self.jobs.values() if j.index_dir == index_dir and j.state in states.ACTIVE), None)

    def active(self) -> list[Job]:
        """The jobs queued or running."""
        with self._lock:
            return [j for j in self.jobs.values() if j.state in states.ACTIVE]

    def last_for(self, index_dir: Path) -> Job | None:
        """The latest job of an index this worker knows, running or ended (a failed resume included)."""
        with self._lock:
            return max((j for j in self.jobs.values() if j.index_dir == index_dir), key=lambda j: j.started,
                       default=None)

    def start(self, index_name: str, request: JobRequest, resumed: bool = False, job_id: str | None = None,
              started_by: str | None = None) -> Job:
        """Start a job, or return the one already running for this index when it asks the same work
        (so retries are safe). ProtocolError(BUSY) when a job for this index does other work or is
        being cancelled (before, the request was answered with that job and never done), or when
        `max_queued` jobs already wait (`resumed` jobs are never refused); InputError for an index
        folder inside or around one a job writes (it would be built inside the other index), as
        for one inside an index (worker.store.check_index_folder)."""
        existing = self.running_for(request.index_dir)
        if existing:
            return self.joined(existing, index_name, request)
        with self._lock:
            around = [j for j in self.jobs.values() if j.state in states.ACTIVE
                      and (j.index_dir in request.index_dir.parents or request.index_dir in j.index_dir.parents)]
            queued = sum(j.state == states.QUEUED for j in self.jobs.values())
        if around:
            raise InputError(f"index {index_name!r} would lie inside or around index {around[0].index_name!r}, which "
                             f"job {around[0].id} is building: choose another name")
        if not resumed and queued >= self.max_queued:
            raise ProtocolError(BUSY, f"{queued} indexing jobs are already waiting (the worker's limit): wait for "
                                      "one to end, or cancel one, and ask again")
        job = Job(index_name, request.index_dir, request, job_id, resumed)
        job.started_by = started_by
        # an index root the worker may not write in: `storage`, saying so, not `internal`
        then = "then ask again"
        with disk_write(request.index_dir, then):
            request.index_dir.mkdir(parents=True, exist_ok=True)
            job.job_lock = held_job_lock(request.index_dir)
        if job.job_lock is None:
            raise ProtocolError(BUSY, f"index {index_name!r} has an indexing job queued or running in another worker "
                                      "sharing the index root: wait for it to end, and ask again")
        try:
            if job.kind == "index":  # a removal is one commit, with nothing to resume
                with disk_write(request.index_dir, then):
                    # who started it outlives a restart: its resent request is not "another" (joined)
                    write_json_atomic(request.index_dir / JOB_FILE, {"index": index_name, "id": job.id,
                                                                      "started_by": started_by,
                                                                      **request.to_json()}, then)
            self._remember(job)
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"index-{job.id}", daemon=True)
            job.thread.start()
        except BaseException:  # never started: its lock is not held for the worker's life
            job.job_lock.close()
            raise
        return job

    @staticmethod
    def joined(existing: Job, index_name: str, request: JobRequest) -> Job:
        """`existing`, the job of the request's index, when the request asks the same work of it
        (a resent request, answered with that job even if it has just ended); ProtocolError(BUSY)
        when it asks other work, or the job is being cancelled."""
        if existing.cancel_requested.is_set():
            raise ProtocolError(BUSY, f"index {index_name!r}: its job {existing.id} is being cancelled (it stops "
                                      "after its batch); ask again once it has stopped")
        if existing.request is None or not existing.request.same_work(request):
            raise ProtocolError(BUSY, f"index {index_name!r} is {existing.doing()}, with other rasters or settings: "
                                      f"{existing.then()}, and ask again")
        return existing

    def _remember(self, job: Job) -> None:
        with self._lock:
            self.jobs[job.id] = job
            finished = [j for j in self.jobs.values() if j.state in states.FINISHED]
            for old in sorted(finished, key=lambda j: j.started)[:max(0, len(finished) - MAX_FINISHED_JOBS)]:
                del self.jobs[old.id]

    def resume_interrupted(self, index_roots: list[Path]) -> list[Job]:
        """Restart the jobs a killed or stopped worker left behind (their job.json is still
        there). One that cannot be resumed is remembered as failed, with its reason, and its
        job.json removed (what it committed stays; asking for the index again resumes it), or
        kept for the next start when its rasters are not there now (_failed_resume). Only
        indexes' job files are looked at: every job.json under the root was, another program's
        removed as a damaged job, and an index's being deleted (its trash folder) resumed there."""
        jobs = []
        for root in index_roots:
            for job_file in [d / JOB_FILE for d in index_dirs(root, (MANIFEST, JOB_LOCK)) if (d / JOB_FILE).is_file()]:
                index_name = _name_in(root, job_file.parent)
                if any(locked_by_another(job_file.parent, lock) for lock in (JOB_LOCK, LOCK)):  # another worker's job
                    log.info("not resuming the indexing job of %s: another worker sharing the index root has it",
                             job_file.parent)
                    continue
                try:
                    spec = json.loads(job_file.read_text())
                    if not isinstance(spec, dict):
                        raise InputError(f"{job_file} is damaged (not a JSON object)")
                    index_name = spec.get("index") if isinstance(spec.get("index"), str) else index_name
                    request = IndexRequest.from_json(job_file.parent, spec, self.access)
                # a damaged file (a field of the wrong type too: every start failed on it), rasters gone or
                # outside the roots; those not there now (a drive not plugged in, a root not given) kept to try again
                except (InputError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                    jobs.append(self._failed_resume(index_name, job_file, exc, kept=_not_there_now(exc)))
                    continue
                log.info("resuming the interrupted indexing job of %s", job_file.parent)
                try:
                    kept_id = spec.get("id") if isinstance(spec.get("id"), str) and len(spec["id"]) <= 64 else None
                    by = spec.get("started_by")
                    jobs.append(self.start(index_name, request, resumed=True, job_id=kept_id,
                                           started_by=by if isinstance(by, str) and len(by) <= MAX_ID_CHARS else None))
                except InputError as exc:  # its job.json cannot be written again (a full disk): serve on
                    jobs.append(self._failed_resume(index_name, job_file, exc))
                except ProtocolError:  # another worker took it since it was looked at: left to it
                    log.info("not resuming the indexing job of %s: another worker has just taken it", job_file.parent)
        return jobs

    def _failed_resume(self, index_name: str, job_file: Path, exc: Exception, kept: bool = False) -> Job:
        """A job that cannot be resumed, failed with its reason; its job file removed, or `kept`
        for the worker's next start (a job of rasters not there now was lost for good)."""
        job = Job(index_name, job_file.parent, None)
        reason = exc if isinstance(exc, InputError) else InputError(
            f"{job_file} is damaged or cannot be read ({str(exc)[:200]}): index again to finish the index")
        job.state, job.error, job.finished = states.FAILED, error_object(reason), time.time()
        if kept:
            job.error["message"] += KEPT_FOR_NEXT_START
        log.warning("not resuming the indexing job of %s: %s", job_file.parent, job.error["message"])
        try:
            if not kept:
                job_file.unlink(missing_ok=True)
        except OSError as exc:  # a read-only index root: the worker serves its indexes all the same
            log.warning("%s cannot be removed (%s): the next start tries it again", job_file, exc.strerror)
        self._remember(job)
        self.publish(job.to_json())
        return job

    def _wait_for_slot(self, job: Job) -> bool:
        """Wait `queued` until fewer than max_jobs run, then start the job; False (no slot held)
        when cancelled or stopping meanwhile, also as the slot comes free."""
        while not self._slots.acquire(timeout=SLOT_WAIT_S):
            if job.cancel_requested.is_set() or self.stopping.is_set():
                return False
        if not self.stopping.is_set() and job.start():
            return True
        self._slots.release()
        return False

    def _run(self, job: Job) -> None:
        if not self._wait_for_slot(job):
            self._finish(job, states.CANCELLED if job.cancel_requested.is_set() else states.INTERRUPTED)
            return
        ended: tuple[str, dict | None] = (states.FAILED, error_object(RuntimeError("the job's thread was stopped")))
        try:
            ended = self._build(job)
        finally:
            self._slots.release()
            self._finish(job, *ended)

    def _build(self, job: Job) -> tuple[str, dict | None]:
        """Run the job's indexing (or removal); returns how it ended (its state and error), which _finish
        makes known once the job's files are tidied: a client told `failed` found the folder of a
        job that failed before its first commit still there."""
        job._rate_start = (time.time(), 0)
        self.publish(job.to_json())
        log.info("%s job %s of %s: running", job.kind, job.id, job.index_dir)

        def progress(p: IndexProgress) -> None:
            job.on_progress(p)
            self.publish(job.to_json())

        try:
            if job.kind == "remove":
                return self._remove(job)
            summary = build_index(job.request, self.model, progress=progress, should_stop=self._stop_check(job),
                                  cluster=self.cluster)
        except Exception as exc:  # reported on the job; the worker keeps serving
            if not isinstance(exc, InputError):
                log.exception("%s job %s failed", job.kind, job.id)
            error = error_object(exc)
            # a resumed mosaic's sources on a drive not plugged in now: kept, as a resumed raster not there is
            if job.resumed and _not_there_now(exc):
                job.kept = True
                error["message"] += KEPT_FOR_NEXT_START
            return states.FAILED, error
        job.tiles_total, job.ann, job.without_tiles = summary.tiles_total, summary.ann, list(summary.without_tiles)
        job.tile_count, job.unfinished = summary.tile_count, list(summary.unfinished)
        if summary.complete:
            job.tiles_done, job.tiles_skipped = job.tiles_total, summary.tiles_skipped
            return states.DONE, None
        if job.cancel_requested.is_set():
            return states.CANCELLED, None
        return states.INTERRUPTED, None  # the worker is stopping; job.json stays for the next one

    def _stop_check(self, job: Job) -> Callable[[], bool]:
        """Whether the job should stop: cancelled, or the worker stopping."""
        return lambda: job.cancel_requested.is_set() or self.stopping.is_set()

    def _remove(self, job: Job) -> tuple[str, dict | None]:
        """Take the job's rasters out of its index: one commit, then the ANN shortlist rebuilt
        without them. Once it runs, a cancel stops the rebuild alone."""
        summary = remove_rasters(job.request, should_stop=self._stop_check(job))
        job.removed, job.ann, job.tile_count = summary.removed, summary.ann, summary.tile_count
        log.info("job %s removed %d raster(s) from %s: %d tiles left", job.id, len(summary.removed), job.index_dir,
                 summary.tile_count)
        return states.DONE, None

    def _finish(self, job: Job, state: str, error: dict | None = None) -> None:
        """Tidy the job's files, then make its end known (also when tidying fails: a job left
        `running` would keep its index busy until the worker restarts)."""
        try:
            # a removal has no job file of its own; a kept job's stays for the worker's next start
            if state != states.INTERRUPTED and job.kind == "index" and not job.kept:
                try:
                    (job.index_dir / JOB_FILE).unlink(missing_ok=True)
                except OSError as exc:  # a failing disk: the next start tries to resume, and says why it cannot
                    log.warning("cannot remove %s: %s", job.index_dir / JOB_FILE, exc)
                remove_unborn(job.index_dir)  # failed or cancelled before its first commit: no empty folder left
        finally:
            if job.job_lock is not None:  # the job file is left as it is now: removed, or kept to resume
                job.job_lock.close()
                job.job_lock = None
            if job.tile_count is None and state != states.FAILED and job.kind == "index":  # ended before it ran
                job.tile_count = _tiles_held(job.index_dir)
            job.state, job.error, job.finished = state, error, time.time()
            self.publish(job.to_json())
            # said in the worker's log too: one serving several users had no word of a job's end
            if error is not None:
                log.warning("%s job %s of %s: %s: %s", job.kind, job.id, job.index_dir, state, error["message"])
            else:
                log.info("%s job %s of %s: %s", job.kind, job.id, job.index_dir, state)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def shutdown(self, timeout: float = 120.0) -> None:
        """Ask every job to stop after its batch in progress, and wait for them to commit."""
        self.stopping.set()
        for job in list(self.jobs.values()):
            if job.thread is not None:
                job.thread.join(timeout)


def _not_there_now(exc: Exception) -> bool:
    """Whether a job failed for rasters not there now (a drive not plugged in, a root not given):
    a resumed one is kept to try again at the worker's next start."""
    return isinstance(exc, (RasterMissing, OutsideRoots))


def _tiles_held(index_dir: Path) -> int:
    """The tiles an index holds by its manifest (0 with none, or one that cannot be read): a job
    cancelled while queued said its index held 0 tiles of 1,000."""
    try:
        return int(read_manifest(index_dir).get("tile_count", 0)) if holds_an_index(index_dir) else 0
    except (InputError, OSError, ValueError, TypeError):
        return 0


def _name_in(root: Path, index_dir: Path) -> str:
    """An index's name in its root (for a job file too damaged to say it)."""
    try:
        return str(index_dir.relative_to(root))
    except ValueError:
        return str(index_dir)
