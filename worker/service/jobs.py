"""Background indexing jobs: progress, cancel, and resume after the worker was killed.

A job writes INDEX_DIR/job.json (its request) before it starts and removes it when it ends
(done, failed or cancelled); a worker that starts and finds one resumes that job. A job the
worker stops on SIGTERM ends `interrupted` and keeps its job.json for the same reason.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from wire import job_states as states
from wire.protocol import new_id
from worker.app import IndexRequest, build_index
from worker.errors import InputError, error_object
from worker.store import IndexProgress, write_json_atomic

log = logging.getLogger(__name__)
JOB_FILE = "job.json"


class Job:
    """One indexing run of one index, as the `job` op and progress events report it."""

    def __init__(self, index_name: str, request: IndexRequest):
        self.id = new_id()
        self.index_name = index_name
        self.request = request
        self.state = states.QUEUED
        self.error: dict | None = None
        self.tiles_done = 0
        self.tiles_total = 0
        self.tiles_skipped = 0
        self.started = time.time()
        self.finished: float | None = None
        self.cancel_requested = threading.Event()
        self.thread: threading.Thread | None = None
        self._rate_start: tuple[float, int] | None = None  # (time, tiles done) the ETA's rate counts from

    @property
    def index_dir(self) -> Path:
        return self.request.index_dir

    def to_json(self) -> dict:
        fraction = self.tiles_done / self.tiles_total if self.tiles_total else (1.0 if self.state == states.DONE else 0.0)
        eta = None
        if self._rate_start and self.state == states.RUNNING:
            t0, n0 = self._rate_start
            rate = (self.tiles_done - n0) / max(1e-6, time.time() - t0)
            eta = (self.tiles_total - self.tiles_done) / rate if rate > 0 else None
        return {"id": self.id, "index": self.index_name, "state": self.state, "progress": round(fraction, 4),
                "tiles_done": self.tiles_done, "tiles_total": self.tiles_total, "tiles_skipped": self.tiles_skipped,
                "eta_s": round(eta, 1) if eta is not None else None, "error": self.error,
                "started": self.started, "finished": self.finished}

    def on_progress(self, p: IndexProgress) -> None:
        if self._rate_start and self._rate_start[1] == 0 and self.tiles_done == 0:
            self._rate_start = (time.time(), p.tiles_done)  # the rate counts from the first commit on
        self.tiles_done, self.tiles_total, self.tiles_skipped = p.tiles_done, p.tiles_total, p.tiles_skipped


class JobManager:
    """Runs each indexing job in its own thread; at most one job per index at a time."""

    def __init__(self, model, publish: Callable[[dict], None]):
        self.model = model
        self.publish = publish  # called from job threads with the job's JSON after every change
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def running_for(self, index_dir: Path) -> Job | None:
        with self._lock:
            return next((j for j in self.jobs.values() if j.index_dir == index_dir and j.state in states.ACTIVE), None)

    def start(self, index_name: str, request: IndexRequest) -> Job:
        """Start a job, or return the one already running for this index (so retries are safe)."""
        existing = self.running_for(request.index_dir)
        if existing:
            return existing
        job = Job(index_name, request)
        request.index_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(request.index_dir / JOB_FILE, {"index": index_name, **request.to_json()})
        with self._lock:
            self.jobs[job.id] = job
        job.thread = threading.Thread(target=self._run, args=(job,), name=f"index-{job.id}", daemon=True)
        job.thread.start()
        return job

    def resume_interrupted(self, index_roots: list[Path]) -> list[Job]:
        """Restart the jobs a killed or stopped worker left behind (their job.json is still there)."""
        resumed = []
        for root in index_roots:
            for job_file in sorted(root.rglob(JOB_FILE)):
                spec = json.loads(job_file.read_text())
                try:
                    request = IndexRequest.from_json(job_file.parent, spec)
                except InputError as exc:
                    log.warning("not resuming the indexing job of %s: %s (remove %s to stop this warning)",
                                job_file.parent, exc, job_file)
                    continue
                log.info("resuming the interrupted indexing job of %s", job_file.parent)
                resumed.append(self.start(spec["index"], request))
        return resumed

    def _run(self, job: Job) -> None:
        job.state = states.RUNNING
        job._rate_start = (time.time(), 0)
        self.publish(job.to_json())

        def progress(p: IndexProgress) -> None:
            job.on_progress(p)
            self.publish(job.to_json())

        try:
            summary = build_index(job.request, self.model, progress=progress,
                                  should_stop=lambda: job.cancel_requested.is_set() or self.stopping.is_set())
            job.tiles_total = summary.tiles_total
            if summary.complete:
                job.state = states.DONE
                job.tiles_done, job.tiles_skipped = job.tiles_total, summary.tiles_skipped
            elif job.cancel_requested.is_set():
                job.state = states.CANCELLED
            else:
                job.state = states.INTERRUPTED  # the worker is stopping; job.json stays for the next one
        except Exception as exc:  # reported on the job; the worker keeps serving
            if not isinstance(exc, InputError):
                log.exception("indexing job %s failed", job.id)
            job.state, job.error = states.FAILED, error_object(exc)
        finally:
            job.finished = time.time()
            if job.state != states.INTERRUPTED:
                (job.index_dir / JOB_FILE).unlink(missing_ok=True)
            self.publish(job.to_json())

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def shutdown(self, timeout: float = 120.0) -> None:
        """Ask every job to stop after its batch in progress, and wait for them to commit."""
        self.stopping.set()
        for job in list(self.jobs.values()):
            if job.thread is not None:
                job.thread.join(timeout)

