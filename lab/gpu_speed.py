"""Indexing speed on a lent GPU machine, which has torch and timm but no venv, assets or backbone.

What issue #16 asks of a GPU: the product's indexing tiles/s against the raw backbone forward at
the same batch size (goal: at least 0.9 of it and 1000 tiles/s). The product indexes a mosaic of
`--copies` copies of one real raster (copies under other names: the tile plan and the work are a
mosaic's that size) as it does on a GPU, the tiles drawn there (worker.drawing_pool), and, for
comparison, drawn on the CPU in a pool of `--processes` processes as the eighteenth stop did.
Each stage of the GPU's path is also timed apart (lab.bench_speed.stage_seconds).
The backbone's weights are random (the converted file does not fit in what a call can carry):
the arithmetic and the data flow are the default model's, the quality is not measured here.
Each figure is one run's; a one-copy build is timed apart (start-up), and the pool's start.
Run there: lab/gpu_carry.sh prints the command (PYTHONPATH=/tmp/site:. python3 -m lab.gpu_speed ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from lab.bench_speed import backbone_tiles_per_s, search_latency, sketches, stage_seconds
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.store import IndexWriter, TileIndex
from worker.store.writer import LocalChunks
from worker.tiling import TileSettings, open_raster


def without_gpkg_where_pyogrio_is_missing() -> bool:
    """Builds skip writing tiles.gpkg where pyogrio is not installed (its wheel and rasterio's do not
    both fit in what a call carries). It is written once per build, after the tiles: 36 us a tile
    on the 2-core CPU (189,000 tiles in 6.8 s, worker.store.gpkg). True where it is skipped."""
    try:
        import pyogrio  # noqa: F401
        return False
    except ImportError:
        import worker.store.writer

        worker.store.writer.write_tiles_gpkg = lambda folder: None
        return True


def mosaic(raster: Path, copies: int, folder: Path) -> list[Path]:
    """`copies` copies of `raster` under other names: a mosaic of that many files to index."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(copies):
        path = folder / f"{raster.stem}_{i:03d}{raster.suffix}"
        shutil.copyfile(raster, path)
        out.append(path)
    return out


def index_speed(model, rasters: list[Path], work: Path, batch: int, processes: int, tokens: bool) -> dict:
    """Tiles/s of the product indexing `rasters` into a new index (with `processes`, the drawing
    pool's start included; with none on a GPU, drawn there)."""
    out = work / f"index-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    manifest = IndexWriter(out, model, TileSettings(), tokens=tokens).build(
        rasters, batch_size=batch, computer=LocalChunks(model, processes=processes))
    seconds = time.perf_counter() - t0
    tiles = sum(r["tiles_total"] for r in manifest["rasters"])
    return {"batch": batch, "processes": processes, "tokens": tokens, "rasters": len(rasters), "tiles": tiles,
            "seconds": round(seconds, 2), "tiles_per_s": round(tiles / seconds, 1), "dir": str(out)}


def pool_start_seconds(processes: int) -> float:
    """Seconds until a DrawingPool's `processes` processes have all answered."""
    from worker.drawing_pool import DrawingPool

    t0 = time.perf_counter()
    pool = DrawingPool(processes)
    [f.result() for f in [pool.submit(time.sleep, 0.2) for _ in range(processes)]]  # 0.2 s each: every process one
    seconds = time.perf_counter() - t0
    pool.close()
    return round(seconds, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raster", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=60)
    parser.add_argument("--batches", default="16,64,256", help="batch sizes of the raw backbone")
    parser.add_argument("--index-batches", default="16,64,256",
                        help="batch sizes of indexing, drawn on the GPU (16: the product's default)")
    parser.add_argument("--backbone-tiles", type=int, default=4096, help="tiles timed through the raw backbone")
    parser.add_argument("--processes", type=int, default=min(15, max(1, (os.cpu_count() or 2) - 1)),
                        help="drawing processes of the comparison with the CPU's drawing (0: none)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    model = load_model(device=args.device, random_weights=True, sketch_modules="none")
    f: dict = {"device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
               "cpus": os.cpu_count(), "torch": torch.__version__, "copies": args.copies,
               "gpkg_skipped": without_gpkg_where_pyogrio_is_missing()}

    def note(key, value):
        f[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(f, indent=1))

    work = Path(tempfile.mkdtemp(prefix="gpu-speed-"))
    try:
        rasters = mosaic(args.raster.resolve(), args.copies, work / "mosaic")
        note("backbone_tiles_per_s", {str(b): round(backbone_tiles_per_s(model, b, max(2, args.backbone_tiles // b)), 1)
                                      for b in batches})
        note("stage_ms_per_tile", {b: {k: round(1e3 * v, 3) for k, v in  # the GPU's path, stage by stage
                                       stage_seconds(model, rasters[0], TileSettings(), 189, b).items()}
                                   for b in (16, 64)})  # one copy is 189 tiles: 12 batches of 16, 3 of 64
        t0 = time.perf_counter()
        for path in rasters[:10]:
            open_raster(path, None)
        note("open_raster_s_per_file", round((time.perf_counter() - t0) / len(rasters[:10]), 3))  # stretch statistics
        pool = args.processes
        note("startup", index_speed(model, rasters[:1], work, 64, 0, False))  # drawn on the GPU: no pool
        index = TileIndex.open(Path(f["startup"]["dir"]))  # one copy, the default index: what users search
        note("search_exact_ms", search_latency(index, model, sketches(index, model, 12), RankingConfig(ann="off")))
        runs = []
        for batch in (int(b) for b in args.index_batches.split(",")):
            for tokens in (False, True):
                runs.append(index_speed(model, rasters, work, batch, 0, tokens))  # the default: drawn on the GPU
                note("indexing", runs)
        if pool:  # the tiles drawn on the CPU in a pool, as before the GPU drew them
            note("pool_start_s", pool_start_seconds(pool))
            for tokens in (False, True):
                runs.append(index_speed(model, rasters, work, 64, pool, tokens))
                note("indexing", runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
