"""The ANN shortlist at continental scale, asked end to end through a real worker.

Millions of tiles cannot be indexed on this machine, so the windows are synthetic (as the issue
allows): each a random mixture of three real windows' descriptors of a real index plus noise,
so the data keeps real structure. They are built with the product's factory (worker.ann) into
that real index's `ann/` folder, each pointing at the real window it mostly mixes, so that a
real `python -m worker serve` process answers real sketches with `ann: on` over ZeroMQ: the
FAISS shortlist over all the synthetic windows, then the exact local scans, refine and
verification on the real rasters. What it cannot show: the level maps of millions of tiles
(read by region from disk, worker.store.maps) are those of the small real index.

Recall is measured against an exact scan of the same vectors: for each sketch, the windows by
their best inner product with any of the sketch's query vectors (worker.ann.query_vectors), as
the product merges them.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lab.page_cache import cached_share, evict
from lab.worker_process import WorkerProcess, memory_mb
from worker import ann, query_templates
from worker.ranking import RankingConfig
from worker.sketch import sketch_pixels
from worker.store import TileIndex

RECALL_AT = 200  # the shortlist's length
WINDOWS_PER_TILE = (168 / 112) ** 2  # windows every 112 level px, tiles every 168 (overlap 0.25)
TIMED_QUERIES = 20
COLD_QUERIES = 8  # each a fresh worker's first search (first_searches_from_disk)


def sketch_vectors(sketch: torch.Tensor) -> np.ndarray:
    """The ANN query vectors a search asks for a sketch (3, S, S) with the default ranking."""
    ranking = RankingConfig()
    return ann.query_vectors(query_templates.build(sketch, ranking.sizes, ranking.angles).coarse)


def synthetic_windows(base: np.ndarray, n: int, batch: int, noise: float = 0.1):
    """Batches of `n` unit vectors, each a random mixture of three real windows (Dirichlet
    weights) plus Gaussian noise of `noise` times its norm, with the row in `base` of the window
    each mostly mixes (seeded: the same batches every call)."""
    rng = np.random.default_rng(1)
    sigma = noise / np.sqrt(base.shape[1])
    for start in range(0, n, batch):
        m = min(batch, n - start)
        weights = rng.dirichlet(np.ones(3), m).astype(np.float32)
        sources = rng.integers(0, len(base), (3, m))
        x = sum(weights[:, i:i + 1] * base[sources[i]] for i in range(3))
        x = x + sigma * rng.standard_normal((m, base.shape[1]), dtype=np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True), sources[weights.argmax(1), np.arange(m)]


def real_windows(index: TileIndex) -> tuple[np.ndarray, np.ndarray]:
    """Every grid window of a real index: unit descriptors and their windows.npy rows."""
    found = [(v, ann._window_rows(r, s, o)) for r, s, v, o in ann._windows_of(index.maps)]
    return np.concatenate([v for v, _ in found]), np.concatenate([rows for _, rows in found])


class ExactBest:
    """Each sketch's exact best `k` windows (by its best query vector), kept while the windows
    stream past in batches."""

    def __init__(self, sketches: list[np.ndarray], k: int):
        self.queries = np.concatenate(sketches)
        self.owner = np.repeat(np.arange(len(sketches)), [len(s) for s in sketches])
        self.k = k
        self.scores = [np.full(0, -np.inf, np.float32) for _ in sketches]
        self.ids = [np.zeros(0, np.int64) for _ in sketches]
        self.seen = 0

    def add(self, x: np.ndarray) -> None:
        scores = self.queries @ x.T
        for j in range(len(self.scores)):
            s = np.concatenate([self.scores[j], scores[self.owner == j].max(0)])
            i = np.concatenate([self.ids[j], np.arange(self.seen, self.seen + len(x))])
            keep = np.argpartition(-s, self.k)[:self.k] if len(s) > self.k else np.arange(len(s))
            self.scores[j], self.ids[j] = s[keep], i[keep]
        self.seen += len(x)

    def best_first(self) -> list[np.ndarray]:
        return [i[np.argsort(-s)] for s, i in zip(self.scores, self.ids)]


def build_synthetic(index: TileIndex, base: np.ndarray, base_rows: np.ndarray, n: int, sketches: list[np.ndarray],
                    batch: int = 100_000, factory: str | None = None) -> dict:
    """Build an ANN shortlist of n synthetic windows into `index`'s ann/ folder, as `build-ann`
    would, and find each sketch's exact best RECALL_AT windows in the same pass."""
    import faiss

    factory = ann.factory_for(n, factory)
    exact = ExactBest(sketches, RECALL_AT)
    t0 = time.perf_counter()
    faiss_index = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    sample = next(synthetic_windows(base, ann.train_size(n), ann.train_size(n)))[0]
    faiss_index.train(sample)
    with ann.staging(index.dir) as folder:
        codes = ann.code_writers(folder, faiss_index, sample, n)
        rows, exact_s = [], 0.0
        for x, sources in synthetic_windows(base, n, batch):
            faiss_index.add(x)
            for writer in codes:
                writer.add(x)
            rows.append(base_rows[sources])
            t1 = time.perf_counter()
            exact.add(x)
            exact_s += time.perf_counter() - t1
        info = ann._write(index, faiss_index, rows, codes, factory, t0, folder, trained_for=n)
    return {"factory": factory, "build_s": round(info.build_s - exact_s, 1), "bytes": info.bytes_on_disk,
            "exact": exact.best_first()}


