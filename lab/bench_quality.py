"""Retrieval quality as users meet it: sketches of places anywhere in real rasters, found or not.

One index of four real rasters (three sensors; the Sentinel-2 scene is the training scene, the
others are held out) is built by the product (`worker.store`), and each query is run through the
product's `worker.search.search`. A query is a frame placed as a user would (lab.placements:
aligned with a tile, shifted, scaled 0.6-1.6x, turned up to 15 degrees, or all at once), drawn
in a style from dense to abstract (lab.queries). A hit is correct when its footprint overlaps the
sketched frame with IoU >= 0.25 in the same raster; localisation is the IoU of the best correct
hit in the top 10. Chance is what a ranker returning random grid tiles would get.
Writes quality.md into --out. `--feedback 2` instead simulates a user who marks hits 👍 / 👎 for
up to 2 rounds (lab.feedback_sim) on the held-out scenes and writes feedback.md; `--styles` adds
the `example` style (query by example: the frame's own pixels, drawn by the worker).
Run: scripts/bench_quality [--quick] [--methods default,layout] [--styles ...,example] [--feedback 2] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.placements import PLACEMENTS, iou
from lab.queries import BENCH_TILES, SCENES, STYLES, TRAIN_SCENES, Query, make_queries, scene_rasters
from worker.store import IndexWriter, TileIndex
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.sketch import prepare_sketch
from worker.tiling import plan_tiles

CORRECT_IOU = 0.25
KS = (1, 5, 10)


@dataclass
class Outcome:
    query: Query
    rank: int | None  # 1-based rank of the first correct hit in the top 10
    best_iou: float  # IoU of the best correct hit in the top 10 (0 when none)
    chance_p: float  # share of grid tiles that would count as correct
    seconds: float


def hit_polygon(hit):
    """A hit's footprint in its raster's pixel coordinates."""
    return hit.footprint_pixels()


def build_index(out: Path, model) -> TileIndex:
    rasters = scene_rasters()
    IndexWriter(out, model, BENCH_TILES, tokens=True).build([Path(r.path) for r in rasters.values()])  # the token rows
    return TileIndex.open(out)


def chance_share(query: Query, grid) -> float:
    """Share of all the index's grid tiles (every raster) that would count as correct."""
    truth = query.frame.pixel_polygon()
    correct = sum(iou(t, truth) >= CORRECT_IOU for t in grid[query.frame.raster.path])
    return correct / sum(len(tiles) for tiles in grid.values())


def evaluate(method, queries: list[Query], grid) -> list[Outcome]:
    outcomes = []
    for q in queries:
        t0 = time.perf_counter()
        hits = method(q)
        seconds = time.perf_counter() - t0
        truth = q.frame.pixel_polygon()
        rank, best = None, 0.0
        for n, hit in enumerate(hits[:10], start=1):
            if hit.raster_path != q.frame.raster.path:
                continue
            overlap = iou(hit_polygon(hit), truth)
            if overlap >= CORRECT_IOU:
                rank = rank or n
                best = max(best, overlap)
        outcomes.append(Outcome(q, rank, best, chance_share(q, grid), seconds))
    return outcomes


def summary(outcomes: list[Outcome]) -> dict:
    if not outcomes:
        return {}
    ranks = np.array([o.rank or 10**6 for o in outcomes])
    p = np.array([o.chance_p for o in outcomes])
    found = [o.best_iou for o in outcomes if o.rank]
    out = {f"R@{k}": float((ranks <= k).mean()) for k in KS}
    out.update({f"chance@{k}": float((1 - (1 - p) ** k).mean()) for k in (5,)})
    out["IoU"] = float(np.median(found)) if found else 0.0
    out["n"] = len(outcomes)
    out["ms"] = 1e3 * float(np.median([o.seconds for o in outcomes]))
    return out


