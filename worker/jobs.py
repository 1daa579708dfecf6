"""Background indexing jobs: progress, cancel, and resume after the worker was killed.

A job writes INDEX_DIR/job.json (its rasters and settings) before it starts and removes it
when it finishes or is cancelled; a worker that starts and finds one resumes that job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from worker.errors import InputError
from worker.index import IndexProgress, IndexWriter, write_json_atomic
from wire.protocol import new_id
from worker.tiling import TileSettings, find_rasters

log = logging.getLogger(__name__)
JOB_FILE = "job.json"


class Job:
    def __init__(self, index_name: str, index_dir: Path, rasters: list[str], settings: TileSettings,
                 chunk_tiles: int):
        self.id = new_id()
        self.chunk_tiles = chunk_tiles
        self.index_name = index_name
        self.index_dir = index_dir
        self.rasters = rasters
        self.settings = settings
        self.state = "queued"
        self.error: dict | None = None
        self.tiles_done = 0
        self.tiles_total = 0
        self.tiles_skipped = 0
        self.started = time.time()
        self.finished: float | None = None
        self.cancel_requested = threading.Event()
        self.thread: threading.Thread | None = None
        self._rate_start: tuple[float, int] | None = None

    def to_json(self) -> dict:
        fraction = self.tiles_done / self.tiles_total if self.tiles_total else (1.0 if self.state == "done" else 0.0)
        eta = None
        if self._rate_start and self.state == "running":
            t0, n0 = self._rate_start
            rate = (self.tiles_done - n0) / max(1e-6, time.time() - t0)
            eta = (self.tiles_total - self.tiles_done) / rate if rate > 0 else None
        return {"id": self.id, "index": self.index_name, "state": self.state, "progress": round(fraction, 4),
                "tiles_done": self.tiles_done, "tiles_total": self.tiles_total, "tiles_skipped": self.tiles_skipped,
                "eta_s": round(eta, 1) if eta is not None else None, "error": self.error,
                "started": self.started, "finished": self.finished}


class JobManager:
    def __init__(self, model, publish: Callable[[dict], None]):
        self.model = model
        self.publish = publish
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def running_for(self, index_dir: Path) -> Job | None:
        with self._lock:
            return next((j for j in self.jobs.values() if j.index_dir == index_dir and j.state in ("queued", "running")), None)

    def start(self, index_name: str, index_dir: Path, rasters: list[str], settings: TileSettings,
              chunk_tiles: int = 256) -> Job:
        """Start a job, or return the one already running for this index (so retries are safe)."""
        existing = self.running_for(index_dir)
        if existing:
            return existing
        find_rasters(rasters)  # a missing raster is an error reply now, not a failed job later
        job = Job(index_name, index_dir, rasters, settings, chunk_tiles)
        index_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(index_dir / JOB_FILE, {"index": index_name, "rasters": rasters, "settings": settings.to_json(),
                                                 "chunk_tiles": chunk_tiles})
        with self._lock:
            self.jobs[job.id] = job
        job.thread = threading.Thread(target=self._run, args=(job,), name=f"index-{job.id}", daemon=True)
        job.thread.start()
        return job

    def resume_interrupted(self, index_roots: list[Path]) -> list[Job]:
        """Restart the jobs a killed worker left behind (their job.json is still there)."""
        resumed = []
        for root in index_roots:
            for job_file in sorted(root.rglob(JOB_FILE)):
                spec = json.loads(job_file.read_text())
                settings = TileSettings.from_json(spec["settings"])
                log.info("resuming the interrupted indexing job of %s", job_file.parent)
                resumed.append(self.start(spec["index"], job_file.parent, spec["rasters"], settings,
                                          spec.get("chunk_tiles", 256)))
        return resumed

    def _run(self, job: Job) -> None:
        job.state = "running"
        job._rate_start = (time.time(), 0)
        self.publish(job.to_json())

        def progress(p: IndexProgress) -> None:
            if job._rate_start and job._rate_start[1] == 0 and job.tiles_done == 0:
                job._rate_start = (time.time(), p.tiles_done)  # rate from the first commit on
            job.tiles_done, job.tiles_total, job.tiles_skipped = p.tiles_done, p.tiles_total, p.tiles_skipped
            self.publish(job.to_json())

        stop = lambda: job.cancel_requested.is_set() or self.stopping.is_set()
        try:
            manifest = IndexWriter(job.index_dir, self.model, job.settings, job.chunk_tiles).build(
                find_rasters(job.rasters), progress=progress, should_stop=stop)
            job.tiles_total = sum(r["tiles_total"] or 0 for r in manifest["rasters"])
            if job.cancel_requested.is_set():
                job.state = "cancelled"
            elif self.stopping.is_set():
                job.state = "interrupted"  # job.json stays: the next worker resumes it
            else:
                job.state = "done"
                job.tiles_done = job.tiles_total
                job.tiles_skipped = sum(r["tiles_skipped"] for r in manifest["rasters"])
        except InputError as exc:
            job.state, job.error = "failed", {"code": exc.code, "message": str(exc)}
        except Exception as exc:  # a bug: report it on the job, keep serving
            log.exception("indexing job %s failed", job.id)
            job.state, job.error = "failed", {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            job.finished = time.time()
            if job.state in ("done", "cancelled", "failed"):
                (job.index_dir / JOB_FILE).unlink(missing_ok=True)
            self.publish(job.to_json())

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def shutdown(self, timeout: float = 120.0) -> None:
        self.stopping.set()
        for job in list(self.jobs.values()):
            if job.thread is not None:
                job.thread.join(timeout)
