#!/usr/bin/env python3
"""Train the sketch-side modules (adapter + cross-attention scorer) on pseudo-sketch pairs.

Pairs come from random windows of the training scene(s) (Sentinel-2 by default) drawn in three
styles with a person's errors (worker.pseudo_sketch.augment). Held-out scenes are evaluated
before and after. Writes weights/sketch_modules.safetensors, the product's default.
Run: .venv/bin/python scripts/train.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import SCENES, TRAIN_SCENES, build_gallery, encode_gallery, make_queries, metrics, rank_of  # noqa: E402

from worker.assets import load_asset_paths  # noqa: E402
from worker.model.loading import SHIPPED_SKETCH_MODULES, load_model  # noqa: E402
from worker.pseudo_sketch import load_hand_strokes  # noqa: E402
from worker.training import build_cache, train  # noqa: E402


def held_out_recall(model, gallery, queries) -> dict:
    """Held-out ranks by the cross-attention token score alone (what training changes)."""
    codes = encode_gallery(model, gallery)
    ranks = []
    for q in queries:
        s = model.encode_sketch(q.sketch, tokens=True)
        ranks.append(rank_of(model.token_scores(s, codes.tokens, codes.positions), q.target))
    return metrics(ranks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    parser.add_argument("--windows", type=int, default=600, help="random windows per training raster")
    parser.add_argument("--sketches-per-window", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=SHIPPED_SKETCH_MODULES)
    parser.add_argument("--resume", action="store_true", help="continue from the .train-state.pt next to --out")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.steps = 150, 250
    torch.manual_seed(args.seed)
    paths = load_asset_paths()
    model = load_model(device=args.device, sketch_modules="none")
    gallery = build_gallery()
    held = [q for q in make_queries(gallery, 12 if not args.quick else 4, seed=1) if q.scene not in TRAIN_SCENES]
    before = held_out_recall(model, gallery, held)
    t0 = time.time()
    cache = build_cache(model, [Path(paths[SCENES[s][0]]) for s in TRAIN_SCENES], args.windows,
                        args.sketches_per_window, load_hand_strokes(Path(paths["lasa_dir"])), args.seed)
    t_cache = time.time() - t0
    losses = train(model, cache, args.steps, args.seed, checkpoint=args.out, resume=args.resume)
    after = held_out_recall(model, gallery, held)
    report = {"held_out_before": before, "held_out_after": after, "loss_first_50": float(np.mean(losses[:50])),
              "loss_last_50": float(np.mean(losses[-50:])), "places": int(len(cache.tile_global)),
              "sketches": int(len(cache.place)), "steps": args.steps, "cache_s": round(t_cache, 1),
              "total_s": round(time.time() - t0, 1), "checkpoint": str(args.out),
              "checkpoint_bytes": args.out.stat().st_size}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
