"""How many inverted lists to visit and how many windows to ask the ANN shortlist for: recall
of the exact best 200 windows and milliseconds, over synthetic windows at scale (lab.ann_scale).

For each (lists visited, windows asked a query vector, candidates re-ranked by full codes): the
share of the exact best 200 among FAISS's distinct candidates (what a perfect re-rank could
reach), the share in the re-ranked
best 200 (what the product scans), the share of the exact best 10 there, and the ms of FAISS
with the re-rank (worker.ann.AnnShortlist.candidates), p50 over the sketches. The shortlist is
built once; the grid is searched in this process.
Run: scripts/lab ann_tuning [--tiles 1000000] [--grid 64x512,128x1024] [--factory 'OPQ64_256,IVF{nlist}_HNSW32,PQ64']
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


from lab import ann_scale
from lab.bench_speed import sketches
from worker import ann
from worker.assets import load_asset_paths
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.store import IndexWriter, TileIndex
from worker.tiling import TileSettings

SKETCHES = 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--grid", default="32x512,64x512,128x512,64x1024,128x1024,256x1024,256x2048",
                        help="LISTSxASKED pairs, or LISTSxASKEDxFULL (full-code re-rank length; default ann.FULL_RERANK)")
    parser.add_argument("--factory", default=None, help="a FAISS factory string ({nlist}: the product's list count) "
                        "instead of the product's for that many windows (worker.ann.factory_for)")
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
        built = ann_scale.build_synthetic(index, *ann_scale.real_windows(index), n, vectors, factory=args.factory)
        lines = [f"ANN shortlist at {args.tiles:,} tiles ({n:,} synthetic windows, `{built['factory']}`, built in "
                 f"{built['build_s']:.0f} s), {SKETCHES} sketches; product default: {ann.NPROBE} lists, "
                 f"{ranking.ann_neighbours} asked, the best {ann.FULL_RERANK} re-ranked by full codes", "",
                 "| lists visited | asked a query vector | re-ranked by full codes | exact 200 among the candidates "
                 "| in the re-ranked 200 | exact best 10 there | FAISS + re-rank ms p50 |", "|---|---|---|---|---|---|---|"]
        for lists, asked, full in grid:
            got = ann_scale.recall(index_dir, vectors, built["exact"], asked, nprobe=lists, full_rerank=full)
            lines.append(f"| {lists} | {asked} | {full} | {got['candidates']:.3f} | {got['at200']:.3f} "
                         f"| {got['at10']:.3f} | {got['ms']:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