def recall(index_dir: Path, sketches: list[np.ndarray], truth: list[np.ndarray], neighbours: int,
           nprobe: int = ann.NPROBE, full_rerank: int = ann.FULL_RERANK) -> dict:
    """Shortlist recall against the exact scan, asked as the product asks it (`neighbours` a
    query vector, re-ranked: worker.ann.AnnShortlist.candidates), visiting `nprobe` lists:
    of the exact best 200 and of the exact best 10, the share in the ANN's best 200 (at200,
    at10); of the exact best 200, the share among FAISS's own candidates before the re-rank keeps
    the best (candidates: what a perfect re-rank could reach); and the ms p50 of FAISS with
    the re-rank."""
    shortlist = ann.AnnShortlist(index_dir, nprobe=nprobe, full_rerank=full_rerank)
    at200, at10, covered, ms = [], [], [], []
    for vectors, exact in zip(sketches, truth):
        t0 = time.perf_counter()
        found = set(shortlist.candidates(vectors, neighbours)[0][:RECALL_AT].tolist())
        ms.append(1e3 * (time.perf_counter() - t0))
        asked = shortlist.index.search(vectors, neighbours)[1]
        at200.append(len(found & set(exact.tolist())) / len(exact))
        at10.append(len(found & set(exact[:10].tolist())) / min(10, len(exact)))
        covered.append(len(set(asked[asked >= 0].tolist()) & set(exact.tolist())) / len(exact))
    return {"at200": float(np.mean(at200)), "at10": float(np.mean(at10)), "candidates": float(np.mean(covered)),
            "ms": float(np.median(ms))}


def png(sketch: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray(sketch_pixels(sketch)).save(out, "PNG")
    return out.getvalue()


def end_to_end(index_dir: Path, raster_root: Path, sketches: list[torch.Tensor], ann_mode: str = "on") -> dict:
    """Searches (with `ann: on` unless told) through a real worker process over ZeroMQ: p50 and
    p95 ms as the client sees them, the worker's peak resident memory, and p50 of the worker's
    own timings (`server`: from when a search thread took the request; by stage: the search's),
    so that a gap to the in-process figures can be placed."""
    worker = WorkerProcess(index_dir.parent, raster_root).start()
    try:
        times, replies = [], []
        with worker.client(timeout=120) as client:
            client.search(index_dir.name, png(sketches[0]), ann=ann_mode, top=10)  # warm-up: opens the index
            for sketch in sketches[:TIMED_QUERIES]:
                t0 = time.perf_counter()
                replies.append(client.search(index_dir.name, png(sketch), ann=ann_mode, top=10))
                times.append(1e3 * (time.perf_counter() - t0))
        peak_mb = memory_mb(worker.proc.pid)["VmHWM"]
    finally:
        worker.stop()
    return _latency(times, replies) | {"peak_rss_mb": peak_mb}


def first_searches_from_disk(index_dir: Path, raster_root: Path, sketches: list[torch.Tensor]) -> dict:
    """What a search after a restart costs when the index is not in memory (after a reboot, or an
    index larger than memory): each sketch the first search of a fresh worker (`ann: on`), after
    every file of the index and under raster_root was dropped from the page cache
    (lab.page_cache). As end_to_end, with `sketches` (how many; at most COLD_QUERIES) and
    `left_cached`: the largest share of index.faiss still cached after a drop (pages a running
    process maps cannot be dropped: none may, for a true figure)."""
    times, replies, peaks, left = [], [], [], []
    for sketch in sketches[:COLD_QUERIES]:
        evict([index_dir, raster_root])
        left.append(cached_share(ann.ann_dir(index_dir) / "index.faiss"))
        worker = WorkerProcess(index_dir.parent, raster_root).start()
        try:
            with worker.client(timeout=120) as client:
                t0 = time.perf_counter()
                replies.append(client.search(index_dir.name, png(sketch), ann="on", top=10))
                times.append(1e3 * (time.perf_counter() - t0))
            peaks.append(memory_mb(worker.proc.pid)["VmHWM"])
        finally:
            worker.stop()
    return _latency(times, replies) | {"peak_rss_mb": max(peaks), "left_cached": max(left), "sketches": len(times)}


def _latency(times: list[float], replies: list[dict]) -> dict:
    """p50 and p95 of the client's ms, and p50 of the worker's own timings by stage (`server`)."""
    server = [reply["timings_ms"] for reply in replies]
    stages = {k.removesuffix("_ms"): round(float(np.percentile([s[k] for s in server], 50)))
              for k in server[0] if k.endswith("_ms")}
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)), "server": stages}
