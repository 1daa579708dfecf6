"""What the approximate shortlist (worker.ann) costs in quality: the same queries searched with
the exact coarse scan and with the ANN shortlist (uncompressed and compressed), side by side.

The benchmark's index (lab.bench_quality) is small, so here the ANN is forced on (`ann="on"`);
in the product it is asked only above worker.ann.AUTO_MIN_TILES tiles. Held-out scenes only.
With --factories and --ann-windows, only those shortlists, each scanning that many of its best
windows (worker.ranking.RankingConfig.ann_windows), e.g. `--factories OPQ64_256+IVF-PQ64
--ann-windows 256,128`.
Run: scripts/lab bench_ann [--per-placement 2] [--factories A,B] [--ann-windows N,M] [--skip-exact] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lab.bench_quality import build_index, evaluate, summary
from lab.placements import PLACEMENTS
from lab.queries import BENCH_TILES, STYLES, TRAIN_SCENES, make_queries, scene_rasters
from worker import ann
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.search import search
from worker.sketch import prepare_sketch
from worker.store import TileIndex
from worker.tiling import plan_tiles

FACTORIES = {"IVF-Flat": "IVF{nlist},Flat", "OPQ64_256+IVF-PQ64": ann.DEFAULT_FACTORY}
STYLES_USED = ("simple", "sloppy", "strokes", "regions")  # dense to abstract


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-placement", type=int, default=2)
    parser.add_argument("--factories", default=",".join(FACTORIES), help="shortlists to compare (names of FACTORIES)")
    parser.add_argument("--ann-windows", default=str(RankingConfig.ann_windows),
                        help="best windows of the shortlist scanned exactly, one row each")
    parser.add_argument("--skip-exact", action="store_true", help="no exact-scan row (the slowest; deterministic)")
    parser.add_argument("--out", type=Path, default=None, help="write ann_quality.md here")
    args = parser.parse_args()
    model = load_model(device="cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-ann-"))
    try:
        build_index(work / "index", model)
        queries = [q for q in make_queries(args.per_placement, styles=STYLES_USED) if q.scene not in TRAIN_SCENES]
        grid = {r.path: [t.footprint_pixels() for t in plan_tiles(r, BENCH_TILES)] for r in scene_rasters().values()}
        index = TileIndex.open(work / "index")
        rows = []
        if not args.skip_exact:
            exact = evaluate(lambda q: search(index, model, prepare_sketch(q.image, model.img_size),
                                              RankingConfig(ann="off"), top=10).hits, queries, grid)
            rows.append(("exact scan", "", exact))
        windows = [int(n) for n in args.ann_windows.split(",")]
        for name in args.factories.split(","):
            info = ann.build(index, factory=FACTORIES[name])
            index = TileIndex.open(work / "index")  # a fresh view, so the new ANN files are read
            for n in windows:
                ranking = RankingConfig(ann="on", ann_windows=n)
                outcomes = evaluate(lambda q: search(index, model, prepare_sketch(q.image, model.img_size),
                                                     ranking, top=10).hits, queries, grid)
                label = name if len(windows) == 1 else f"{name}, best {n} windows scanned"
                rows.append((label, f"{info.vectors} windows, {info.bytes_on_disk / info.vectors:.0f} B each", outcomes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["# ANN shortlist against the exact scan", "",
             f"Command: `scripts/lab bench_ann {' '.join(sys.argv[1:])}`; held-out scenes, styles "
             f"{', '.join(STYLES_USED)}; {len(queries)} queries, every placement.", "",
             "| shortlist | size | " + " | ".join(f"R@5 {p}" for p in PLACEMENTS) + " | R@5 | R@10 | IoU | ms p50 |",
             "|---|---|" + "---|" * (len(PLACEMENTS) + 4)]
    for name, size, outcomes in rows:
        by = [summary([o for o in outcomes if o.query.placement == p]) for p in PLACEMENTS]
        s = summary(outcomes)
        lines.append(f"| {name} | {size} | " + " | ".join(f"{b['R@5']:.2f}" for b in by)
                     + f" | {s['R@5']:.2f} | {s['R@10']:.2f} | {s['IoU']:.2f} | {s['ms']:.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ann_quality.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
