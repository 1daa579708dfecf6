#!/usr/bin/env python3
"""How much contrast a tile needs before its line drawing draws an edge (worker.line_drawing's
contrast floor), measured with the edge layout alone (the default ranking without the token score).

For each floor the gallery's tile drawings and the queries' pseudo-sketches are drawn with that
floor; the places are the same for every floor (those with something to draw at the highest).
Prints recall@5 and mAP on the training scene (where the floor is chosen) and the held-out
scenes, and how crowded the top 5 is with featureless tiles ("flat": tiles the highest floor
leaves without lines, such as open water), counted over queries for places that are not flat.
Run: scripts/lab sweep_contrast_floor [--floors 0,0.005,0.01,0.02]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lab.benchlib import TRAIN_SCENES, GalleryCodes, build_gallery, make_queries, metrics, product_scores, rank_of

from worker import edge_layout
from worker.line_drawing import tile_line_drawings
from worker.model.loading import load_model
from lab.pseudo_sketch import has_lines

STYLES = ("canny", "simple", "wobbly", "sloppy", "partial")  # hed left out: slow on a CPU, same floor


def layout_codes(gallery, floor: float) -> GalleryCodes:
    layouts = edge_layout.describe_drawings(tile_line_drawings(gallery.images, gallery.valid, floor=floor)[..., 0])
    return GalleryCodes(None, layouts.coarse, None, None, layouts.fine)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floors", default="0,0.005,0.01,0.02")
    parser.add_argument("--per-scene", type=int, default=16)
    args = parser.parse_args()
    floors = [float(f) for f in args.floors.split(",")]
    model = load_model(device="cpu", sketch_modules="none", token_weight=0.0)
    gallery = build_gallery()
    flat = np.array([not has_lines(im, v, max(floors)) for im, v in zip(gallery.images, gallery.valid)])
    print(f"{len(gallery.tiles)} tiles, {flat.sum()} flat at floor {max(floors)} "
          f"({', '.join(f'{s} {flat[gallery.scene == s].sum()}' for s in dict.fromkeys(gallery.scene))})")
    print("| floor | train R@5 | train mAP | held-out R@5 | held-out mAP | flat share of top 5 (train) | (held out) |")
    print("|---|---|---|---|---|---|---|")
    for floor in floors:
        codes = layout_codes(gallery, floor)
        queries = make_queries(gallery, args.per_scene, styles=STYLES, floor=floor, sketchable_floor=max(floors))
        ranks, flat_share, held = [], [], []
        for q in queries:
            scores = product_scores(model, codes, model.encode_sketch(q.sketch))
            ranks.append(rank_of(scores, q.target))
            flat_share.append(flat[np.argsort(-scores, kind="stable")[:5]].mean())
            held.append(q.scene not in TRAIN_SCENES)
        ranks, flat_share, held = np.array(ranks), np.array(flat_share), np.array(held)
        train, out = metrics(list(ranks[~held])), metrics(list(ranks[held]))
        print(f"| {floor:g} | {train['R@5']:.3f} | {train['mAP']:.3f} | {out['R@5']:.3f} | {out['mAP']:.3f} | "
              f"{flat_share[~held].mean():.2f} | {flat_share[held].mean():.2f} |", flush=True)
    print(f"{len(queries)} queries: {(~held).sum()} training scene, {held.sum()} held out; styles {', '.join(STYLES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
