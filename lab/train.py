#!/usr/bin/env python3
"""Train the sketch-side modules (tokenizer, adapter, cross-attention scorer) on pseudo-sketch pairs.

Pairs come from random windows of the training scene(s) (Sentinel-2 by default) drawn in three
styles with a person's errors (lab.training_pairs). Held-out scenes are evaluated before and
after (token score alone). Writes worker/weights/sketch_modules.safetensors, the product's default.

On a CPU the backbone's sketch outputs are cached and the adapter and scorer train on them.
`--tokenizer` also trains the multi-level tokenizer, which runs the backbone forward and backward
on every step: meant for a GPU (`--device cuda`). A GPU machine without the rasters trains from
a pair set built here (`--save-pairs FILE`, then `--pairs FILE --no-eval` there).
Run: scripts/train [--quick] [--device cuda] [--tokenizer]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from worker.model.loading import SHIPPED_SKETCH_MODULES, load_model
from lab.training import encode_pairs, train
from lab.training_pairs import PairSet


def held_out_recall(model) -> dict:
    """Held-out ranks by the cross-attention token score alone (what training changes)."""
    from lab.token_eval import TRAIN_SCENES, build_gallery, encode_gallery, make_queries, metrics, token_ranks

    gallery = build_gallery()
    queries = [q for q in make_queries(gallery, 12, seed=1) if q.scene not in TRAIN_SCENES]
    return metrics(token_ranks(model, encode_gallery(model, gallery), queries))


def build_training_pairs(args) -> PairSet:
    from lab.queries import SCENES, TRAIN_SCENES

    from worker.assets import load_asset_paths
    from lab.pseudo_sketch import load_hand_strokes
    from lab.training_pairs import build_pairs

    paths = load_asset_paths()
    return build_pairs([Path(paths[SCENES[s][0]]) for s in TRAIN_SCENES], args.windows, args.sketches_per_window,
                       load_hand_strokes(Path(paths["lasa_dir"])), args.seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    parser.add_argument("--windows", type=int, default=600, help="random windows per training raster")
    parser.add_argument("--sketches-per-window", type=int, default=3)
    parser.add_argument("--pairs", type=Path, help="train on this pair set instead of building one")
    parser.add_argument("--save-pairs", type=Path, help="only build the pair set and write it here")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-places", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--tokenizer", action="store_true", help="also train the multi-level tokenizer (GPU)")
    parser.add_argument("--init", type=Path, help="start from these trained modules")
    parser.add_argument("--backbone-weights", type=Path, help="another copy of the default backbone's weights")
    parser.add_argument("--time-limit", type=float, help="minutes of training after which to stop and save")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out check (it needs the rasters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=SHIPPED_SKETCH_MODULES)
    parser.add_argument("--resume", action="store_true", help="continue from the .train-state.pt next to --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.windows, args.steps = 150, 250
    torch.manual_seed(args.seed)
    t0 = time.time()
    pairs = PairSet.load(args.pairs) if args.pairs else build_training_pairs(args)
    if args.save_pairs:
        pairs.save(args.save_pairs)
        print(f"{len(pairs.drawings)} places, {len(pairs.sketches)} sketches -> {args.save_pairs} "
              f"({args.save_pairs.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.0f} s")
        return 0
    model = load_model(weights=args.backbone_weights, device=args.device, sketch_modules=args.init or "none")
    before = None if args.no_eval else held_out_recall(model)
    t1 = time.time()
    cache = encode_pairs(model, pairs, cache_sketch_tokens=not args.tokenizer)
    t_cache = time.time() - t1
    losses = train(model, cache, args.steps, args.seed, batch_places=args.batch_places, lr=args.lr,
                   checkpoint=args.out, resume=args.resume,
                   time_limit_s=None if args.time_limit is None else args.time_limit * 60)
    report = {"held_out_before": before, "held_out_after": None if args.no_eval else held_out_recall(model),
              "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:])),
              "places": int(len(pairs.drawings)), "sketches": int(len(pairs.sketches)), "steps_run": len(losses),
              "tokenizer": args.tokenizer, "init": str(args.init), "device": str(model.device),
              "tokenizer_gate_rms": model.tokenizer.gate.detach().pow(2).mean().sqrt().item(),
              "cache_s": round(t_cache, 1), "total_s": round(time.time() - t0, 1), "checkpoint": str(args.out),
              "checkpoint_bytes": args.out.stat().st_size}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
