"""Check that the product computes on a GPU what it computes on the CPU, and how fast.

One real raster is indexed once per device by the product (worker.store; on a GPU the tiles are
drawn there, worker.drawing_pool), the stored arrays are compared, and pseudo-sketches of places
anywhere in it (lab.placements) are searched on each device (worker.search); the top-5
placements are compared. Prints indexing and query times per
device. `--random-weights` where the converted backbone is not installed (the check is about the
computation, not the quality).
Run: scripts/lab check_gpu --raster PATH [--random-weights] [--devices cpu,cuda]
(on a GPU machine without the venv: lab/gpu_carry.sh packs what it needs and prints the command)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lab.gpu_speed import without_gpkg_where_pyogrio_is_missing
from lab.placements import random_frame
from lab.pseudo_sketch import has_lines, pseudo_sketch
from worker.model.loading import load_model
from worker.search import search
from worker.sketch import prepare_sketch
from worker.store import IndexWriter, TileIndex
from worker.tiling import TileSettings, open_raster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raster", type=Path, required=True)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--queries", type=int, default=8)
    args = parser.parse_args()
    without_gpkg_where_pyogrio_is_missing()
    settings = TileSettings(scales=(1, 2))
    info = open_raster(args.raster.resolve(), None)
    rng = np.random.default_rng(0)
    sketches = []
    while len(sketches) < args.queries:
        frame = random_frame(info, settings, "free", rng)
        image, valid = frame.read()
        if has_lines(image, valid):
            sketches.append(prepare_sketch(pseudo_sketch(image, "simple", valid=valid), 224))
    work = Path(tempfile.mkdtemp(prefix="check-gpu-"))
    indexes, tops = {}, {}
    for device in args.devices.split(","):
        torch.manual_seed(0)
        model = load_model(device=device, random_weights=args.random_weights,
                           sketch_modules="none" if args.random_weights else None)
        began = time.perf_counter()
        IndexWriter(work / device, model, settings, tokens=True).build([info.path])
        seconds = time.perf_counter() - began
        index = indexes[device] = TileIndex.open(work / device)
        search(index, model, sketches[0])  # warm-up: level maps, scanner
        began = time.perf_counter()
        tops[device] = [[(round(h.placement.cx), round(h.placement.cy), round(h.placement.side), h.placement.angle)
                         for h in search(index, model, s).hits[:5]] for s in sketches]
        query_ms = (time.perf_counter() - began) / len(sketches) * 1e3
        print(f"{device}: indexed {len(index)} tiles in {seconds:.1f} s ({len(index) / seconds:.1f} tiles/s); "
              f"{query_ms:.0f} ms per query", flush=True)
    names = list(indexes)
    for other in names[1:]:
        a, b = indexes[names[0]], indexes[other]
        rel = np.abs(a.global_tokens.astype(np.float32) - b.global_tokens.astype(np.float32)).max()
        apart = np.abs(a.cells_of(np.arange(len(a))).astype(int) - b.cells_of(np.arange(len(b))).astype(int))
        same = np.mean([x == y for x, y in zip(tops[names[0]], tops[other])])
        print(f"{names[0]} vs {other}: records equal {np.array_equal(a.records, b.records)}; global tokens differ by "
              f"at most {rel:.1e}; stored cells by at most {apart.max()} (of 255), {np.mean(apart > 0):.2e} of them "
              f"differ; the same top 5 for {same:.2f} of queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
