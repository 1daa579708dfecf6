"""Command line: `python -m worker index|search|info|serve ...`.

Flags become the requests of worker.app, and their defaults are those requests' defaults; a
usage or input error exits 2 with one clear line on stderr; success exits 0.
"""

from __future__ import annotations

import _thread
import argparse
import json
import logging
import os
import select
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from wire.protocol import DEFAULT_ENDPOINT, LOG_FORMAT
from worker.ann import AUTO_MIN_TILES
from worker.app import IndexRequest, ModelOptions, SearchRequest
from worker.errors import CorruptIndexError, IndexMismatchError, InputError, numbered
from worker.interrupts import StoppedOnceDone
from worker.ranking import RANKERS
from worker.store.format import JOB_LOCK, IndexLocked, disk_write, holds_an_index, locked_by_another
from worker.service.config import Limits, ServiceConfig
from worker.tiling import TileSettings

if TYPE_CHECKING:
    from worker.store import TileIndex

log = logging.getLogger("worker")


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} {text!r}: expected {n} comma-separated numbers") from None
    if len(values) != n:
        raise InputError(f"{what} {text!r}: expected {n} comma-separated numbers")
    return values


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} {text!r}: expected comma-separated integers") from None


def _listed(values: tuple) -> str:
    return ",".join(str(v) for v in values)


# the service's limits (worker.service.config.Limits), one flag each
LIMIT_HELP = {
    "max_message_bytes": "larger requests are refused with too_large",
    "max_header_bytes": "larger JSON headers (frame 0) are refused with too_large",
    "search_timeout": "seconds from a search's arrival to its timeout reply; the search stops at its next stage",
    "search_threads": "searches computed at once",
    "max_queued_searches": "searches waiting or running at once; more are answered busy",
    "max_jobs": "indexing jobs running at once; more wait in state queued",
    "max_queued_jobs": "indexing jobs waiting; more are answered busy",
    "max_partial_maps_mb": "MiB the maps of an index's rasters still being indexed may take joined in a search; "
                           "larger ones are searched once complete",
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="timm_name", metavar="MODEL", default=None,
                   help="timm ViT name (default: the converted offline DINOv2 ViT-S/14)")
    g.add_argument("--weights", type=Path, default=None,
                   help="backbone checkpoint (safetensors or torch); default: the converted offline DINOv2")
    g.add_argument("--random-weights", action="store_true", help="random backbone (a quality floor for benchmarks)")
    g.add_argument("--sketch-modules", default=None,
                   help="trained sketch tokenizer/adapter/scorer (default: the shipped one if present; 'none' to skip)")
    g.add_argument("--img-size", type=int, default=None, help="model input size in pixels (default: the model's)")
    g.add_argument("--tile-view", default=None, choices=["edges", "rgb"],
                   help="encode tiles as line drawings (default; bridges sketch and imagery) or as RGB")
    g.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: auto")


def model_options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(timm_name=args.timm_name, weights=args.weights, random_weights=args.random_weights,
                        sketch_modules=args.sketch_modules, img_size=args.img_size, device=args.device,
                        tile_view=args.tile_view)


def refuse_while_a_service_job_holds(index_dir: Path) -> None:
    """IndexLocked while a worker service's job of the index is queued or runs: a job queued holds
    only its job lock until it runs."""
    if locked_by_another(index_dir, JOB_LOCK):
        raise IndexLocked(f"{index_dir} has an indexing job of a worker service queued or running: wait for it to "
                          "end (or cancel it), and run this again")


