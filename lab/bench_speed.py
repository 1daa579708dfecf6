#!/usr/bin/env python3
"""Speed of indexing and querying, measured in one run; prints a markdown table.

- indexing throughput (tiles/s) against the raw backbone forward at the same batch size;
- query latency p50/p95 split into stages, in process and end to end through a real ZeroMQ
  worker, at 1k to 1M tiles (synthetic token rows: random globals, token arrays written as
  sparse files, so timing matches real data without writing 37 GB);
- the naive reference: re-encoding every candidate tile per query;
- index bytes per tile and the worker's peak resident memory.
Run: scripts/bench_speed [--quick] [--json FILE] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from worker import edge_layout
from worker.assets import load_asset_paths
from worker.store import FORMAT_VERSION, RECORD_DTYPE, IndexWriter, TileIndex, write_json_atomic
from worker.model.loading import load_model
from lab.pseudo_sketch import pseudo_sketch
from worker.search import search
from worker.sketch import prepare_sketch
from worker.tiling import TileReader, TileSettings, open_raster, plan_tiles

SHARD = 65536


def pct(values, q) -> float:
    return float(np.percentile(values, q))


def backbone_throughput(model, batch: int, batches: int) -> float:
    x = torch.rand(batch, 3, model.img_size, model.img_size, device=model.device)
    with torch.inference_mode():
        model.vit.forward_features(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            model.vit.forward_features(x)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - t0)


def index_throughput(model, raster: Path, settings: TileSettings, batch: int, workdir: Path) -> tuple[float, int, dict]:
    out = workdir / "real-index"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = IndexWriter(out, model, settings).build([raster], batch_size=batch)
    seconds = time.perf_counter() - t0
    tiles = sum(r["tiles_total"] for r in manifest["rasters"])
    return tiles / seconds, tiles, TileIndex.open(out).info()["sizes"]


def write_synthetic_index(out: Path, model, n: int, rng: np.random.Generator) -> None:
    """A valid index of n tiles over a real raster's grid, with random normalised globals and
    coarse layouts (the rows a shortlist scans); token and fine-layout arrays are sparse files."""
    info = open_raster(Path(load_asset_paths()["s2_rgb"]), None)
    template = plan_tiles(info, TileSettings(scales=(1,)))
    dim, k = model.vit.embed_dim, model.config.tile_tokens
    shards = []
    (out / "shards").mkdir(parents=True)
    for start in range(0, n, SHARD):
        count = min(SHARD, n - start)
        name = f"r00000-c{start // SHARD:06d}"
        d = out / "shards" / name
        d.mkdir()
        rec = np.zeros(count, RECORD_DTYPE)
        pick = rng.integers(0, len(template), count)
        rec["col_off"] = [template[i].col_off for i in pick]
        rec["row_off"] = [template[i].row_off for i in pick]
        rec["width"] = rec["height"] = 224
        rec["scale"] = 1
        rec["valid"] = 1.0
        rec["bounds4326"] = [-75.0, 40.0, -74.9, 40.1]
        np.save(d / "records.npy", rec)
        g = rng.standard_normal((count, dim)).astype(np.float32)
        np.save(d / "global.npy", (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float16))
        np.lib.format.open_memmap(d / "tokens.npy", "w+", np.float16, (count, k, dim)).flush()  # sparse
        pos = np.lib.format.open_memmap(d / "positions.npy", "w+", np.int16, (count, k))
        pos[:] = np.arange(k, dtype=np.int16)
        pos.flush()
        coarse = np.abs(rng.standard_normal((count, edge_layout.COARSE.dim))).astype(np.float32)
        np.save(d / "layout_coarse.npy", edge_layout.unit(coarse).astype(np.float16))
        np.lib.format.open_memmap(d / "layout_fine.npy", "w+", np.uint8, (count, edge_layout.FINE.dim)).flush()  # sparse
        shards.append({"name": name, "raster_id": 0, "chunk": start // SHARD, "count": count, "skipped": 0})
    settings = TileSettings(scales=(1,)).to_json()
    write_json_atomic(out / "manifest.json", {
        "format": FORMAT_VERSION, "model": model.fingerprint(), "tiling": settings, "chunk_tiles": SHARD,
        "rasters": [{"id": 0, **info.to_json(), "complete": True, "tiles_total": n, "tiles_skipped": 0}],
        "shards": shards, "tile_count": n, "created": time.time(), "updated": time.time()})


def demo_sketch(model) -> tuple[torch.Tensor, bytes]:
    import io

    info = open_raster(Path(load_asset_paths()["s2_rgb"]), None)
    tile = plan_tiles(info, TileSettings(scales=(1,)))[40]
    with TileReader(info, model.img_size) as reader:
        img = pseudo_sketch(reader.read(tile)[0], "canny")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return prepare_sketch(img, model.img_size), buf.getvalue()


def in_process_latency(index_dir: Path, model, sketch, repeats: int) -> dict:
    index = TileIndex.open(index_dir)
    search(index, model, sketch, top=10)  # warm-up
    runs = [search(index, model, sketch, top=10).timings_ms for _ in range(repeats)]
    return {k: (pct([r[k] for r in runs], 50), pct([r[k] for r in runs], 95)) for k in runs[0]}


def rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    get = lambda key: float(next(l for l in status if l.startswith(key)).split()[1]) / 1024
    return get("VmRSS:"), get("VmHWM:")


def end_to_end(index_root: Path, name: str, png: bytes, repeats: int, device: str) -> dict:
    from lab.worker_process import WorkerProcess

    proc = WorkerProcess(index_root, index_root, extra=["--device", device]).start(timeout=300)
    try:
        with proc.client(timeout=300) as client:
            client.search(name, sketch_png=png, top=10)  # opens the index
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                client.search(name, sketch_png=png, top=10)
                times.append((time.perf_counter() - t0) * 1e3)
        rss, peak = rss_mb(proc.proc.pid)
    finally:
        proc.stop()
    return {"p50": pct(times, 50), "p95": pct(times, 95), "rss_mb": rss, "peak_rss_mb": peak}


def naive_latency(model, raster: Path, n: int, sketch) -> float:
    """The reference without a precomputed database: encode every candidate tile per query."""
    info = open_raster(raster, None)
    tiles = plan_tiles(info, TileSettings(scales=(1,)))[:n]
    t0 = time.perf_counter()
    with TileReader(info, model.img_size) as reader:
        images = np.stack([reader.read(t)[0] for t in tiles])
    s = model.encode_sketch(sketch, tokens=True)
    outs = [model.encode_tiles(images[i:i + 16]) for i in range(0, len(images), 16)]
    g = np.concatenate([o.global_token for o in outs]).astype(np.float32)
    np.argsort(-(g @ s.global_token.numpy()))
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under a minute: small sizes, few repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None, help="also write the table here")
    parser.add_argument("--sizes", default=None, help="comma-separated tile counts")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([1000, 10_000] if args.quick else [1000, 10_000, 100_000, 1_000_000])
    repeats = 5 if args.quick else 20
    batch = 16
    torch.manual_seed(0)
    model = load_model(device=args.device, sketch_modules="none")
    layout_only = load_model(device=args.device, sketch_modules="none", token_weight=0.0)  # no ViT pass per query
    assets = load_asset_paths()
    work = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    try:
        backbone = backbone_throughput(model, batch, 2 if args.quick else 6)
        raster = Path(assets["rmnp_rgb"] if args.quick else assets["s2_rgb"])
        settings = TileSettings(tile=112, scales=(1,)) if args.quick else TileSettings(scales=(1,))
        indexing, n_real, sizes_real = index_throughput(model, raster, settings, batch, work)
        sketch, png = demo_sketch(model)
        figures = {"device": str(model.device), "backbone_tiles_per_s": backbone, "index_tiles_per_s": indexing,
                   "index_over_backbone": indexing / backbone, "bytes_per_tile": sizes_real["bytes_per_tile"],
                   "query_ms_p50": {}, "query_ms_p95": {}, "e2e_ms_p50": {}, "e2e_ms_p95": {}, "stages_ms_p50": {},
                   "peak_rss_mb": {}, "layout_only_ms_p50": {}}
        for n in sizes:
            index_dir = work / "indexes" / f"n{n}"
            write_synthetic_index(index_dir, model, n, np.random.default_rng(n))
            lat = in_process_latency(index_dir, model, sketch, repeats)
            figures["layout_only_ms_p50"][str(n)] = in_process_latency(index_dir, layout_only, sketch, repeats)["total_ms"][0]
            e2e = end_to_end(work / "indexes", f"n{n}", png, repeats, args.device)
            figures["query_ms_p50"][str(n)] = lat["total_ms"][0]
            figures["query_ms_p95"][str(n)] = lat["total_ms"][1]
            figures["e2e_ms_p50"][str(n)] = e2e["p50"]
            figures["e2e_ms_p95"][str(n)] = e2e["p95"]
            figures["stages_ms_p50"][str(n)] = {k: v[0] for k, v in lat.items()}
            figures["peak_rss_mb"][str(n)] = e2e["peak_rss_mb"]
            shutil.rmtree(index_dir)
            print(f"n={n}: in-process p50 {lat['total_ms'][0]:.0f} ms, end to end p50 {e2e['p50']:.0f} ms, "
                  f"peak RSS {e2e['peak_rss_mb']:.0f} MB", file=sys.stderr)
        naive_n = 32 if args.quick else 100
        figures["naive_ms"] = {str(naive_n): naive_latency(model, Path(assets["s2_rgb"]), naive_n, sketch)}
        figures["naive_tiles"] = naive_n
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = render(figures, n_real, raster.name)
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def render(f: dict, n_real: int, raster: str) -> str:
    lines = [f"Device: {f['device']}. Indexing: {n_real} real tiles of {raster}, batch 16.", "",
             "| measure | value |", "|---|---|",
             f"| raw backbone forward | {f['backbone_tiles_per_s']:.1f} tiles/s |",
             f"| indexing (read, line drawing, encode, filter, store) | {f['index_tiles_per_s']:.1f} tiles/s "
             f"({f['index_over_backbone']:.2f} of the backbone) |",
             f"| index size on disk | {f['bytes_per_tile'] / 1000:.1f} KB per tile |",
             f"| naive: re-encode {f['naive_tiles']} candidate tiles per query | "
             f"{list(f['naive_ms'].values())[0]:.0f} ms per query |", "",
             "| tiles | in process p50 / p95 (ms) | encode | shortlist | re-rank | de-dup | end to end ZeroMQ p50 / p95 (ms) "
             "| worker peak RSS (MB) | `--token-weight 0` in process p50 (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, p50 in f["query_ms_p50"].items():
        st = f["stages_ms_p50"][n]
        lines.append(f"| {int(n):,} | {p50:.0f} / {f['query_ms_p95'][n]:.0f} | {st['encode_ms']:.0f} | {st['shortlist_ms']:.0f} | "
                     f"{st['rerank_ms']:.0f} | {st['dedupe_ms']:.0f} | {f['e2e_ms_p50'][n]:.0f} / {f['e2e_ms_p95'][n]:.0f} | "
                     f"{f['peak_rss_mb'][n]:.0f} | {f['layout_only_ms_p50'][n]:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
