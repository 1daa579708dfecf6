"""Where a search's time goes: in process by stage, and end to end through a fresh worker.

A short check beside scripts/bench_speed, from a fresh process: the same sketches searched in
this process (stage timings) and through a real `python -m worker serve` over ZeroMQ (what the
client sees, and the worker's peak memory), with the exact scan and with the ANN shortlist. With
--windows N the ANN holds N synthetic windows (lab.ann_scale; 2,250,000 is 1M tiles), else the
real index's own windows. bench_speed's long-lived process was measured to slow the worker it
starts (docs/benchmarks/speed.md); this is the control.
Run: scripts/lab search_profile [--windows N] [--queries 10]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lab import ann_scale
from lab.bench_speed import sketches
from worker import ann, query_templates
from worker.assets import load_asset_paths
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.search import ann_shortlist, search
from worker.store import IndexWriter, TileIndex
from worker.tiling import TileSettings


def in_process(index: TileIndex, model, queries, mode: str) -> dict:
    """Median ms of each stage of worker.search over `queries` (after one warm-up search)."""
    ranking = RankingConfig(ann=mode)
    search(index, model, queries[0], ranking)
    runs = [search(index, model, q, ranking).timings_ms for q in queries]
    return {k: round(float(np.median([r[k] for r in runs]))) for k in runs[0]}


def shortlist_ms(index: TileIndex, queries) -> dict:
    """Median ms of FAISS alone, and of FAISS with the re-rank (worker.ann.AnnShortlist.candidates)."""
    ranking = RankingConfig(ann="on")
    shortlist = ann_shortlist(index, ranking)
    faiss_ms, total_ms = [], []
    for q in queries:
        vectors = ann.query_vectors(query_templates.build(q, ranking.sizes, ranking.angles).coarse)
        t0 = time.perf_counter()
        shortlist.index.search(vectors, ranking.ann_neighbours)
        t1 = time.perf_counter()
        shortlist.candidates(vectors, ranking.ann_neighbours)
        faiss_ms.append(1e3 * (t1 - t0))
        total_ms.append(1e3 * (time.perf_counter() - t1))
    return {"faiss": round(float(np.median(faiss_ms)), 1), "faiss_and_rerank": round(float(np.median(total_ms)), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=0, help="synthetic ANN windows (0: the index's own)")
    parser.add_argument("--queries", type=int, default=10)
    args = parser.parse_args()
    model = load_model(device="cpu")
    raster = Path(load_asset_paths()["s2_rgb"])
    work = Path(tempfile.mkdtemp(prefix="search-profile-"))
    try:
        index_dir = work / "index"
        IndexWriter(index_dir, model, TileSettings()).build([raster])
        index = TileIndex.open(index_dir)
        queries = sketches(index, model, args.queries)
        if args.windows:
            ranking = RankingConfig()
            vectors = [ann.query_vectors(query_templates.build(q, ranking.sizes, ranking.angles).coarse) for q in queries]
            ann_scale.build_synthetic(index, *ann_scale.real_windows(index), args.windows, vectors)
        else:
            ann.build(index)
        index = TileIndex.open(index_dir)
        print(f"ANN: {ann.describe(index)['vectors']:,} windows", flush=True)
        for mode in ("off", "on"):
            print(f"in process, ann {mode}, ms: {in_process(index, model, queries, mode)}", flush=True)
        print(f"ANN shortlist alone, ms: {shortlist_ms(index, queries)}", flush=True)
        for mode in ("off", "on"):
            e2e = ann_scale.end_to_end(index_dir, raster.parent, queries, ann_mode=mode)
            print(f"end to end, ann {mode}: p50 {e2e['p50']:.0f} ms, p95 {e2e['p95']:.0f} ms, "
                  f"worker peak RSS {e2e['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