def cmd_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from wire.protocol import others_unfinished
    from worker.app import build_index

    request = IndexRequest.create(args.out, args.rasters, tile=args.tile, overlap=args.overlap,
                                  scales=_ints(args.scales, "--scales"), bands=_ints(args.bands, "--bands"),
                                  min_valid=args.min_valid, chunk_tiles=args.chunk_tiles, batch_size=args.batch_size,
                                  ann=args.ann, tokens=args.tokens or None)
    refuse_while_a_service_job_holds(request.index_dir)
    cluster = None
    if args.cluster is not None:
        from worker.distributed import Cluster

        cluster = Cluster(args.cluster, model_options(args))
    model = model_options(args).load()
    with tqdm(total=None, unit="tile", disable=args.quiet) as bar:  # closed before an error or Ctrl-C is said
        def progress(p) -> None:
            if bar.total is None:  # the run's first report, before its first tile: the rate is of this run's tiles
                bar.initial = p.tiles_done
            bar.total = p.tiles_total
            bar.n = p.tiles_done
            bar.set_postfix(skipped=p.tiles_skipped, refresh=False)
            bar.refresh()

        summary = build_index(request, model, progress=progress, cluster=cluster)
    if summary.unfinished:  # a run adding a raster said nothing of those an earlier run left unfinished
        print(f"warning: {others_unfinished(summary.unfinished)}, which a search meets in part or not at all: name "
              f"them in a run to finish them: {numbered(list(summary.unfinished))}", file=sys.stderr)
    print(json.dumps(summary.to_json()))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from worker.app import check_index, open_index, search_as_it_is
    from worker.geo import is_lon_lat_degrees
    from worker.hits_output import split_at_antimeridian
    from worker.store import write_json_atomic

    index = open_index(args.index)
    inputs_at = ({Path(p).resolve() for p in (args.sketch, args.example) if p is not None}
                 | {Path(r.path) for r in index.rasters.values()})  # held resolved
    check_outputs(args.out, args.preview, index.dir, inputs_at)
    for box, crs, named in ((args.bbox, args.bbox_crs, "bbox"), (args.area, args.area_crs, "area")):
        if crs is not None and not box:  # a CRS alone was ignored unsaid
            raise InputError(f"--{named}-crs is the CRS of --{named}, which is not given: give both, or neither")
    example, area, area_crs = None, _floats(args.bbox, 4, "--bbox") if args.bbox else None, args.bbox_crs
    area_names = ("--bbox", "--bbox-crs")
    if args.example is not None:
        from worker.example_query import Example

        if area is None:
            raise InputError("--example needs --bbox MINX,MINY,MAXX,MAXY: the place's box (in --bbox-crs)")
        example = Example(args.example, area, args.bbox_crs or SearchRequest.bbox_crs)
        area, area_crs = (_floats(args.area, 4, "--area") if args.area else None), args.area_crs
        area_names = ("--area", "--area-crs")
    elif args.sketch is None:
        raise InputError("give --sketch SKETCH.png, or --example RASTER with --bbox (a place to find more of)")
    elif args.area:
        raise InputError("--area is the search area of an --example search; a sketch search's is --bbox")
    else:
        check_sketch_is_no_raster(args.sketch)
    feedback = None
    if args.good or args.bad:
        from worker.feedback import Feedback

        feedback = Feedback(tuple(args.good or ()), tuple(args.bad or ()))
    request = SearchRequest(args.sketch, example=example, feedback=feedback, top=args.top, shortlist=args.shortlist, max_overlap=args.max_overlap,
                            crs=args.crs, bbox=area,
                            bbox_crs=area_crs or SearchRequest.bbox_crs, crop_to_ink=args.crop_to_ink, ranker=args.ranker,
                            token_weight=args.token_weight, ann=args.ann, bbox_names=area_names)
    model = model_options(args).load()
    check_index(index, model)

    def as_it_is_now(outdated: TileIndex) -> TileIndex:
        index = open_index(args.index, earlier=outdated)
        check_index(index, model)
        return index

    outcome = search_as_it_is(request, model, index, as_it_is_now, str(args.index))
    hits = split_at_antimeridian(outcome.hits) if is_lon_lat_degrees(request.out_crs) else outcome.hits  # RFC 7946
    reply = {k: v for k, v in outcome.to_json().items() if k not in ("hits", "timings_ms")}  # as the service's reply
    with disk_write(args.out.parent, SEARCH_THEN):
        args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {**hits, "timings_ms": outcome.timings_ms, **reply}, SEARCH_THEN)
    if args.preview:
        from worker.hits_output import contact_sheet

        sheet = contact_sheet(outcome.sketch.numpy(), outcome.ranked)  # reads the hits' rasters
        with disk_write(args.preview, SEARCH_THEN):
            args.preview.parent.mkdir(parents=True, exist_ok=True)
            sheet.save(args.preview, format=PREVIEW_FORMATS[args.preview.suffix.lower()])
    for said in ([r for r in outcome.left_out if r.get("kind") != "unreadable"] + outcome.changed
                 + outcome.partly_indexed + outcome.unread_places + outcome.out_of_scale + outcome.own_place_only
                 + outcome.example_cut):
        print(f"warning: {said['raster']}: {said['reason']}", file=sys.stderr)  # an unreadable one: said as found
    if not outcome.ranked and area is not None and not outcome.own_place_only:  # an empty file, with no word (a box
        named = "--area" if args.example is not None else "--bbox"  # in another CRS, lat first)
        print(f"warning: no places found in the {named} area ({area_crs or SearchRequest.bbox_crs}, x or longitude "
              "first): check it and its CRS, or search without it", file=sys.stderr)
    elif 0 < len(outcome.ranked) < request.top:  # a file of fewer hits than asked, and no word why
        where = f" in the {'--area' if args.example is not None else '--bbox'} area" if area is not None else ""
        print(f"warning: {len(outcome.ranked)} hits, fewer than --top {request.top}: the candidates re-ranked "
              f"held no more places{where} overlapping the better ones by at most --max-overlap "
              f"{request.max_overlap:g}; a larger --shortlist may find more", file=sys.stderr)
    print(json.dumps({"hits": len(outcome.ranked), "out": str(args.out), **reply,
                      **{k: round(v, 1) for k, v in outcome.timings_ms.items()}}))
    return 0


