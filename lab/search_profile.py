"""Where a search's time goes: in process by stage, and end to end through a fresh worker.

A short check beside scripts/bench_speed, from a fresh process: the same sketches searched in
this process (stage timings) and through a real `python -m worker serve` over ZeroMQ (what the
client sees, and the worker's peak memory), with the exact scan and with the ANN shortlist. With
--windows N the ANN holds N synthetic windows (lab.ann_scale; 2,250,000 is 1M tiles), else the
real index's own windows; with synthetic windows it also says the shortlist's recall of the exact
best 200 windows (lab.ann_scale.recall). It found that bench_speed's worker, started after its Dask clusters,
ran on one thread (worker.distributed keeps the environment now; docs/benchmarks/speed.md).
With --cold it also times each sketch as the first search of a fresh worker, the index's and the
raster's files dropped from the page cache before it (lab.ann_scale.first_searches_from_disk).
Run: scripts/lab search_profile [--windows N [--lists 256,512] [--neighbours 2048]] [--queries 10] [--cold]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lab import ann_scale
from lab.bench_speed import search_latency, sketches
from worker import ann
from worker.assets import load_asset_paths
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.search import ann_shortlist
from worker.store import IndexWriter, TileIndex
from worker.tiling import TileSettings


def shortlist_ms(index: TileIndex, queries) -> dict:
    """Median ms of FAISS alone, and of FAISS with the re-rank (worker.ann.AnnShortlist.candidates)."""
    ranking = RankingConfig(ann="on")
    shortlist = ann_shortlist(index, ranking)
    faiss_ms, total_ms = [], []
    for q in queries:
        vectors = ann_scale.sketch_vectors(q)
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
    parser.add_argument("--lists", default="", help="with --windows: recall also at these lists visited (e.g. 256,512)")
    parser.add_argument("--neighbours", default="",
                        help="with --windows: recall also with these many windows asked a query vector (e.g. 2048)")
    parser.add_argument("--cold", action="store_true",
                        help="also each sketch the first search of a fresh worker, from a cold page cache (Linux)")
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
            vectors = [ann_scale.sketch_vectors(q) for q in queries]
            built = ann_scale.build_synthetic(index, *ann_scale.real_windows(index), args.windows, vectors)
            print(f"ANN built in {built['build_s']:.0f} s ({built['factory']}), {built['bytes'] / args.windows:.0f} bytes "
                  f"a window", flush=True)
            for asked in [RankingConfig().ann_neighbours] + [int(x) for x in args.neighbours.split(",") if x]:
                got = ann_scale.recall(index_dir, vectors, built["exact"], asked)
                print(f"asking {asked} a query vector: FAISS's candidates hold {got['candidates']:.3f} of the exact "
                      f"best 200, the re-ranked best 200 {got['at200']:.3f}, of the best 10 {got['at10']:.3f}; "
                      f"FAISS + re-rank ms p50 {got['ms']:.0f}", flush=True)
            for lists in (int(x) for x in args.lists.split(",") if x):
                got = ann_scale.recall(index_dir, vectors, built["exact"], RankingConfig().ann_neighbours, nprobe=lists)
                print(f"visiting {lists} lists: of the exact best 200 {got['at200']:.3f}, of the best 10 {got['at10']:.3f}; "
                      f"FAISS + re-rank ms p50 {got['ms']:.0f}", flush=True)
        else:
            ann.build(index)
        index = TileIndex.open(index_dir)
        print(f"ANN: {ann.describe(index)['vectors']:,} windows", flush=True)
        for mode in ("off", "on"):
            stages = search_latency(index, model, queries, RankingConfig(ann=mode))
            print(f"in process, ann {mode}, ms: {({k: round(v) for k, v in stages.items()})}", flush=True)
        print(f"ANN shortlist alone, ms: {shortlist_ms(index, queries)}", flush=True)
        for mode in ("off", "on"):
            e2e = ann_scale.end_to_end(index_dir, raster.parent, queries, ann_mode=mode)
            print(f"end to end, ann {mode}: p50 {e2e['p50']:.0f} ms, p95 {e2e['p95']:.0f} ms, "
                  f"worker peak RSS {e2e['peak_rss_mb']:.0f} MB; the worker's own timings, p50 ms: {e2e['server']}",
                  flush=True)
        if args.cold:
            del index  # its shortlist maps the ANN's files, whose pages could then not be dropped
            gc.collect()
            cold = ann_scale.first_searches_from_disk(index_dir, raster.parent, queries)
            print(f"first search of a fresh worker, the index and raster dropped from the page cache "
                  f"({cold['sketches']} sketches): p50 {cold['p50']:.0f} ms, p95 {cold['p95']:.0f} ms, "
                  f"worker peak RSS {cold['peak_rss_mb']:.0f} MB, index.faiss still cached at most "
                  f"{cold['left_cached']:.3f}; the worker's own timings, p50 ms: {cold['server']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
