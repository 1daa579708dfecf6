"""Speed and memory of indexing and searching, measured in one run; prints markdown tables.

1. Indexing a real raster: the product's tiles/s (read, line drawing, edge cells, ViT tokens,
   store) against the raw backbone forward at the same batch size, with each stage timed on the
   same tiles; then on local Dask clusters of 1 and 2 workers (worker.distributed), start-up apart.
2. Searching a real index in process: latency p50/p95 by stage, exact scan and ANN shortlist.
3. The ANN shortlist at 1M and 10M tiles (lab.ann_scale): synthetic windows built with the
   product's factory into a copy of the real index, searched end to end through a real worker
   over ZeroMQ; shortlist recall against an exact scan of the same vectors, bytes per tile,
   the worker's peak memory.
Run: scripts/bench_speed [--quick] [--json FILE] [--device cpu|cuda] [--cluster-workers 1,2] [--ann-tiles N,M]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lab import ann_scale
from lab.pseudo_sketch import has_lines, pseudo_sketch
from worker import ann, line_drawing
from worker.app import ModelOptions
from worker.assets import load_asset_paths
from worker.drawing_pool import DrawingJob, read_in_threads, read_tiles, run_handles
from worker.errors import InputError
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.search import search
from worker.sketch import prepare_sketch
from worker.store import IndexWriter, TileIndex
from worker.store.format import CHUNK_TILES
from worker.store.writer import LocalChunks
from worker.tile_features import cells_on_grid
from worker.tiling import TileReader, TileSettings, open_raster, plan_tiles



def pct(values, q) -> float:
    return float(np.percentile(values, q))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


# -- 1. indexing --------------------------------------------------------------------------------
def backbone_tiles_per_s(model, batch: int, batches: int) -> float:
    x = torch.rand(batch, 3, model.img_size, model.img_size, device=model.device)
    with torch.inference_mode():
        model.vit.forward_features(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            model.vit.forward_features(x)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - t0)


def stage_seconds(model, raster: Path, settings: TileSettings, n: int, batch: int) -> dict:
    """Seconds per planned tile of each indexing stage, as the product runs them for the model's
    device (worker.drawing_pool), one after another on the first `n` tiles, a batch at a time,
    the device synchronised after each: on a CPU, read one after another and drawn into arrays;
    on a GPU, read in threads and drawn and described there. Tiles with less valid area than the
    settings' `min_valid` are read, not drawn (as in a run); a first batch runs untimed (the
    first calls' costs: kernels, filter matrices, thread pools). Without the reads ahead that
    overlap the stages in a run: where a run misses its goal, these say which stage caps it."""
    info = open_raster(raster, None)
    tiles = plan_tiles(info, settings)[:n]
    job = DrawingJob(info.to_json(), model.img_size, settings.tile, settings.min_valid)
    device = line_drawing.drawing_device(model.device)
    handles = run_handles()
    spent = dict.fromkeys(("read", "draw", "cells", "tokens"), 0.0)

    def lap(stage: str, began: float) -> float:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        spent[stage] += now - began
        return now

    def one_batch(part) -> None:
        began = time.perf_counter()
        read = read_tiles(job, part, handles) if device is None else read_in_threads(job, part, handles)[1]
        read = [r for r in read if r[2].mean() >= settings.min_valid]
        images, masks = np.stack([r[1] for r in read]), np.stack([r[2] for r in read])
        if device is not None:
            images, masks = torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device)
        began = lap("read", began)
        drawings = line_drawing.tile_line_drawings(images, masks)
        began = lap("draw", began)
        cells_on_grid(drawings[..., 0], [r[0] for r in read], settings.tile)
        began = lap("cells", began)
        model.tile_tokens(drawings)
        lap("tokens", began)

    try:
        with torch.inference_mode():
            one_batch(tiles[:batch])
            spent.update(dict.fromkeys(spent, 0.0))
            for start in range(0, len(tiles), batch):
                one_batch(tiles[start:start + batch])
    finally:
        handles.close()
    return {stage: seconds / len(tiles) for stage, seconds in spent.items()}


def index_tiles_per_s(model, raster: Path, settings: TileSettings, work: Path, batch: int, computer=None,
                      chunk_tiles: int = CHUNK_TILES, tokens: bool = True) -> tuple[float, int]:
    """Tiles/s of indexing `raster`, with the ViT tokens unless told (what the backbone and the
    cluster rows compare), into a new index under `work`."""
    out = work / f"index-{'tokens' if tokens else 'default'}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    manifest = IndexWriter(out, model, settings, chunk_tiles, tokens).build([raster], batch_size=batch,
                                                                             computer=computer)
    seconds = time.perf_counter() - t0
    tiles = sum(r["tiles_total"] for r in manifest["rasters"])
    return tiles / seconds, tiles


def shard_bytes_per_tile(index_dir: Path) -> float:
    """Bytes of an index's shards on disk per indexed tile."""
    return sum(p.stat().st_size for p in (index_dir / "shards").rglob("*")) / len(TileIndex.open(index_dir))