SEARCH_THEN = "then search again"


def check_sketch_is_no_raster(sketch: Path) -> None:
    """A georeferenced raster given as the sketch (meaning --example: more places like one in
    it) was searched as a drawing of lines, unsaid, or refused as "not a readable PNG/JPEG" with
    no word of --example. One that no image reader opens is refused naming --example; one that
    opens is searched as asked, with a warning. A PNG or JPEG beside a world file (QGIS's
    "Save as Image" of a drawn sketch) is a sketch: no word."""
    import rasterio
    from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError

    from worker.sketch import open_sketch_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(sketch) as raster:
                placed = raster.crs is not None or not raster.transform.is_identity or bool(raster.gcps[0])
                if raster.driver in ("PNG", "JPEG") or not placed:
                    return
                driver = raster.driver
    except (RasterioError, CRSError):
        return  # no raster GDAL reads (or with a CRS it cannot read): the image reader says what it is
    example = (f"to find more places like one in it, give --example {sketch} --bbox MINX,MINY,MAXX,MAXY "
               "(the place's box, in --bbox-crs) instead of --sketch")
    try:
        open_sketch_image(sketch)
    except InputError:
        raise InputError(f"--sketch {sketch} is a georeferenced raster ({driver}), not a drawing: {example}; a "
                         "sketch is a PNG or JPEG of the place's lines") from None
    print(f"warning: --sketch {sketch} is a georeferenced raster ({driver}), searched as a drawing of the place's "
          f"lines; {example}", file=sys.stderr)


GEOJSON_SUFFIXES = (".geojson", ".json")


def check_outputs(out: Path, preview: Path | None, index_dir: Path, inputs_at: set[Path]) -> None:
    """InputError (a StorageError for a folder it may not write in) now, before a search, for
    files it could not write after it, and for files it must not replace: --out replaced any file
    named (a GeoPackage, a raster, an index's manifest, /dev/null as root) and said nothing.
    `inputs_at`: the search's inputs, resolved (the sketch or the example's raster, the index's rasters)."""
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: name the GeoJSON file to write (e.g. {out / 'hits.geojson'})")
    if out.suffix.lower() not in GEOJSON_SUFFIXES:
        raise InputError(f"--out {out}: {out.suffix or 'no extension'} is not GeoJSON, the format it writes; name a "
                         f"{GEOJSON_SUFFIXES[0]} file (a file there of another kind is not replaced)")
    _check_replaceable("--out", out, index_dir, inputs_at, follows_links=False, written_here=_a_hits_file)
    _check_writable("--out", out, follows_links=False)
    if preview is None:
        return
    if preview.is_dir():
        raise InputError(f"--preview {preview} is a folder: name the image to write (e.g. {preview / 'hits.png'})")
    _check_replaceable("--preview", preview, index_dir, inputs_at, follows_links=True, written_here=_an_image)
    for named in {preview, preview.resolve()}:  # the name saved under, and the file a link there replaces
        if PREVIEW_FORMATS.get(named.suffix.lower()) is None:
            raise InputError(f"--preview {preview}: {named.suffix or 'no extension'} is not an image format it "
                             "writes; name a .png or .jpg file")
    _check_writable("--preview", preview, follows_links=True)


