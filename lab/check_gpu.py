#!/usr/bin/env python3
"""Check that the model computes on a GPU what it computes on the CPU.

The tiles of one real raster are encoded once per device (what an index stores), the codes are
compared, and pseudo-sketches of places in it are ranked on each device by the worker's two
stages (benchlib.product_scores, the code `search` runs) and their top 5 compared. Prints the
encoding time per device. `--random-weights` where the converted backbone is not installed (the
check is about the computation, not the quality).
Run: scripts/lab check_gpu (on a GPU machine without the venv: PYTHONPATH=. python3 -m lab.check_gpu) --raster PATH [--random-weights] [--devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lab.benchlib import Gallery, GalleryCodes, encode_gallery, product_scores

from worker.model.loading import load_model
from lab.pseudo_sketch import has_lines, pseudo_sketch
from worker.sketch import prepare_sketch
from worker.tiling import TileReader, TileSettings, open_raster, plan_tiles


def encode(model, gallery: Gallery) -> tuple[GalleryCodes, float]:
    began = time.perf_counter()
    codes = encode_gallery(model, gallery)
    return codes, time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raster", type=Path, required=True)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--places", type=int, default=12)
    parser.add_argument("--devices", default="cpu,cuda", help="the reference, then the device checked")
    args = parser.parse_args()
    devices = args.devices.split(",")
    info = open_raster(args.raster, None)
    tiles = plan_tiles(info, TileSettings(tile=112, scales=(1,)))
    with TileReader(info, 224) as reader:
        read = [reader.read(t) for t in tiles]
    images, valid = np.stack([r[0] for r in read]), np.stack([r[1] for r in read])
    gallery = Gallery(tiles, np.full(len(tiles), args.raster.name), images, valid)
    models, codes = [], []
    for device in devices:
        torch.manual_seed(0)  # the same random weights (and untrained modules) on both devices
        models.append(load_model(device=device, random_weights=args.random_weights))
        c, seconds = encode(models[-1], gallery)
        codes.append(c)
        print(f"{device}: encoded {len(images)} tiles in {seconds:.1f} s")
    a, b = codes
    print(f"global tokens: min cosine {np.min(np.sum(a.global_tokens * b.global_tokens, 1)):.5f}; kept token "
          f"positions equal at {np.mean(np.sort(a.positions, 1) == np.sort(b.positions, 1)):.3f}; layouts identical: "
          f"{np.array_equal(a.coarse_layouts, b.coarse_layouts) and np.array_equal(a.fine, b.fine)}")
    rows = [i for i in range(len(images)) if has_lines(images[i], valid[i])]
    rows = rows[:: max(1, len(rows) // args.places)][:args.places]
    sketches = [prepare_sketch(pseudo_sketch(images[i], "canny", valid=valid[i]), 224) for i in rows]
    for ranker in ("layout", "tokens"):
        same, found = 0, [0, 0]
        for row, sketch in zip(rows, sketches):
            tops = []
            for k, (model, c) in enumerate(zip(models, codes)):
                model.config = replace(model.config, ranker=ranker)
                top = np.argsort(-product_scores(model, c, model.encode_sketch(sketch)), kind="stable")[:5]
                tops.append(list(top))
                found[k] += row in top
            same += tops[0] == tops[1]
        print(f"ranker {ranker}: same top 5 for {same} of {len(rows)} sketches; "
              f"true place in the top 5: {devices[0]} {found[0]}, {devices[1]} {found[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