# -- 2. search ------------------------------------------------------------------------------------
def sketches(index: TileIndex, model, n: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    info = next(iter(index.rasters.values()))
    out = []
    for tile in rng.permutation(list(plan_tiles(info, TileSettings())))[:4 * n]:
        with TileReader(info, model.img_size) as reader:
            image, valid = reader.read(tile)
        if has_lines(image, valid):
            out.append(prepare_sketch(pseudo_sketch(image, "simple", rng=rng, valid=valid), model.img_size))
        if len(out) == n:
            break
    return out


def search_latency(index: TileIndex, model, queries: list[torch.Tensor], ranking: RankingConfig) -> dict:
    search(index, model, queries[0], ranking)  # warm-up: level maps, scanner
    runs = [search(index, model, q, ranking).timings_ms for q in queries]
    stages = [k for k in runs[0] if k != "total_ms"]
    out = {k[:-3]: pct([r[k] for r in runs], 50) for k in stages}
    out.update(p50=pct([r["total_ms"] for r in runs], 50), p95=pct([r["total_ms"] for r in runs], 95))
    return out


CLUSTER_CHUNK_TILES = 24  # the raster's 189 tiles in 8 chunks, so that every worker has some (one chunk by default)


def cluster_speed(model, raster: Path, settings: TileSettings, work: Path, batch: int, device: str,
                  workers: list[int]) -> tuple[dict, dict]:
    """Tiles/s of indexing on a local Dask cluster of each number of workers, after a warm-up
    chunk that starts the workers and loads their models (its seconds reported apart)."""
    from worker.distributed import ClusterChunks, connect, load_models

    speed, startup = {}, {}
    for n in workers:
        t0 = time.perf_counter()
        with connect(f"local:{n}") as client:
            chunks = ClusterChunks(client, ModelOptions(device=device), model.fingerprint()["tile_encoder"])
            load_models(client, chunks.options)
            startup[str(n)] = time.perf_counter() - t0
            speed[str(n)] = index_tiles_per_s(model, raster, settings, work, batch, chunks, CLUSTER_CHUNK_TILES)[0]
    return speed, startup


def ann_at_scale(index_dir: Path, raster_root: Path, queries: list[torch.Tensor], tile_counts: list[int],
                 work: Path) -> dict:
    """For each tile count: synthetic windows built into a copy of the real index (lab.ann_scale),
    shortlist recall against the exact scan, searches end to end through a real worker."""
    scale_dir = work / "scale" / "index"
    shutil.copytree(index_dir, scale_dir)
    index = TileIndex.open(scale_dir)
    base, base_rows = ann_scale.real_windows(index)
    ranking = RankingConfig()
    vectors = [ann_scale.sketch_vectors(q) for q in queries]
    out: dict = {"e2e_ms_p50": {}, "e2e_ms_p95": {}, "shortlist_recall_at_200": {}, "recall_of_best_10_at_200": {},
                 "bytes_per_tile_in_memory": {}, "peak_rss_mb": {}, "build_s": {}, "windows": {}, "factory": {}}
    for tiles in tile_counts:
        n = int(tiles * ann_scale.WINDOWS_PER_TILE)
        key = str(tiles)
        shutil.rmtree(ann.ann_dir(scale_dir), ignore_errors=True)  # the last size's files: 68 GB of disk at 10M tiles
        built = ann_scale.build_synthetic(index, base, base_rows, n, vectors)
        found = ann_scale.recall(scale_dir, vectors, built["exact"], ranking.ann_neighbours)
        e2e = ann_scale.end_to_end(scale_dir, raster_root, queries)
        out["windows"][key], out["factory"][key], out["build_s"][key] = n, built["factory"], built["build_s"]
        out["shortlist_recall_at_200"][key] = round(found["at200"], 3)
        out["recall_of_best_10_at_200"][key] = round(found["at10"], 3)
        out["e2e_ms_p50"][key], out["e2e_ms_p95"][key] = round(e2e["p50"], 1), round(e2e["p95"], 1)
        out["peak_rss_mb"][key] = round(e2e["peak_rss_mb"])
        out["bytes_per_tile_in_memory"][key] = round(built["bytes"] / tiles + index.records.itemsize, 1)
        print(f"ANN at {tiles:,} tiles: {json.dumps({k: v[key] for k, v in out.items()})}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tiles and queries, 100k ANN tiles")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cluster-workers", default="1,2", help="local Dask cluster sizes to index on ('' for none)")
    parser.add_argument("--draw-processes", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="processes that read and draw tiles while this one encodes (worker.drawing_pool)")
    parser.add_argument("--ann-tiles", default=None,
                        help="tile counts of the ANN at scale (default 1000000,10000000; '' for none)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    n_tiles, n_queries = (48, 5) if args.quick else (160, 20)
    asked = args.ann_tiles if args.ann_tiles is not None else "100000" if args.quick else "1000000,10000000"
    tile_counts = [int(t) for t in asked.split(",") if t]
    model = load_model(device=args.device)
    raster = Path(load_asset_paths()["s2_rgb"])
    settings = TileSettings(scales=(2, 4)) if args.quick else TileSettings()  # quick: 44 tiles, not 180
    f: dict = {"device": str(model.device), "batch": args.batch, "raster": raster.name}
    work = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    try:
        f["backbone_tiles_per_s"] = backbone_tiles_per_s(model, args.batch, max(2, n_tiles // args.batch))
        f["stage_ms_per_tile"] = {k: 1e3 * v for k, v in stage_seconds(model, raster, settings, n_tiles, args.batch).items()}
        f["index_default_tiles_per_s"] = index_tiles_per_s(model, raster, settings, work, args.batch,
                                                           LocalChunks(model, processes=0), tokens=False)[0]
        index_dir = sorted(work.glob("index-default-*"))[0]  # what users build and search
        f["index_tiles_per_s"], f["index_tiles"] = index_tiles_per_s(model, raster, settings, work, args.batch,
                                                                     LocalChunks(model, processes=0))
        f["bytes_per_tile_on_disk_with_tokens"] = shard_bytes_per_tile(sorted(work.glob("index-tokens-*"))[0])
        f["draw_processes"] = args.draw_processes
        f["index_pool_tiles_per_s"] = index_tiles_per_s(model, raster, settings, work, args.batch,
                                                        LocalChunks(model, processes=args.draw_processes))[0]
        if args.cluster_workers:
            workers = [int(n) for n in args.cluster_workers.split(",")]
            f["cluster_tiles_per_s"], f["cluster_startup_s"] = cluster_speed(model, raster, settings, work, args.batch,
                                                                             args.device, workers)
        index = TileIndex.open(index_dir)
        queries = sketches(index, model, n_queries)
        f["search_exact"] = search_latency(index, model, queries, RankingConfig(ann="off"))
        f["search_exact_e2e"] = ann_scale.end_to_end(index_dir, raster.parent, queries, ann_mode="off")
        try:
            f["ann_build"] = ann.build(index).to_json()
            f["search_ann"] = search_latency(TileIndex.open(index_dir), model, queries, RankingConfig(ann="on"))
        except InputError as exc:  # too few windows (--quick's small index): the scale part still runs
            f["ann_build"], f["search_ann"] = {"why": str(exc)}, None
        f["bytes_per_tile_on_disk"] = shard_bytes_per_tile(index_dir)
        f["bytes_per_tile_in_memory_exact"] = (sum(m.cells.nbytes for m in index.maps.values()) / len(index)
                                               + index.records.itemsize)
        f["ann"] = ann_at_scale(index_dir, raster.parent, queries, tile_counts, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f["peak_rss_mb"] = round(peak_rss_mb())
    if args.json:  # before the table: a long run's figures survive a mistake in rendering them
        args.json.write_text(json.dumps(f, indent=1))
    print(render(f))
    return 0


def render(f: dict) -> str:
    st = f["stage_ms_per_tile"]
    backbone = f["backbone_tiles_per_s"]
    lines = [f"Device: {f['device']}, batch {f['batch']}, raster {f['raster']} ({f['index_tiles']} tiles at the defaults).", "",
             "| indexing | value |", "|---|---|",
             f"| raw backbone forward | {backbone:.1f} tiles/s |",
             f"| product indexing, the default (no ViT tokens: what a default search reads) | "
             f"{f['index_default_tiles_per_s']:.1f} tiles/s |",
             f"| product indexing with tokens (`--tokens`) | {f['index_tiles_per_s']:.1f} tiles/s "
             f"({f['index_tiles_per_s'] / backbone:.2f} of the backbone) |",
             f"| product indexing with tokens, tiles read and drawn in {f['draw_processes']} other processes | "
             f"{f['index_pool_tiles_per_s']:.1f} tiles/s ({f['index_pool_tiles_per_s'] / backbone:.2f} of the backbone) |"]
    for n, speed in f.get("cluster_tiles_per_s", {}).items():
        lines.append(f"| product indexing with tokens on a local Dask cluster of {n} worker(s) | {speed:.1f} tiles/s "
                     f"(start-up {f['cluster_startup_s'][n]:.1f} s apart) |")
    lines += [f"| stages, ms per tile | read {st['read']:.1f}, line drawing {st['draw']:.1f}, edge cells "
              f"{st['cells']:.1f}, ViT tokens {st['tokens']:.1f} |",
              f"| index on disk | {f['bytes_per_tile_on_disk'] / 1e3:.1f} KB per tile; with tokens "
              f"{f['bytes_per_tile_on_disk_with_tokens'] / 1e3:.1f} KB |",
              f"| memory a tile costs the exact scan | {f['bytes_per_tile_in_memory_exact'] / 1e3:.1f} KB |", ""]
    stages = [k for k in f["search_exact"] if k not in ("p50", "p95")]
    lines += [f"Search of this {f['index_tiles']}-tile index, in process, ms:", "",
              "| search | p50 | p95 | " + " | ".join(stages) + " |", "|---|---|---|" + "---|" * len(stages)]
    for name in ("search_exact", "search_ann"):
        if f.get(name):
            lines.append(f"| {name} | {f[name]['p50']:.0f} | {f[name]['p95']:.0f} | "
                         + " | ".join(f"{f[name][k]:.0f}" for k in stages) + " |")
    e2e = f["search_exact_e2e"]
    lines += ["", f"The same searches end to end through a worker process over ZeroMQ (exact scan): p50 "
              f"{e2e['p50']:.0f} ms, p95 {e2e['p95']:.0f} ms (what the worker, the wire and reading the sketch add)."]
    a = f["ann"]
    lines += ["", "The ANN shortlist at scale (synthetic windows, lab.ann_scale), searched end to end through a "
              "worker process over ZeroMQ:", "",
              "| tiles | windows | factory | build s | e2e p50 ms | e2e p95 ms | recall of the exact 200 | "
              "of the exact best 10 | bytes per tile of the ANN files (memory-mapped) | worker peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key in a["windows"]:
        lines.append(f"| {int(key):,} | {a['windows'][key]:,} | `{a['factory'][key]}` | {a['build_s'][key]} | "
                     f"{a['e2e_ms_p50'][key]:.0f} | {a['e2e_ms_p95'][key]:.0f} | {a['shortlist_recall_at_200'][key]} | "
                     f"{a['recall_of_best_10_at_200'][key]} | {a['bytes_per_tile_in_memory'][key]} | "
                     f"{a['peak_rss_mb'][key]} |")
    lines += ["", f"Peak RSS of the benchmark process: {f['peak_rss_mb']} MB."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