PREVIEW_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # a preview's suffix: the format PIL writes


def _a_hits_file(path: Path) -> bool:
    """Whether `path` holds an earlier search's hits (a FeatureCollection with its timings, as
    cmd_search writes it), or nothing (a file made empty for it): --out may replace it, and
    no other GeoJSON (a user's layer)."""
    try:
        size = path.stat().st_size
        if size > MAX_HITS_FILE_BYTES:
            return False
        with open(path, encoding="utf-8-sig") as f:
            written = json.load(f) if size else None
    except (OSError, ValueError, RecursionError):  # unreadable, or not JSON
        return False
    return written is None or (isinstance(written, dict) and written.get("type") == "FeatureCollection"
                               and "timings_ms" in written)


MAX_HITS_FILE_BYTES = 64 << 20  # a search's hits file is far smaller; a larger file is not read to find out


def _an_image(path: Path) -> bool:
    """Whether `path` holds a PNG or JPEG image (an earlier preview), or nothing: --preview may replace it."""
    from PIL import Image, UnidentifiedImageError

    try:
        if not path.stat().st_size:
            return True
        with Image.open(path) as image:
            return image.format in PREVIEW_FORMATS.values()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        return False


def _check_replaceable(option: str, path: Path, index_dir: Path, inputs_at: set[Path], follows_links: bool,
                       written_here: Callable[[Path], bool]) -> None:
    """InputError for an output in an index's folder (the searched one's, or any other's), at one
    of the search's own inputs (the sketch, the example's raster, the index's rasters;
    `inputs_at`, resolved), at something there that is not a plain file, or at a file that
    is not what the option writes (`written_here`: an earlier output, replaced).
    `follows_links`: as _check_writable."""
    where = path.resolve() if follows_links else path.absolute().parent.resolve() / path.name
    for folder in where.parents:
        if folder == index_dir.resolve() or holds_an_index(folder):
            raise InputError(f"{option} {path} lies in the index {folder}: write it outside any index's folder")
    if where in inputs_at:
        raise InputError(f"{option} {path} is one of the search's inputs (the sketch, or a raster): name another file")
    if not follows_links and where.is_symlink():  # the link itself is replaced, not what it points to
        return
    if where.exists() and not where.is_file():
        raise InputError(f"{option} {path} is not a plain file (a device, a pipe or a socket): name a file")
    if where.is_file() and not written_here(where):
        raise InputError(f"{option} {path} exists and is not a file a search writes there (hits as GeoJSON, a preview "
                         "as PNG or JPEG): name another file, or delete it first")


def _check_writable(option: str, path: Path, follows_links: bool) -> None:
    """The folder `path` would be written in, or the nearest one above it that exists (its
    folders are made when it is written), is a folder this process can write a file in, and a
    file already there can be written: permissions alone do not say (root, an immutable file or
    folder, a read-only mount). `follows_links`: the file is written where a link at `path`
    points (PIL's save), not in its place (write_json_atomic)."""
    import tempfile

    if follows_links:
        path = path.resolve()
    if path.is_file():
        with disk_write(path, SEARCH_THEN):
            open(path, "ab").close()  # opened to write, not truncated
    existing = path.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {path}: {existing} is a file, not a folder")
    with disk_write(existing, SEARCH_THEN):
        tempfile.TemporaryFile(dir=existing).close()


def cmd_info(args: argparse.Namespace) -> int:
    from worker.app import damaged_index_info, index_info, open_index

    try:
        print(json.dumps(index_info(open_index(args.index)), indent=1))
    except CorruptIndexError as exc:  # its rasters listed, the ones to index again; then the error, exit 3
        try:
            listing = damaged_index_info(args.index, exc)
        except (CorruptIndexError, KeyError, TypeError):  # its manifest too: the damage alone is said
            raise exc from None
        print(json.dumps(listing, indent=1))
        raise
    return 0


