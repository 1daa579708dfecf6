"""Command line: `python -m worker index|search|info|serve ...`.

A usage or input error exits 2 with one clear line on stderr; success exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from worker.errors import InputError

log = logging.getLogger("worker")


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} {text!r}: expected {n} comma-separated numbers") from None
    if len(values) != n:
        raise InputError(f"{what} {text!r}: expected {n} comma-separated numbers")
    return values


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} {text!r}: expected comma-separated integers") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_small_patch14_dinov2", help="timm ViT name")
    g.add_argument("--weights", type=Path, default=None,
                   help="backbone checkpoint (safetensors or torch); default: the converted offline DINOv2")
    g.add_argument("--random-weights", action="store_true", help="random backbone (a quality floor for benchmarks)")
    g.add_argument("--sketch-modules", type=Path, default=None,
                   help="trained sketch tokenizer/adapter/scorer (default: the shipped one if present; 'none' to skip)")
    g.add_argument("--img-size", type=int, default=224)
    g.add_argument("--tile-view", default="edges", choices=["edges", "rgb"],
                   help="encode tiles as line drawings (default; bridges sketch and imagery) or as RGB")
    g.add_argument("--ranker", default="layout", choices=["layout", "tokens"],
                   help="layout (default): edge-layout shortlist and re-rank blended with the token score; "
                        "tokens: the paper's global-token shortlist and cross-attention re-rank alone")
    g.add_argument("--token-weight", type=float, default=None,
                   help="weight of the cross-attention token score in the layout ranker's re-rank")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def model_from_args(args: argparse.Namespace):
    from worker.model.loading import load_model

    return load_model(timm_name=args.model, weights=args.weights, random_weights=args.random_weights,
                      sketch_modules=args.sketch_modules, img_size=args.img_size, device=args.device,
                      tile_view=args.tile_view, ranker=args.ranker, token_weight=args.token_weight)


def cmd_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker.index import IndexWriter
    from worker.tiling import TileSettings, find_rasters

    settings = TileSettings(tile=args.tile, overlap=args.overlap, scales=_ints(args.scales, "--scales"),
                            bands=_ints(args.bands, "--bands") if args.bands else None, min_valid=args.min_valid)
    rasters = find_rasters(args.rasters)
    model = model_from_args(args)
    writer = IndexWriter(args.out, model, settings, chunk_tiles=args.chunk_tiles)
    bar = tqdm(total=None, unit="tile", disable=args.quiet)

    def progress(p) -> None:
        bar.total = p.tiles_total
        bar.n = p.tiles_done
        bar.set_postfix(skipped=p.tiles_skipped)
        bar.refresh()

    manifest = writer.build(rasters, progress=progress, batch_size=args.batch_size)
    bar.close()
    print(json.dumps({"index": str(args.out), "tile_count": manifest["tile_count"],
                      "tiles_skipped": sum(r["tiles_skipped"] for r in manifest["rasters"]),
                      "rasters": len(manifest["rasters"])}))
    return 0


def cmd_search(args: argparse.Namespace) -> int:

    from worker.geo import bbox_to_wgs84, parse_crs
    from worker.hits_output import contact_sheet, hits_to_geojson
    from worker.index import TileIndex, check_compatible, write_json_atomic
    from worker.search import search
    from worker.sketch import load_sketch

    index = TileIndex.open(args.index)
    out_crs = parse_crs(args.crs)
    area = bbox_to_wgs84(_floats(args.bbox, 4, "--bbox"), parse_crs(args.bbox_crs)) if args.bbox else None
    model = model_from_args(args)
    check_compatible(index.manifest, model.tile_encoder_fingerprint(), None, args.index)
    sketch = load_sketch(args.sketch, model.img_size, crop_to_ink=args.crop_to_ink)
    if args.top < 1 or args.shortlist < 1:
        raise InputError("--top and --shortlist must be at least 1")
    result = search(index, model, sketch, top=args.top, shortlist=max(args.shortlist, args.top), area_wgs84=area,
                    max_overlap=args.max_overlap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, hits_to_geojson(result.hits, out_crs, {"timings_ms": result.timings_ms}))
    if args.preview:
        args.preview.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(sketch.numpy(), result.hits).save(args.preview)
    print(json.dumps({"hits": len(result.hits), "out": str(args.out), **{k: round(v, 1) for k, v in result.timings_ms.items()}}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from worker.index import TileIndex

    print(json.dumps(TileIndex.open(args.index).info(), indent=1))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from worker.service import serve_from_args

    return serve_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Sketch search worker")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="tile rasters and precompute their tokens (resumable, incremental)")
    p.add_argument("rasters", nargs="+", help="raster files, directories of rasters, or GDAL VRTs")
    p.add_argument("--out", type=Path, required=True, help="index directory (created or extended)")
    p.add_argument("--tile", type=int, default=224, help="tile size in pixels")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap between neighbouring tiles (fraction)")
    p.add_argument("--scales", default="1,2,4", help="window sizes in tiles (2: twice as large, read down)")
    p.add_argument("--bands", default=None, help="R,G,B band numbers (default: from colour interpretation)")
    p.add_argument("--min-valid", type=float, default=0.5, help="skip tiles with less valid (non-nodata) area")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-tiles", type=int, default=256, help="tiles per committed shard (resume granularity)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="find the places that look like a sketch")
    p.add_argument("index", type=Path)
    p.add_argument("--sketch", type=Path, required=True,
                   help="PNG/JPEG of dark strokes on a light background; its frame is the place's frame")
    p.add_argument("--crop-to-ink", action="store_true",
                   help="crop the sketch to its strokes first (the paper's preprocessing, for sketches of objects)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--shortlist", type=int, default=200, help="candidates re-ranked by cross-attention")
    p.add_argument("--bbox", default=None, help="MINX,MINY,MAXX,MAXY search area")
    p.add_argument("--bbox-crs", default="EPSG:4326")
    p.add_argument("--crs", default="EPSG:4326", help="CRS of the output polygons")
    p.add_argument("--max-overlap", type=float, default=0.3,
                   help="hits overlapping a better one by more than this fraction of the smaller are dropped")
    p.add_argument("--out", type=Path, required=True, help="GeoJSON FeatureCollection to write")
    p.add_argument("--preview", type=Path, default=None, help="contact sheet PNG of the sketch and hits")
    add_model_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("info", help="one JSON object describing an index")
    p.add_argument("index", type=Path)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="answer requests over ZeroMQ")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555")
    p.add_argument("--index-root", type=Path, action="append", default=None,
                   help="directory holding indexes (and allowed raster roots); repeatable")
    p.add_argument("--raster-root", type=Path, action="append", default=None,
                   help="directory clients may index rasters from; repeatable (default: the index roots)")
    p.add_argument("--curve-keys", type=Path, default=None,
                   help="directory with server.key_secret and authorized client *.key files")
    p.add_argument("--pub", default=None, help="PUB endpoint for progress events (default: bind port + 1)")
    p.add_argument("--max-message-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--search-timeout", type=float, default=60.0, help="seconds before a search is abandoned")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed work is kept; run the same command again to resume", file=sys.stderr)
        return 130
