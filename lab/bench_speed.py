"""Speed and memory of indexing and searching, measured in one run; prints markdown tables.

1. Indexing a real raster: the product's tiles/s (read, line drawing, edge cells, ViT tokens,
   store) against the raw backbone forward at the same batch size, with each stage timed on the
   same tiles; optionally on a Dask cluster (`--cluster local:2`, worker.distributed).
2. Searching a real index: latency p50/p95 by stage, exact scan and ANN shortlist.
3. The ANN shortlist at scale (worker.ann): `--ann-windows` synthetic windows made from the real
   index's window descriptors (each a real window plus noise, so the data keeps real structure),
   built with the product's factory, memory-mapped, searched with real sketches' query vectors;
   recall@200 against an exact scan of the same vectors, bytes per window, peak memory.
Run: scripts/bench_speed [--quick] [--json FILE] [--device cpu|cuda] [--cluster local:2] [--ann-windows N]
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

from lab.pseudo_sketch import has_lines, pseudo_sketch
from worker import ann, line_drawing, query_templates
from worker.app import ModelOptions
from worker.assets import load_asset_paths
from worker.errors import InputError
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.search import search
from worker.sketch import prepare_sketch
from worker.store import IndexWriter, TileIndex
from worker.store.writer import LocalChunks
from worker.tile_features import cells_on_grid
from worker.tiling import TileSettings, iter_tile_pixels, open_raster, plan_tiles

WINDOWS_PER_TILE = (168 / 112) ** 2  # ANN windows every 112 level px, tiles every 168 (overlap 0.25)
RECALL_AT = 200  # the shortlist's length
TRUE_NEIGHBOURS = 10  # recall: the share of the exact best 10 windows that the ANN's 200 hold


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
    """Seconds per tile of each indexing stage, run one after another on the same tiles."""
    info = open_raster(raster, None)
    tiles = plan_tiles(info, settings)[:n]
    (pixels, t_read) = timed(lambda: list(iter_tile_pixels(info, tiles, model.img_size)))
    out = {"read": t_read, "draw": 0.0, "cells": 0.0, "tokens": 0.0}
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            part = pixels[i:i + batch]
            images, masks = np.stack([p[1] for p in part]), np.stack([p[2] for p in part])
            drawings, t = timed(line_drawing.tile_line_drawings, images, masks)
            out["draw"] += t
            out["tokens"] += timed(model.tile_tokens, drawings)[1]
            out["cells"] += timed(cells_on_grid, drawings[..., 0], [p[0] for p in part], settings.tile, model.device)[1]
    return {k: v / len(tiles) for k, v in out.items()}


def index_tiles_per_s(model, raster: Path, settings: TileSettings, work: Path, batch: int, computer=None) -> tuple[float, int]:
    out = work / f"index-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    manifest = IndexWriter(out, model, settings).build([raster], batch_size=batch, computer=computer)
    seconds = time.perf_counter() - t0
    tiles = sum(r["tiles_total"] for r in manifest["rasters"])
    return tiles / seconds, tiles


# -- 2. search ------------------------------------------------------------------------------------
def sketches(index: TileIndex, model, n: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    info = next(iter(index.rasters.values()))
    out = []
    for tile in rng.permutation(plan_tiles(info, TileSettings()))[:4 * n]:
        image, valid = next(iter(iter_tile_pixels(info, [tile], model.img_size)))[1:]
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


# -- 3. ANN at scale ------------------------------------------------------------------------------
def synthetic_windows(base: np.ndarray, n: int, batch: int, noise: float = 0.1):
    """Batches of `n` unit vectors, each a random mixture of three real windows (Dirichlet
    weights) plus Gaussian noise of `noise` times its norm: as varied as real windows, not copies
    of a few (seeded: the same batches every call)."""
    rng = np.random.default_rng(1)
    sigma = noise / np.sqrt(base.shape[1])
    for start in range(0, n, batch):
        m = min(batch, n - start)
        weights = rng.dirichlet(np.ones(3), m).astype(np.float32)
        x = sum(weights[:, i:i + 1] * base[rng.integers(0, len(base), m)] for i in range(3))
        x = x + rng.normal(0, sigma, (m, base.shape[1])).astype(np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def ann_at_scale(base: np.ndarray, sketches: list[np.ndarray], n: int, work: Path, batch: int = 100_000) -> dict:
    """Build, store, reopen and ask an ANN shortlist of n synthetic windows. `sketches`: each
    sketch's query vectors (worker.ann.query_vectors), asked in one call as the product does;
    recall@200 is measured for each sketch's first (upright, unshifted) vector."""
    import faiss

    nlist = ann.nlist_for(n)
    factory = ann.factory_for(n)
    index = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index.train(next(synthetic_windows(base, min(n, ann.TRAIN_MAX), ann.TRAIN_MAX)))
    for x in synthetic_windows(base, n, batch):
        index.add(x)
    build_s = time.perf_counter() - t0
    path = work / "scale.faiss"
    faiss.write_index(index, str(path))
    del index
    mapped = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    faiss.extract_index_ivf(mapped).nprobe = ann.NPROBE
    times, found = [], []
    for vectors in sketches:
        (_, ids), t = timed(mapped.search, vectors, RECALL_AT)
        times.append(t * 1e3)
        found.append(ids[0])
    queries = np.stack([v[0] for v in sketches])
    exact = [np.full(TRUE_NEIGHBOURS, -np.inf) for _ in queries], [np.zeros(TRUE_NEIGHBOURS, np.int64) for _ in queries]
    offset = 0
    for x in synthetic_windows(base, n, batch):  # the exact best TRUE_NEIGHBOURS of the same vectors, streamed
        scores = queries @ x.T
        for i in range(len(queries)):
            s = np.concatenate([exact[0][i], scores[i]])
            ids = np.concatenate([exact[1][i], np.arange(offset, offset + len(x))])
            keep = np.argpartition(-s, TRUE_NEIGHBOURS)[:TRUE_NEIGHBOURS]
            exact[0][i], exact[1][i] = s[keep], ids[keep]
        offset += len(x)
    recall = np.mean([len(set(f.tolist()) & set(e.tolist())) / TRUE_NEIGHBOURS for f, e in zip(found, exact[1])])
    return {"windows": n, "tiles_equivalent": int(n / WINDOWS_PER_TILE), "factory": factory, "nlist": nlist,
            "build_s": round(build_s, 1), "bytes_per_window": round(path.stat().st_size / n, 1),
            "query_vectors": len(sketches[0]), "sketch_ms_p50": round(pct(times, 50), 2),
            "sketch_ms_p95": round(pct(times, 95), 2),
            "shortlist_recall_at_200": round(float(recall), 3), "peak_rss_mb": round(peak_rss_mb())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tiles, queries and ANN windows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cluster", default=None, help="also index on this Dask cluster (local, local:N, ADDRESS)")
    parser.add_argument("--draw-processes", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="processes that read and draw tiles while this one encodes (worker.drawing_pool)")
    parser.add_argument("--ann-windows", type=int, default=None, help="synthetic ANN windows (default 1M; quick 100k)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    n_tiles, n_queries = (48, 5) if args.quick else (160, 20)
    n_windows = args.ann_windows or (100_000 if args.quick else 1_000_000)
    model = load_model(device=args.device)
    raster = Path(load_asset_paths()["s2_rgb"])
    settings = TileSettings(scales=(2, 4)) if args.quick else TileSettings()  # quick: 44 tiles, not 180
    f: dict = {"device": str(model.device), "batch": args.batch, "raster": raster.name}
    work = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    try:
        f["backbone_tiles_per_s"] = backbone_tiles_per_s(model, args.batch, max(2, n_tiles // args.batch))
        f["stage_ms_per_tile"] = {k: 1e3 * v for k, v in stage_seconds(model, raster, settings, n_tiles, args.batch).items()}
        f["index_tiles_per_s"], f["index_tiles"] = index_tiles_per_s(model, raster, settings, work, args.batch,
                                                                     LocalChunks(model, processes=0))
        f["draw_processes"] = args.draw_processes
        f["index_pool_tiles_per_s"] = index_tiles_per_s(model, raster, settings, work, args.batch,
                                                        LocalChunks(model, processes=args.draw_processes))[0]
        if args.cluster:
            from worker.distributed import ClusterChunks, connect

            with connect(args.cluster) as client:
                chunks = ClusterChunks(client, ModelOptions(device=args.device), model.fingerprint()["tile_encoder"])
                f["cluster"] = args.cluster
                f["cluster_tiles_per_s"] = index_tiles_per_s(model, raster, settings, work, args.batch, chunks)[0]
        index_dir = sorted(work.glob("index-*"))[0]
        index = TileIndex.open(index_dir)
        queries = sketches(index, model, n_queries)
        f["search_exact"] = search_latency(index, model, queries, RankingConfig(ann="off"))
        try:
            f["ann_build"] = ann.build(index).to_json()
            index = TileIndex.open(index_dir)
            f["ann"] = search_latency(index, model, queries, RankingConfig(ann="on"))
        except InputError as exc:  # too few windows (--quick's small index): the scale part still runs
            f["ann_build"], f["ann"] = {"why": str(exc)}, None
        f["bytes_per_tile_on_disk"] = sum(p.stat().st_size for p in (index_dir / "shards").rglob("*")) / len(index)
        f["bytes_per_tile_in_memory"] = {
            "exact": sum(m.cells.nbytes for m in index.maps.values()) / len(index) + index.records.itemsize,
            "ann": ann.BYTES_PER_WINDOW * WINDOWS_PER_TILE + index.records.itemsize}
        base = np.concatenate([ann.window_vectors(m.cells)[0] for m in index.maps.values()])
        qv = [ann.query_vectors(query_templates.build(q, RankingConfig().sizes, RankingConfig().angles,
                                                      model.device).coarse) for q in queries]
        f["ann_scale"] = ann_at_scale(base, qv, n_windows, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if f["ann"]:  # the product's search with the shortlist here, plus the shortlist's own queries at scale
        f["ann"]["e2e_ms_p50"] = f["ann"]["p50"] + f["ann_scale"]["sketch_ms_p50"]
    f["peak_rss_mb"] = round(peak_rss_mb())
    f["shortlist_recall_at_200"] = f["ann_scale"]["shortlist_recall_at_200"]
    report = render(f)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(f, indent=1))
    return 0


def render(f: dict) -> str:
    st = f["stage_ms_per_tile"]
    lines = [f"Device: {f['device']}, batch {f['batch']}, raster {f['raster']} ({f['index_tiles']} tiles at the defaults).", "",
             "| indexing | value |", "|---|---|",
             f"| raw backbone forward | {f['backbone_tiles_per_s']:.1f} tiles/s |",
             f"| product indexing | {f['index_tiles_per_s']:.1f} tiles/s ({f['index_tiles_per_s'] / f['backbone_tiles_per_s']:.2f} of the backbone) |"]
    lines.append(f"| product indexing, tiles read and drawn in {f['draw_processes']} other processes | "
                 f"{f['index_pool_tiles_per_s']:.1f} tiles/s ({f['index_pool_tiles_per_s'] / f['backbone_tiles_per_s']:.2f} of the backbone) |")
    if "cluster_tiles_per_s" in f:
        lines.append(f"| product indexing on `--cluster {f['cluster']}` | {f['cluster_tiles_per_s']:.1f} tiles/s |")
    lines += [f"| stages, ms per tile | read {st['read']:.1f}, line drawing {st['draw']:.1f}, edge cells "
              f"{st['cells']:.1f}, ViT tokens {st['tokens']:.1f} |",
              f"| index on disk | {f['bytes_per_tile_on_disk'] / 1e3:.1f} KB per tile |", "",
              "| search | p50 | p95 | " + " | ".join(k for k in f["search_exact"] if k not in ("p50", "p95")) + " |",
              "|---|---|---|" + "---|" * (len(f["search_exact"]) - 2)]
    for name in ("search_exact", "ann"):
        s = f[name]
        if s is None:
            continue
        lines.append(f"| {name} | {s['p50']:.0f} | {s['p95']:.0f} | "
                     + " | ".join(f"{v:.0f}" for k, v in s.items() if k not in ("p50", "p95", "e2e_ms_p50")) + " |")
    a = f["ann_scale"]
    lines += ["", "| ANN at scale | value |", "|---|---|",
              f"| windows (tiles) | {a['windows']:,} ({a['tiles_equivalent']:,}) |",
              f"| factory | `{a['factory']}` |", f"| build | {a['build_s']} s |",
              f"| on disk | {a['bytes_per_window']} B per window |",
              f"| one sketch's {a['query_vectors']} query vectors, p50 / p95 | {a['sketch_ms_p50']} / {a['sketch_ms_p95']} ms |",
              f"| shortlist recall: share of the exact best {TRUE_NEIGHBOURS} in the ANN's {RECALL_AT} | {a['shortlist_recall_at_200']} |",
              f"| memory per tile: exact scan / ANN | {f['bytes_per_tile_in_memory']['exact'] / 1e3:.1f} KB / "
              f"{f['bytes_per_tile_in_memory']['ann']:.0f} B |",
              f"| peak RSS of this run | {f['peak_rss_mb']} MB |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