def table(results: dict[str, list[Outcome]], held_out: bool, by: str) -> str:
    """Rows of method x (placement or style), held-out or training scene."""
    keys = PLACEMENTS if by == "placement" else sorted({o.query.style for r in results.values() for o in r})
    cols = ["R@1", "R@5", "R@10", "chance@5", "IoU", "n"]
    lines = [f"| method | {by} | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, outcomes in results.items():
        subset = [o for o in outcomes if (o.query.scene not in TRAIN_SCENES) == held_out]
        for i, key in enumerate((*keys, "all")):
            s = summary([o for o in subset if key == "all" or getattr(o.query, by) == key])
            if s:
                vals = " | ".join(str(s[c]) if c == "n" else f"{s[c]:.2f}" for c in cols)
                lines.append(f"| {name if i == 0 else ''} | {key} | {vals} |")
    return "\n".join(lines)


def cross_table(outcomes: list[Outcome], metric: str = "R@5") -> str:
    """Held-out `metric` of one method by style (rows) and placement (columns)."""
    held = [o for o in outcomes if o.query.scene not in TRAIN_SCENES]
    styles = sorted({o.query.style for o in held})
    lines = ["| style | " + " | ".join(PLACEMENTS) + " | all |", "|---|" + "---|" * (len(PLACEMENTS) + 1)]
    for style in styles:
        cells = []
        for placement in (*PLACEMENTS, None):
            s = summary([o for o in held if o.query.style == style and placement in (None, o.query.placement)])
            cells.append(f"{s[metric]:.2f}" if s else "")
        lines.append(f"| {style} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def product_method(ranking: RankingConfig):
    """The product's search (worker.search) with these ranking settings."""
    from worker.search import search

    def make(index: TileIndex, model):
        return lambda q: search(index, model, prepare_sketch(q.image, model.img_size), ranking, top=10).hits

    return make


METHODS = {
    "default": product_method(RankingConfig()),
    "no verify": product_method(RankingConfig(verify=0)),
    "no tile windows": product_method(RankingConfig(tile_windows=0)),
    "tokens 0.5": product_method(RankingConfig(token_weight=0.5)),
    "one template": product_method(RankingConfig(sizes=(224,), angles=(0.0,))),
    "paper (tokens)": product_method(RankingConfig(ranker="tokens")),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 frames per placement and scene instead of 8")
    parser.add_argument("--per-placement", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of: {', '.join(METHODS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--json", type=Path, default=None, help="also write every query's outcome here")
    parser.add_argument("--styles", default=",".join(STYLES), help="sketch styles (add `example` for query by example)")
    parser.add_argument("--feedback", type=int, default=0,
                        help="rounds of simulated 👍/👎 feedback on the held-out scenes (writes feedback.md)")
    args = parser.parse_args()
    per = args.per_placement or (2 if args.quick else 8)
    model = load_model(device=args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        t0 = time.perf_counter()
        index = build_index(work / "index", model)
        print(f"index: {len(index)} tiles in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        queries = make_queries(per, styles=tuple(args.styles.split(",")))
        print(f"{len(queries)} queries", file=sys.stderr)
        if args.feedback:
            return run_feedback(index, model, [q for q in queries if q.scene not in TRAIN_SCENES], args, per)
        grid = {r.path: [t.footprint_pixels() for t in plan_tiles(r, BENCH_TILES)] for r in scene_rasters().values()}
        results = {}
        for name in args.methods.split(","):
            t1 = time.perf_counter()
            results[name] = evaluate(METHODS[name](index, model), queries, grid)
            print(f"{name}: {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = render(results, per, len(index))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text(report)
    if args.json:
        args.json.write_text(json.dumps({name: [{"scene": o.query.scene, "placement": o.query.placement,
                                                 "style": o.query.style, "rank": o.rank, "iou": o.best_iou,
                                                 "chance_p": o.chance_p} for o in outs]
                                         for name, outs in results.items()}))
    print(report)
    return 0


def run_feedback(index, model, queries: list[Query], args, per: int) -> int:
    """Simulated 👍/👎 rounds on each query (lab.feedback_sim); writes feedback.md."""
    from lab.feedback_sim import simulate

    t0 = time.perf_counter()
    outcomes = []
    for n, q in enumerate(queries, start=1):
        outcomes.append((q, simulate(index, model, q, rounds=args.feedback)))
        if n % 10 == 0:
            print(f"{n}/{len(queries)} queries, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    report = render_feedback(outcomes, per, len(index), args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feedback.md").write_text(report)
    if args.json:
        args.json.write_text(json.dumps([{"scene": q.scene, "placement": q.placement, "style": q.style, **o.ranks}
                                         for q, o in outcomes]))
    print(report)
    return 0


def render_feedback(outcomes, per: int, tiles: int, args) -> str:
    stages = list(outcomes[0][1].ranks) if outcomes else []
    styles = sorted({q.style for q, _ in outcomes})
    head = "| style | n | " + " | ".join(f"R@5 {s} | R@10 {s}" for s in stages) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(stages)]
    for style in (*styles, "all"):
        rows = [o for q, o in outcomes if style in ("all", q.style)]
        cells = []
        for stage in stages:
            ranks = np.array([o.ranks[stage] or 10 ** 6 for o in rows])
            cells.append(f"{(ranks <= 5).mean():.2f} | {(ranks <= 10).mean():.2f}")
        lines.append(f"| {style} | {len(rows)} | " + " | ".join(cells) + " |")
    styles_arg = args.styles
    return "\n".join([
        "# Query by example and relevance feedback", "",
        f"Command: `scripts/bench_quality --per-placement {per} --methods default --styles {styles_arg} "
        f"--feedback {args.feedback}` (seed 0).", "",
        f"Index: {tiles} tiles of the 4 rasters of quality.md; queries only on the held-out scenes "
        "(lsat7, rmnp, osbs), one frame per placement kind and scene drawn in every style. A hit counts when "
        "its footprint has IoU >= 0.25 with the frame.", "",
        "Stages: `before` the search alone; `drop bad` the first list less the hits marked 👎 (the trivial "
        "baseline); `round 1`, `round 2` the product's search with the simulated user's marks "
        "(worker.feedback: Rocchio on the drawn places' fine layout, plus searches like each 👍 place). The "
        "user marks 👍 every shown hit (top 10) that touches the true place, 👎 the best 3 that do not; marks "
        "add up over rounds. A query with no correct hit in the top 10 gets only 👎 marks.", "",
        "`example`: the frame's own pixels drawn by the worker as the query (query by example), searched "
        "WITHOUT leaving out the example's own place, which the product does (so this measures whether the "
        "worker's own drawing of a place finds that place among the others, not other places like it).", "",
        *lines, ""])


def render(results: dict[str, list[Outcome]], per: int, tiles: int) -> str:
    counts = ", ".join(f"{s} ({d})" for s, (_, d) in SCENES.items())
    first = next(iter(results))
    return "\n".join([
        "# Retrieval quality", "",
        f"Command: `scripts/bench_quality --per-placement {per}` (seed 0).", "",
        f"Index: {tiles} tiles of 4 real rasters, built by the product with tile {BENCH_TILES.tile} px, overlap "
        f"{BENCH_TILES.overlap}, scales {list(BENCH_TILES.scales)}: {counts}. Each query is a frame placed in one of "
        "them and drawn as a sketch; a hit counts when its footprint has IoU >= 0.25 with the frame. Placements: "
        "`aligned` exactly a scale-1 tile's window (the easy case), `shifted` anywhere at the tile's size, "
        "`scaled` anywhere at 0.6-1.6x the tile's side, `turned` anywhere turned by up to 15 degrees, `free` all of "
        "these at once. IoU: median over found queries of the best correct hit's IoU with the frame. chance@5: "
        "random grid tiles.", "",
        f"## Held-out scenes, {first}, recall@5 by style and placement", "", cross_table(results[first]), "",
        "## Held-out scenes by placement", "", table(results, True, "placement"), "",
        "## Held-out scenes by style", "", table(results, True, "style"), "",
        "## Training scene (Sentinel-2) by placement", "", table(results, False, "placement"), ""])


if __name__ == "__main__":
    sys.exit(main())
