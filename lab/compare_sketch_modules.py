#!/usr/bin/env python3
"""Compare trained sketch-module files by what training changes: the token score alone, ranking
every gallery tile (lab.token_eval). Prints recall@5, mAP and mean rank
on the training scene (where a file is chosen) and the held-out scenes, and held-out recall@5
per style. Run: scripts/lab compare_sketch_modules A.safetensors [B.safetensors ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lab.token_eval import TRAIN_SCENES, build_gallery, encode_gallery, make_queries, metrics, outline_queries, token_ranks

from worker.model.loading import load_model


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    gallery = build_gallery()
    queries = make_queries(gallery, 12) + outline_queries(gallery)
    codes = encode_gallery(load_model(device="cpu", sketch_modules="none"), gallery)  # tile side: no modules
    held = np.array([q.scene not in TRAIN_SCENES for q in queries])
    styles = sorted({q.style for q in queries})
    print(f"{len(queries)} queries ({(~held).sum()} training scene, {held.sum()} held out)")
    print("| modules | train R@5 | train mAP | train mean rank | held-out R@5 | held-out mAP | held-out mean rank | "
          + " | ".join(f"held {s}" for s in styles) + " |")
    print("|---" * (7 + len(styles)) + "|")
    for path in sys.argv[1:]:
        model = load_model(device="cpu", sketch_modules=path)
        ranks = np.array(token_ranks(model, codes, queries))
        train, out = metrics(list(ranks[~held])), metrics(list(ranks[held]))
        per_style = [metrics([r for r, q, h in zip(ranks, queries, held) if h and q.style == s])["R@5"] for s in styles]
        print(f"| {path} | {train['R@5']:.3f} | {train['mAP']:.3f} | {train['mean rank']:.1f} | {out['R@5']:.3f} | "
              f"{out['mAP']:.3f} | {out['mean rank']:.1f} | " + " | ".join(f"{v:.2f}" for v in per_style) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
