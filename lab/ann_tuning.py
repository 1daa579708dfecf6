"""How many inverted lists to visit and how many windows to ask the ANN shortlist for: recall
of the exact best 200 windows and milliseconds, over synthetic windows at scale (lab.ann_scale).

For each (lists visited, windows asked a query vector, candidates re-ranked by full codes): the
share of the exact best 200 among FAISS's distinct candidates (what a perfect re-rank could
reach), the share in the re-ranked
best 200 (what the product scans), the share of the exact best 10 there, and the ms of FAISS
with the re-rank (worker.ann.AnnShortlist.candidates), p50 over the sketches. The shortlist is
built once; the grid is searched in this process.
Run: scripts/lab ann_tuning [--tiles 1000000] [--grid 64x512,128x1024]
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
from worker import ann
from worker.assets import load_asset_paths
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.store import IndexWriter, TileIndex
from worker.tiling import TileSettings

SKETCHES = 20


def shares(shortlist: ann.AnnShortlist, vectors: list[np.ndarray], exact: list[np.ndarray], asked: int) -> dict:
    """Recall of the exact best 200 among the candidates and in the re-ranked best 200, of the
    exact best 10 in the re-ranked best 200, and FAISS-with-re-rank ms p50."""
    covered, ranked, best10, ms = [], [], [], []
    for v, truth in zip(vectors, exact):
        t0 = time.perf_counter()
        ids = shortlist.candidates(v, asked)[0]
        ms.append(1e3 * (time.perf_counter() - t0))
        top = set(ids[:ann_scale.RECALL_AT].tolist())
        found = shortlist.index.search(v, asked)[1]  # FAISS's own candidates, before the re-rank keeps the best
        covered.append(len(set(found[found >= 0].tolist()) & set(truth.tolist())) / len(truth))
        ranked.append(len(top & set(truth.tolist())) / len(truth))
        best10.append(len(top & set(truth[:10].tolist())) / min(10, len(truth)))
    return {"candidates": np.mean(covered), "reranked": np.mean(ranked), "best10": np.mean(best10),
            "ms": float(np.median(ms))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--grid", default="32x512,64x512,128x512,64x1024,128x1024,256x1024,256x2048",
                        help="LISTSxASKED pairs, or LISTSxASKEDxFULL (full-code re-rank length; default ann.FULL_RERANK)")
    args = parser.parse_args()
    grid = [tuple(int(x) for x in item.split("x")) for item in args.grid.split(",")]
    grid = [(*g, ann.FULL_RERANK) if len(g) == 2 else g for g in grid]
    model = load_model(device="cpu")
    work = Path(tempfile.mkdtemp(prefix="ann-tuning-"))
    try:
        index_dir = work / "index"
        IndexWriter(index_dir, model, TileSettings()).build([Path(load_asset_paths()["s2_rgb"])])
        index = TileIndex.open(index_dir)
        ranking = RankingConfig()
        vectors = [ann_scale.sketch_vectors(q) for q in sketches(index, model, SKETCHES)]
        n = int(args.tiles * ann_scale.WINDOWS_PER_TILE)
        built = ann_scale.build_synthetic(index, *ann_scale.real_windows(index), n, vectors)
        lines = [f"ANN shortlist at {args.tiles:,} tiles ({n:,} synthetic windows, `{built['factory']}`, built in "
                 f"{built['build_s']:.0f} s), {SKETCHES} sketches; product default: {ann.NPROBE} lists, "
                 f"{ranking.ann_neighbours} asked, the best {ann.FULL_RERANK} re-ranked by full codes", "",
                 "| lists visited | asked a query vector | re-ranked by full codes | exact 200 among the candidates "
                 "| in the re-ranked 200 | exact best 10 there | FAISS + re-rank ms p50 |", "|---|---|---|---|---|---|---|"]
        for lists, asked, full in grid:
            got = shares(ann.AnnShortlist(index_dir, nprobe=lists, full_rerank=full), vectors, built["exact"], asked)
            lines.append(f"| {lists} | {asked} | {full} | {got['candidates']:.3f} | {got['reranked']:.3f} "
                         f"| {got['best10']:.3f} | {got['ms']:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