def cmd_build_ann(args: argparse.Namespace) -> int:
    from worker import ann
    from worker.app import open_index

    print(json.dumps(ann.build(open_index(args.index)).to_json()))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from worker.app import RemovalRequest, remove_rasters

    refuse_while_a_service_job_holds(args.index)  # a job queued would index the rasters removed again
    print(json.dumps(remove_rasters(RemovalRequest(args.index, tuple(str(p) for p in args.rasters))).to_json()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from worker.service.startup import serve

    config = ServiceConfig.create(bind=args.bind, pub=args.pub, index_roots=args.index_root,
                                  raster_roots=args.raster_root, curve_keys=args.curve_keys, cluster=args.cluster,
                                  **{name: getattr(args, name) for name in LIMIT_HELP})
    return serve(config, model_options(args), stop_with=args.stop_with)


def _with_verbose(verbose: dict) -> type:
    """The commands' parser class: each takes -v as the main parser does."""
    class CommandParser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.add_argument("-v", "--verbose", **verbose, default=argparse.SUPPRESS)

    return CommandParser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Sketch search worker")
    verbose = {"action": "store_true", "help": "log what the worker does (debug messages too)"}
    parser.add_argument("-v", "--verbose", **verbose)
    # after the command too (serve -v was refused); SUPPRESS: one not given there keeps the first's
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_with_verbose(verbose))

    p = sub.add_parser("index", help="tile rasters and precompute their edge cells (resumable, incremental)")
    p.add_argument("rasters", nargs="+", help="raster files, directories of rasters, or GDAL VRTs")
    p.add_argument("--out", type=Path, required=True, help="index directory (created or extended)")
    own = "an index extended keeps its own, and refuses another; a new one's default: "
    p.add_argument("--tile", type=int, default=None, help=f"tile size in pixels ({own}{TileSettings.tile})")
    p.add_argument("--overlap", type=float, default=None,
                   help=f"overlap between neighbouring tiles, a fraction ({own}{TileSettings.overlap})")
    p.add_argument("--scales", default=None,
                   help=f"window sizes in tiles (2: twice as large, read down; {own}{_listed(TileSettings.scales)})")
    p.add_argument("--bands", default=None,
                   help=f"R,G,B band numbers ({own}from colour interpretation)")
    p.add_argument("--min-valid", type=float, default=None,
                   help=f"skip tiles with less valid (non-nodata) area ({own}{TileSettings.min_valid})")
    p.add_argument("--batch-size", type=int, default=IndexRequest.batch_size, help="default %(default)s")
    p.add_argument("--chunk-tiles", type=int, default=IndexRequest.chunk_tiles,
                   help="tiles per shard (a run commits every 2 s or so; a crash loses what was computed since; default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="compute the tiles on a Dask cluster: local, local:N (N worker processes here) or a scheduler's "
                        "address (tcp://host:8786); every worker must see the rasters at the same paths")
    p.add_argument("--ann", action=argparse.BooleanOptionalAction, default=None,
                   help=f"build the approximate shortlist (FAISS) once the index is complete: by default when it holds "
                        f"{AUTO_MIN_TILES:,} tiles or more (--no-ann: never; one built before is kept up to date)")
    p.add_argument("--tokens", action="store_true",
                   help="also store the tiles' ViT tokens, for `search --ranker tokens` and `--token-weight` (the paper's "
                        "modules; on a CPU about 6x the time and 4x the size of an index; the default search needs none)")
    add_model_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("build-ann", help="build (or rebuild) an index's approximate shortlist for large mosaics")
    p.add_argument("index", type=Path)
    p.set_defaults(func=cmd_build_ann)

    p = sub.add_parser("remove", help="take rasters out of an index (files deleted for good: a search leaves them "
                                      "out, saying so, until they are taken out)")
    p.add_argument("index", type=Path)
    p.add_argument("rasters", nargs="+", type=Path, help="the rasters, as given to `index` or as `info` lists "
                                                           "them, or folders: every raster the index holds below them")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("search", help="find the places that look like a sketch")
    p.add_argument("index", type=Path)
    p.add_argument("--sketch", type=Path, default=None,
                   help="PNG/JPEG of dark strokes on a light background; its frame is the place's frame")
    p.add_argument("--example", default=None, metavar="RASTER",
                   help="search by example instead of a sketch: the place of RASTER in --bbox (in --bbox-crs) is read "
                        "and drawn as the tiles are; the place itself is left out of the hits")
    p.add_argument("--good", action="append", default=None, metavar="ID",
                   help="the id of a hit marked good (a hit's `id` property); repeatable: the search is re-ranked")
    p.add_argument("--bad", action="append", default=None, metavar="ID",
                   help="the id of a hit marked bad; repeatable: it is left out, places like it rank lower")
    p.add_argument("--crop-to-ink", action="store_true",
                   help="crop the sketch to its strokes first (the paper's preprocessing, for sketches of objects)")
    p.add_argument("--top", type=int, default=SearchRequest.top, help="hits to return (default %(default)s)")
    p.add_argument("--shortlist", type=int, default=SearchRequest.shortlist,
                   help="candidates re-ranked (default %(default)s)")
    p.add_argument("--bbox", default=None,
                   help="MINX,MINY,MAXX,MAXY search area (with --example: the example place's box)")
    p.add_argument("--bbox-crs", default=None, help=f"CRS of --bbox (default {SearchRequest.bbox_crs})")
    p.add_argument("--area", default=None, metavar="MINX,MINY,MAXX,MAXY",
                   help="with --example: the search area (a sketch search's is --bbox)")
    p.add_argument("--area-crs", default=None, help=f"CRS of --area (default {SearchRequest.bbox_crs})")
    p.add_argument("--crs", default=SearchRequest.crs, help="CRS of the output polygons (default %(default)s)")
    p.add_argument("--max-overlap", type=float, default=SearchRequest.max_overlap,
                   help="hits overlapping a better one by more than this fraction of the smaller are dropped "
                        "(default %(default)s)")
    p.add_argument("--ranker", default=SearchRequest.ranker, choices=list(RANKERS),
                   help="layout (default): the sketch's edge layout at every placement (offset, size, turn), "
                        "verified on the placed windows; tokens: the paper's global-token shortlist over tiles and "
                        "cross-attention re-rank alone")
    p.add_argument("--ann", default=SearchRequest.ann, choices=("auto", "on", "off"),
                   help=f"the approximate shortlist (`build-ann`): auto asks it from {AUTO_MIN_TILES:,} tiles on, when it "
                        "is current (default %(default)s)")
    p.add_argument("--token-weight", type=float, default=SearchRequest.token_weight,
                   help="share of the aligned cross-attention token score in the layout ranker (default "
                        "%(default)s: off; one ViT pass per query when on)")
    p.add_argument("--out", type=Path, required=True, help="GeoJSON FeatureCollection to write")
    p.add_argument("--preview", type=Path, default=None, help="contact sheet PNG of the sketch and hits")
    add_model_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("info", help="one JSON object describing an index")
    p.add_argument("index", type=Path)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="answer requests over ZeroMQ (docs/protocol.md)")
    p.add_argument("--bind", default=DEFAULT_ENDPOINT, help="request endpoint (default %(default)s)")
    p.add_argument("--index-root", type=Path, action="append", default=None,
                   help="directory holding indexes (default ./indexes); repeatable")
    p.add_argument("--raster-root", type=Path, action="append", default=None,
                   help="directory clients may index rasters from; repeatable (default: the index roots)")
    p.add_argument("--curve-keys", type=Path, default=None,
                   help="directory with server.key_secret and authorized_clients/*.key (needed beyond loopback)")
    p.add_argument("--pub", default=None, help="PUB endpoint for progress events (default: bind port + 1; "
                                               "tcp://HOST:* takes a free port, said in the info reply)")
    p.add_argument("--stop-with", type=int, default=None, metavar="PID",
                   help="stop (indexing jobs commit, as at SIGTERM) once process PID has ended: for a worker an "
                        "application starts (the QGIS plugin gives its own), so that it does not outlive a crash "
                        "(Linux and macOS)")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run indexing jobs on this Dask cluster (local, local:N or a scheduler's address); clients "
                        "cannot choose it")
    for name, help_text in LIMIT_HELP.items():
        default = getattr(Limits, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       help=f"{help_text} (default %(default)s)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


BOX_OPTIONS = ("--bbox", "--area")  # values that start with a minus west of Greenwich or south of the equator


def joined_box_values(argv: list[str]) -> list[str]:
    """`--bbox -75.7,37.6,...` as `--bbox=-75.7,37.6,...`: argparse takes a value starting with
    a minus for an option, unless it is one plain negative number."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in BOX_OPTIONS and i + 1 < len(argv) and argv[i + 1][:1] == "-" and argv[i + 1][1:2] in tuple("0123456789."):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit, `kill`, a container stopping) or SIGHUP (the
    terminal closed): the run stops as at Ctrl-C, committing what it computed; it ended with no
    word and lost what it had computed since its last commit (at SIGHUP, with no word at all).
    `serve` stops its own way (worker.service.startup)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum


def _terminate(signum, frame) -> None:
    if hasattr(signal, "SIGHUP") and signum == signal.SIGHUP:  # the terminal is gone: a write to it fails (EIO),
        devnull = os.open(os.devnull, os.O_WRONLY)  # and the run exited 1 after its commit, unsaid
        for stream in _on_a_terminal:  # a log file or a pipe still takes the run's last lines
            os.dup2(devnull, stream)
        os.close(devnull)
    raise Terminated(signum)


_on_a_terminal: list[int] = []  # stdout and stderr, where a terminal: after a hangup, isatty says no


def stop_when_terminated() -> None:
    """_terminate at SIGTERM, and at SIGHUP unless it is ignored (started with nohup: it runs on)."""
    _on_a_terminal[:] = [stream for stream in (1, 2) if os.isatty(stream)]
    signal.signal(signal.SIGTERM, _terminate)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _terminate)


def stop_lost_in_a_callback(unraisable) -> None:
    """sys.unraisablehook: a Ctrl-C or SIGTERM that arrived while Python ran a callback it cannot
    raise from (a weakref's, a __del__) was printed as "Exception ignored in ..." with its
    traceback, and lost (seen once in a local cluster run's Ctrl-C). It comes again, as if it
    came now, from another thread a moment later (raised in the hook, it would be ignored the same
    way), for the main thread to handle; anything else as Python would."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
        signum = unraisable.exc_value.signum if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        later = threading.Timer(0.05, _thread.interrupt_main, (signum,))  # once the hook has returned
        later.daemon = True
        later.start()
        return
    sys.__unraisablehook__(unraisable)


def warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning without -v: a library's warning as one line, not with the file and
    source line it came from (rasterio's NotGeoreferencedWarning, two lines of its code above
    the refusal of a raster without a CRS)."""
    print(f"warning: {message}", file=sys.stderr)


class CommandLineFormatter(logging.Formatter):
    """A command's log line as its own lines are said (`warning: ...`): it came with a time and
    a logger's name, unlike the `warning:` and `error:` lines beside it. A service's log, and
    -v, keep them (LOG_FORMAT)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(joined_box_values(sys.argv[1:] if argv is None else list(argv)))
    said = logging.StreamHandler()
    said.setFormatter(logging.Formatter(LOG_FORMAT) if args.verbose or args.func is cmd_serve
                      else CommandLineFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[said])
    if not args.verbose:
        warnings.showwarning = warning_line
        if args.func is cmd_serve:  # a service's log says what it does (its jobs), not its warnings alone
            logging.getLogger("worker").setLevel(logging.INFO)
    stop_when_terminated()
    sys.unraisablehook = stop_lost_in_a_callback
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader gone is said below, not as an error ignored at exit
        return status
    except (IndexMismatchError, CorruptIndexError) as exc:  # the index must be built again (scripts/demo does)
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        said, status = stopped_said(exc, resumes=args.func is cmd_index)  # a search, a removal: none to resume
        print(said, file=sys.stderr)
        return status
    except BrokenPipeError:
        if not _reader_gone():  # another pipe (a socket, a pool's): a failure to see
            raise
        # its reader stopped reading (`info | head`): said as a shell says it, not as a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit fails no more
        return 128 + 13  # SIGPIPE's number (signal.SIGPIPE is not on every system)


def _reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (its write end polls as an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or no standard output
        return False


def stopped_said(exc: KeyboardInterrupt, resumes: bool) -> tuple[str, int]:
    """What a command stopped by Ctrl-C, SIGTERM or SIGHUP says, and its exit status; `resumes`:
    run again, it goes on where it stopped."""
    stop = exc.stop if isinstance(exc, StoppedOnceDone) else exc
    how = "terminated" if isinstance(stop, Terminated) else "interrupted"
    status = 128 + (stop.signum if isinstance(stop, Terminated) else signal.SIGINT)
    if isinstance(exc, StoppedOnceDone):
        return f"{how} once {exc.done}", status
    return (f"{how}: committed work is kept; run the same command again to resume" if resumes else how), status
