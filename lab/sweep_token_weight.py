#!/usr/bin/env python3
"""How much the paper's cross-attention token score should weigh in the default re-rank, and on
how many of the shortlisted tiles it is worth computing.

Ranks the quality benchmark's gallery and queries (benchlib) with the default two stages
(coarse-layout shortlist, fine layout + w * token score re-rank, the token score computed for
the best n of the shortlist by fine layout) for several weights w and counts n, and prints
recall@5 and mAP on the training scene (where they are chosen) and the held-out scenes.
Run: scripts/lab sweep_token_weight [--sketch-modules PATH] [--weights 0,0.1,...] [--counts 200,64]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from lab.benchlib import (TRAIN_SCENES, build_gallery, encode_gallery, make_queries, metrics,
                      outline_queries, product_scores, rank_of)

from worker.model.loading import SHIPPED_SKETCH_MODULES, load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sketch-modules", type=Path, default=SHIPPED_SKETCH_MODULES)
    parser.add_argument("--weights", default="0,0.05,0.1,0.2,0.3,0.5,1")
    parser.add_argument("--counts", default="200", help="token-scored tiles per query (best by fine layout)")
    parser.add_argument("--per-scene", type=int, default=12)
    args = parser.parse_args()
    settings = [(float(w), int(n)) for n in args.counts.split(",") for w in args.weights.split(",")]
    model = load_model(device="cpu", sketch_modules=args.sketch_modules)
    gallery = build_gallery()
    queries = make_queries(gallery, args.per_scene) + outline_queries(gallery)
    codes = encode_gallery(model, gallery)
    config = model.config
    ranks = {key: [] for key in settings}
    for q in queries:
        s = model.encode_sketch(q.sketch, tokens=True)
        for w, n in settings:
            model.config = replace(config, token_weight=w, token_candidates=n)
            ranks[(w, n)].append(rank_of(product_scores(model, codes, s), q.target))
    held = np.array([q.scene not in TRAIN_SCENES for q in queries])
    styles = sorted({q.style for q in queries})
    print(f"modules: {args.sketch_modules}; {len(queries)} queries ({(~held).sum()} training scene, {held.sum()} held out)")
    print("| w | n | train R@5 | train mAP | held-out R@5 | held-out mAP | " + " | ".join(f"held {s} R@5" for s in styles) + " |")
    print("|---" * (6 + len(styles)) + "|")
    for w, n in settings:
        r = np.array(ranks[(w, n)])
        train, out = metrics(list(r[~held])), metrics(list(r[held]))
        per_style = [metrics([x for x, q, h in zip(r, queries, held) if h and q.style == s]).get("R@5", float("nan"))
                     for s in styles]
        print(f"| {w:g} | {n} | {train['R@5']:.3f} | {train['mAP']:.3f} | {out['R@5']:.3f} | {out['mAP']:.3f} | "
              + " | ".join(f"{v:.2f}" for v in per_style) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
