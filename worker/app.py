"""The two use cases, written once for the command line and the service: build an index, search it.

Each request dataclass holds every default and every check of its use case. The CLI (flags) and
the service (message fields) only fill one in, passing None for what the user left out, so the
defaults here apply to both. Modules that import torch are imported where they are used, so
that `python -m worker info` and `--help` stay quick.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from rasterio.crs import CRS

from wire.protocol import DEFAULT_TOP, MAX_TOP, excerpt, others_unfinished
from worker import ann
from worker.cancellation import StopCheck, raise_if_stopped, stop_when
from worker.errors import PLACE_UNREADABLE_HOW, CorruptIndexError, InputError, NotFoundError
from worker.geo import WGS84 as LON_LAT
from worker.geo import BBOX_NAMES, MAX_COORDINATE, Area, bbox_to_wgs84, parse_crs, reproject_rings
from worker.interrupts import StoppedOnceDone
from worker.ranking import RANKERS, RankingConfig
from worker.raster_access import RasterAccess
from worker.store import (CHUNK_TILES, JOB_FILE, IndexProgress, IndexWriter, TileIndex, check_compatible,
                          check_index_folder, check_tokens, read_manifest)
from worker.store.format import IndexLocked, holds_an_index
from worker.store.gpkg import tiles_layer_state
from worker.store.reader import manifest_info
from worker.tiling import RasterInfo, Tile, TileSettings, disk_state, find_rasters

if TYPE_CHECKING:
    from worker.distributed import Cluster
    from worker.example_query import Example
    from worker.feedback import Feedback
    from worker.model.retrieval_model import RetrievalModel
    from worker.search import Hit
    from worker.sketch import StrokeSketch

MAX_CHUNK_TILES = 65536
MAX_SHORTLIST = 100_000
WGS84 = "EPSG:4326"
PIXEL_STROKES = "pixel"  # strokes in pixel coordinates, y down (a sketch pad); any other CRS has y up

SketchSource = Union[bytes, Path, "StrokeSketch"]  # an image's bytes, an image file, or strokes

log = logging.getLogger(__name__)


def given(**options: Any) -> dict:
    """The options a user gave (not None), so that the dataclasses' defaults fill in the rest."""
    return {k: v for k, v in options.items() if v is not None}


# -- the model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelOptions:
    """Which model to load. None keeps the loader's default (worker.model.loading), the one
    place those defaults live."""

    timm_name: str | None = None
    weights: Path | None = None
    random_weights: bool = False
    sketch_modules: Path | str | None = None
    img_size: int | None = None
    device: str | None = None
    tile_view: str | None = None

    def load(self) -> "RetrievalModel":
        from worker.model.loading import load_model

        return load_model(**given(**asdict(self)))


# -- indexing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexRequest:
    """Index (or extend) `index_dir` with `rasters`, cut by `settings`."""

    index_dir: Path
    rasters: tuple[Path, ...]
    settings: TileSettings = field(default_factory=TileSettings)
    chunk_tiles: int = CHUNK_TILES  # tiles per shard (committed every writer.COMMIT_EVERY_S or so)
    batch_size: int = 16  # tiles per forward pass
    access: RasterAccess = field(default_factory=RasterAccess)  # which files it may read (a client: confined)
    # build the ANN shortlist (worker.ann) once the index is complete: True always, False never,
    # None when it holds enough tiles (worker.ann.big_enough); one built before is kept up to date
    ann: bool | None = None
    # store the tiles' ViT tokens, for the "tokens" ranker and a token weight (None: a new index
    # does not; an existing one keeps its own choice). The default search reads none; on this CPU
    # they took about 170-210 of an index's 200-245 CPU ms a tile, and three quarters of its disk
    # (docs/benchmarks/speed.md).
    tokens: bool | None = None

    def __post_init__(self) -> None:
        if not self.rasters:
            raise InputError("no rasters to index: name raster files, folders of rasters or VRTs")
        if not 1 <= self.chunk_tiles <= MAX_CHUNK_TILES:
            raise InputError(f"chunk_tiles {excerpt(self.chunk_tiles)} must be between 1 and {MAX_CHUNK_TILES}")
        if not 1 <= self.batch_size <= MAX_CHUNK_TILES:
            raise InputError(f"batch_size {excerpt(self.batch_size)} must be between 1 and {MAX_CHUNK_TILES}")
        if not 0.0 <= self.settings.min_valid <= 1.0:
            raise InputError(f"share of valid data {excerpt(self.settings.min_valid)} (--min-valid) must be a fraction "
                             "between 0 and 1")

    @classmethod
    def create(cls, index_dir: Path, rasters: Sequence[str | Path], *, tile: int | None = None,
               overlap: float | None = None, scales: Sequence[int] | None = None, bands: Sequence[int] | None = None,
               min_valid: float | None = None, chunk_tiles: int | None = None,
               batch_size: int | None = None, access: RasterAccess = RasterAccess(), ann: bool | None = None,
               tokens: bool | None = None, check_folder: bool = True) -> "IndexRequest":
        """A request from what the user gave (None: the default). The index folder is checked
        (new, empty or an index: never one holding other things; not while a job writes it,
        `check_folder` False) and the raster inputs (files, folders, VRTs) are found on disk and
        allowed by `access` now, so a bad one is refused before any work starts."""
        asked = given(tile=tile, overlap=None if overlap is None else float(overlap),
                      scales=None if scales is None else tuple(scales), bands=tuple(bands) if bands else None,
                      min_valid=None if min_valid is None else float(min_valid))
        settings = TileSettings(**{**_settings_of(Path(index_dir)), **asked})
        if check_folder:
            check_index_folder(Path(index_dir))
        return cls(Path(index_dir), tuple(find_rasters(list(rasters), access)), settings,
                   **given(chunk_tiles=chunk_tiles, batch_size=batch_size), access=access, ann=ann, tokens=tokens)

    def same_work(self, other: "IndexRequest | RemovalRequest") -> bool:
        """Whether `other` asks this request's work again (a resent request): the same index,
        rasters, tile settings and choices."""
        if not isinstance(other, IndexRequest):
            return False
        mine, theirs = self.to_json(), other.to_json()
        return self.index_dir == other.index_dir and all(
            (sorted(mine[k]) if k == "rasters" else mine[k]) == (sorted(theirs[k]) if k == "rasters" else theirs[k])
            for k in ("rasters", "settings", "build_ann", "tokens"))

    def to_json(self) -> dict:
        """What a rerun needs (the service keeps it in the index's job.json)."""
        return {"rasters": [str(p) for p in self.rasters], "settings": self.settings.to_json(),
                "chunk_tiles": self.chunk_tiles, "build_ann": self.ann, "tokens": self.tokens}

    @classmethod
    def from_json(cls, index_dir: Path, d: dict, access: RasterAccess = RasterAccess()) -> "IndexRequest":
        """The request a job file holds; InputError when it is damaged or its rasters are gone."""
        try:
            rasters, settings, chunk_tiles = d["rasters"], TileSettings.from_json(d["settings"]), d.get("chunk_tiles")
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"the job file of {index_dir} is damaged ({excerpt(str(exc))})") from None
        if not isinstance(rasters, list):
            raise InputError(f"the job file of {index_dir} is damaged (rasters is not a list)")
        return cls(Path(index_dir), tuple(find_rasters(rasters, access)), settings,
                   **given(chunk_tiles=chunk_tiles), access=access, ann=_ann_choice(d),
                   tokens=d.get("tokens") if isinstance(d.get("tokens"), bool) else None)


def _settings_of(index_dir: Path) -> dict:
    """The tile settings of the index at `index_dir`, as TileSettings' fields; {} where there is
    none (or it cannot be read: opening it says why). An index is extended with its own settings
    where a request gives none: extending one built with --bands 1,2,3 --scales 1 by naming the
    new rasters alone was refused as another index's settings."""
    if not holds_an_index(index_dir):
        return {}
    try:
        return asdict(TileSettings.from_json(read_manifest(index_dir)["tiling"]))
    except Exception:  # a damaged manifest: the writer says what is wrong with it
        return {}


def _ann_choice(job: dict) -> bool | None:
    """A job file's ANN choice: `build_ann` (True, False or None: by size); files written before
    it have `ann`, whose false was the default, not a choice."""
    if "build_ann" in job:
        return job["build_ann"] if isinstance(job["build_ann"], bool) else None
    return True if job.get("ann") is True else None


@dataclass(frozen=True)
class IndexSummary:
    """What an indexing run left on disk."""

    index_dir: Path
    tile_count: int
    tiles_total: int  # tiles planned over all rasters, skipped ones included
    tiles_skipped: int  # mostly empty (nodata) tiles, not indexed
    rasters: int
    complete: bool  # this request's rasters all indexed (False when the run was stopped: running it again resumes)
    ann: dict | None = None  # the ANN shortlist built or updated (worker.ann.AnnInfo), if any
    # this request's rasters indexed whole with no tile a search can find (nodata, or smaller than a tile)
    without_tiles: tuple[str, ...] = ()
    # the index's other rasters, not asked, still not fully indexed (an earlier run stopped or failed)
    unfinished: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out = {"index": str(self.index_dir), "tile_count": self.tile_count, "tiles_skipped": self.tiles_skipped,
               "rasters": self.rasters, "without_tiles": list(self.without_tiles), "unfinished": list(self.unfinished)}
        return {**out, "ann": self.ann} if self.ann else out


def build_index(request: IndexRequest, model: "RetrievalModel", progress: Callable[[IndexProgress], None] | None = None,
                should_stop: Callable[[], bool] = lambda: False, cluster: "Cluster | None" = None) -> IndexSummary:
    """Index every raster of the request not yet (fully) indexed, here or on `cluster`'s workers
    (worker.distributed). `should_stop` is polled between batches (between chunks on a cluster):
    True stops after the last commit, leaving an index that a rerun completes. Once complete, the
    index's ANN shortlist is built (`request.ann`, by default once the index is big enough) or,
    when it has one, brought up to date."""
    writer = IndexWriter(request.index_dir, model, request.settings, request.chunk_tiles, request.tokens)
    build = partial(writer.build, list(request.rasters), progress=progress, should_stop=should_stop,
                    batch_size=request.batch_size, drivers=request.access.drivers)
    if cluster is None:
        manifest = build()
    else:
        from worker.distributed import ClusterChunks, connect

        with connect(cluster.address) as client:
            manifest = build(computer=ClusterChunks(client, cluster.model, model.fingerprint()["tile_encoder"]))
    rasters = manifest["rasters"]
    asked = {str(path) for path in request.rasters}
    # this request's rasters decide whether its run is complete; the shortlist needs the whole index
    complete = all(r["complete"] for r in rasters if r["path"] in asked)
    unfinished = [r["path"] for r in rasters if not r["complete"]]
    ann_info = None
    has_ann = ann.kept(request.index_dir)
    wanted = ann.big_enough(manifest.get("tile_count", 0)) if request.ann is None else request.ann
    if complete and unfinished and (wanted or has_ann):
        ann_info = {"built": False, "why": f"{others_unfinished(unfinished)}, first {unfinished[0]}: index them "
                                           "again, then the shortlist follows"}
    elif complete and (wanted or has_ann):
        ann_info = _shortlist_kept(TileIndex.open(request.index_dir), update=has_ann, should_stop=should_stop)
    without_tiles = tuple(r["path"] for r in rasters
                          if r["path"] in asked and r["complete"] and (r["tiles_total"] or 0) == r["tiles_skipped"])
    return IndexSummary(request.index_dir, manifest.get("tile_count", 0), sum(r["tiles_total"] or 0 for r in rasters),
                        sum(r["tiles_skipped"] for r in rasters), len(rasters), complete, ann_info, without_tiles,
                        tuple(path for path in unfinished if path not in asked))


@dataclass(frozen=True)
class RemovalRequest:
    """Take `rasters` (their paths as the index names them) out of `index_dir`."""

    index_dir: Path
    rasters: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.rasters:
            raise InputError("no rasters to remove: name them as the index lists them")

    def same_work(self, other: "RemovalRequest | IndexRequest") -> bool:
        """Whether `other` asks this removal again (a resent request)."""
        return (isinstance(other, RemovalRequest) and self.index_dir == other.index_dir
                and set(self.rasters) == set(other.rasters))


@dataclass(frozen=True)
class RemovalSummary:
    """What a removal left: the rasters taken out (as the index named them), the tiles left,
    and the ANN shortlist rebuilt without them (worker.ann.AnnInfo, or why it was not), if the
    index had one."""

    removed: list[str]
    tile_count: int
    ann: dict | None = None

    def to_json(self) -> dict:
        out = {"removed": self.removed, "tile_count": self.tile_count}
        return {**out, "ann": self.ann} if self.ann else out


def remove_rasters(request: RemovalRequest, should_stop: Callable[[], bool] = lambda: False) -> RemovalSummary:
    """Take the request's rasters out of its index (worker.store.removal), then rebuild its ANN
    shortlist without them: until then a search scans exactly, so a failure there (a full disk,
    said in the summary's `ann`) leaves the rasters removed and the index searchable, and the
    next index run or build-ann rebuilds it. NotFoundError, IndexMismatchError or
    CorruptIndexError for no index, one of another format or a damaged manifest (a damaged
    shard is no reason: its raster may be the one to remove); InputError, changing nothing, for
    a raster the index does not hold. `should_stop`: polled while the shortlist is rebuilt."""
    from worker.store.removal import remove_rasters as take_out, taken_out

    read_manifest(request.index_dir)  # no index here is said before the index lock would make its folder
    removed = take_out(request.index_dir, list(request.rasters))
    try:
        _drop_kept_job(request.index_dir)
        shortlist = None
        if ann.kept(request.index_dir):
            try:  # the removal is committed: whatever fails from here on is the shortlist's, said there
                shortlist = _shortlist_kept(open_index(request.index_dir), update=True, should_stop=should_stop)
            except Exception as exc:
                log.exception("%s: rebuilding its ANN shortlist after a removal failed", request.index_dir)
                shortlist = {"built": False, "why": f"rebuilding it failed ({excerpt(str(exc))}): run build-ann"}
    except KeyboardInterrupt as exc:  # said "interrupted" alone, the removal looked undone (probe)
        if isinstance(exc, StoppedOnceDone):  # the shortlist's swap, held whole
            more = f", {exc.done}"
        elif ann.kept(request.index_dir):
            more = ", its ANN shortlist not rebuilt (a search scans exactly until build-ann or an index run rebuilds it)"
        else:
            more = ""
        raise StoppedOnceDone(getattr(exc, "stop", exc), taken_out(len(removed.rasters)) + more) from None
    return RemovalSummary(removed.rasters, removed.tile_count, shortlist)


def _drop_kept_job(index_dir: Path) -> None:
    """Drop the job file of a job a worker could not resume and kept to try again (its rasters
    not there: worker.service.jobs), once rasters are removed: resumed, it indexed them again.
    No job holds it: a removal is refused while one is queued or runs."""
    job_file = Path(index_dir) / JOB_FILE
    if job_file.exists():
        job_file.unlink(missing_ok=True)
        log.warning("%s: its unfinished indexing job is dropped with the removal (it would index the rasters "
                    "removed again): index its other rasters again to finish them", index_dir)


def _shortlist_kept(index: TileIndex, update: bool, should_stop: Callable[[], bool]) -> dict | None:
    """The index's ANN shortlist built, or brought up to date, as a job reports it (AnnInfo);
    where it cannot be (too few windows, a full disk, stopped by `should_stop`), why not: the
    index is fine, and the exact scan serves it. None when there is none to update."""
    try:
        with stop_when(should_stop):
            info = ann.update(index) if update else ann.build(index)
    except InputError as exc:
        return {"built": False, "why": str(exc)}
    return info.to_json() if info else None


def index_info(index: TileIndex) -> dict:
    """What `info` says of an index: its manifest's summary, each raster's file as it is now
    (`on_disk`: info said nothing of a changed raster, not even beside a shortlist "current"),
    its tiles layer's state (`tiles_layer`: an index stopped before writing it looked complete)
    and its ANN shortlist (or none)."""
    return {**with_disk_states(index.info(), index.rasters), "tiles_layer": tiles_layer_state(index.dir, index.manifest),
            "ann": ann.describe(index)}


def damaged_index_info(index_dir: Path, damage: CorruptIndexError) -> dict:
    """What `info` says of an index whose shards cannot be opened (`damage`): its manifest's
    summary, so that the rasters to index again are named; info failed with the damage alone,
    and the advice to index "its rasters" again named none. A damaged manifest raises."""
    manifest = read_manifest(index_dir)
    rasters = {r["id"]: RasterInfo.from_json(r) for r in manifest["rasters"]}
    return {**with_disk_states(manifest_info(index_dir, manifest), rasters), "damaged": [str(damage)]}


def with_disk_states(summary: dict, rasters: dict[int, RasterInfo]) -> dict:
    """An info `summary` with each raster's file as it is now (`on_disk`)."""
    for entry in summary["rasters"]:
        entry["on_disk"] = disk_state(rasters[entry["id"]])
    return summary


def open_index(index_dir: Path, partial_maps_bytes: int | None = None,
               earlier: TileIndex | None = None) -> TileIndex:
    """The committed index in `index_dir`: NotFoundError when there is none, IndexMismatchError
    when it has another format. `partial_maps_bytes`, `earlier`: see TileIndex.open."""
    return TileIndex.open(Path(index_dir), partial_maps_bytes, earlier)


def check_index(index: TileIndex, model: "RetrievalModel", settings: TileSettings | None = None,
                tokens: bool | None = None) -> None:
    """IndexMismatchError when `model` cannot search `index` (another model) or, given
    `settings` or `tokens`, cannot extend it (other tile settings, or built otherwise with tokens)."""
    check_manifest(index.manifest, index.dir, model, settings, tokens)


def check_manifest(manifest: dict, index_dir: Path, model: "RetrievalModel", settings: TileSettings | None = None,
                   tokens: bool | None = None) -> None:
    """check_index by the index's manifest alone: an index whose shards or maps are damaged
    cannot be opened, and indexing it again is what mends it."""
    check_compatible(manifest, model.fingerprint(), settings.to_json() if settings else None, index_dir)
    check_tokens(manifest, tokens, index_dir)


# -- search ------------------------------------------------------------------------------------
def stroke_sketch(strokes: Sequence[Sequence[Sequence[float]]], crs: str | None = None,
                  frame: Sequence[float] | None = None) -> "StrokeSketch":
    """Polylines as drawn: on a map in a CRS (y up; a search takes them onto the rasters' pixel
    grid: worker.map_strokes) or in pixels (y down, the default), framed by `frame`
    (x0, y0, x1, y1; e.g. the sketch pad) or else by their own extent. InputError for a CRS
    that is none, and for strokes past the limits of worker.sketch.StrokeSketch."""
    from worker.sketch import StrokeSketch

    on_a_map = (crs or PIXEL_STROKES) != PIXEL_STROKES
    if on_a_map:
        parse_crs(crs)
    return StrokeSketch(tuple(tuple((float(x), float(y)) for x, y in s) for s in strokes), y_up=on_a_map,
                        frame=tuple(float(v) for v in frame) if frame is not None else None,
                        crs=crs if on_a_map else None)


@dataclass(frozen=True)
class SearchRequest:
    """Find the places that look like `sketch`, or like `example` (a place of a raster, read and
    drawn by the worker; that place itself is left out), re-ranked by `feedback` (the user's marks
    on earlier hits). Checked when made: a bad CRS or box is refused before the model runs."""

    sketch: SketchSource | None
    top: int = DEFAULT_TOP
    shortlist: int = 200  # candidates re-ranked (at least `top`)
    max_overlap: float = 0.3  # hits overlapping a better one by more than this (of the smaller) are dropped
    crs: str = WGS84  # of the output polygons
    bbox: tuple[float, float, float, float] | None = None  # search area, in bbox_crs
    bbox_crs: str = WGS84
    crop_to_ink: bool = False  # crop a sketch image to its strokes first (the paper's object sketches)
    ranker: str = RankingConfig.ranker  # "layout" (every placement) or "tokens" (the paper's two stages alone)
    token_weight: float = RankingConfig.token_weight  # the aligned cross-attention score's share (worker.ranking)
    ann: str = RankingConfig.ann  # the approximate shortlist: auto, on or off (worker.ranking)
    example: "Example | None" = None  # a place as the query, instead of a sketch (worker.example_query)
    feedback: "Feedback | None" = None  # hits marked good and bad (worker.feedback)
    access: RasterAccess = field(default_factory=RasterAccess)  # which rasters an example may be read from
    # the search area's and its CRS's names in errors: an example search's is `--area` on the command line
    bbox_names: tuple[str, str] = field(default=BBOX_NAMES, compare=False, repr=False)
    out_crs: CRS = field(init=False, repr=False, compare=False)
    ranking: RankingConfig = field(init=False, repr=False, compare=False)
    area_wgs84: Area | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.sketch is None) == (self.example is None):
            raise InputError("give a sketch (an image or strokes) or an example place, not "
                             + ("both" if self.sketch is not None else "neither"))
        if not 1 <= self.top <= MAX_TOP:
            raise InputError(f"top {excerpt(self.top)} must be between 1 and {MAX_TOP}")
        if not 1 <= self.shortlist <= MAX_SHORTLIST:
            raise InputError(f"shortlist {excerpt(self.shortlist)} must be between 1 and {MAX_SHORTLIST}")
        if not 0.0 <= self.max_overlap <= 1.0:
            raise InputError(f"max_overlap {excerpt(self.max_overlap)} must be a fraction between 0 and 1")
        if self.ranker not in RANKERS:
            raise InputError(f"ranker {excerpt(self.ranker)} must be one of {', '.join(RANKERS)}")
        if self.bbox is not None and (len(self.bbox) != 4 or not all(abs(float(v)) < MAX_COORDINATE for v in self.bbox)):
            raise InputError(f"{self.bbox_names[0]} {excerpt(list(self.bbox))}: expected MINX,MINY,MAXX,MAXY within "
                             f"+-{MAX_COORDINATE:g}")
        object.__setattr__(self, "out_crs", parse_crs(self.crs))
        object.__setattr__(self, "ranking", RankingConfig(ranker=self.ranker, token_weight=float(self.token_weight),
                                                          shortlist=max(self.top, self.shortlist), ann=self.ann))
        area = (bbox_to_wgs84(tuple(float(v) for v in self.bbox), parse_crs(self.bbox_crs), self.bbox_names)
                if self.bbox else None)
        object.__setattr__(self, "area_wgs84", area)


@dataclass(frozen=True)
class SearchOutcome:
    """The hits of one search, as GeoJSON and as values (for previews)."""

    hits: dict  # GeoJSON FeatureCollection, best first, in the request's CRS
    timings_ms: dict[str, float]
    ranked: list["Hit"]
    sketch: Any  # the model-ready sketch (3, S, S)

    left_out: list[dict] = field(default_factory=list)  # rasters not searched: {raster, kind, reason}
    changed: list[dict] = field(default_factory=list)  # the hits' rasters changed since indexed: {raster, reason}
    # rasters searched in part, their indexing not finished: {raster, tiles_done, tiles_total, reason}
    partly_indexed: list[dict] = field(default_factory=list)
    # rasters searched whose best places could not all be read, those left out: {raster, places, reason}
    unread_places: list[dict] = field(default_factory=list)
    # a place traced on the map, or an example, of a size the index cannot find (worker.place_size)
    out_of_scale: list[dict] = field(default_factory=list)
    # an example search with no hit, every place it found the example's own or kept out by it: {raster, reason}
    own_place_only: list[dict] = field(default_factory=list)
    # an example whose box reaches past its raster, searched by its part on it: {raster, reason}
    example_cut: list[dict] = field(default_factory=list)
    scan: dict | None = None  # how the candidates were found (worker.search.Scan.to_json)

    def to_json(self) -> dict:
        """The search reply's fields."""
        return {"hits": self.hits, "timings_ms": self.timings_ms, "left_out": self.left_out, "changed": self.changed,
                "partly_indexed": self.partly_indexed, "unread_places": self.unread_places,
                "out_of_scale": self.out_of_scale, "own_place_only": self.own_place_only,
                "example_cut": self.example_cut, "scan": self.scan}


def run_search(request: SearchRequest, model: "RetrievalModel", index: TileIndex,
               should_stop: StopCheck | None = None) -> SearchOutcome:
    """Find where the request's sketch lies in `index`; InputError for a sketch that cannot be used.
    `should_stop` (the service's deadline) is checked between stages: when it says so, the
    search ends with SearchStopped (worker.cancellation) and its thread is free again."""
    from worker.hits_output import hits_to_geojson
    from worker.map_strokes import on_the_pixel_grid
    from worker.place_size import EXAMPLE, TRACED, central_part, largest_hit_side, out_of_scale, stroke_place_side
    from worker.query_search import search_query
    from worker.sketch import StrokeSketch

    with stop_when(should_stop):
        refuse_empty(index)
        raise_if_stopped("drawing the sketch")
        own_place, example, sized = None, None, []
        tiling, drawing_size, sizes = index.manifest["tiling"], index.manifest["drawing_size"], request.ranking.sizes
        largest = largest_hit_side(tiling, drawing_size, sizes)  # a larger place is looked for by its central part
        if request.example is not None:
            from worker.example_query import drawn_square, prepare_example

            bands = index.manifest["tiling"].get("bands")
            example = prepare_example(request.example, list(index.rasters.values()), model.img_size,
                                      tuple(bands) if bands else None, request.access, largest,
                                      (index.rasters, index.tiles_per_raster))
            sketch, own_place = example.sketch, example.own_place
            if example.index_view is not None:  # a raster the index does not hold: as the index sees the place
                side, grid_path, lies_on = example.index_view
                sized = out_of_scale(side, grid_path, tiling, drawing_size, sizes, EXAMPLE, lies_on,
                                     central=example.central)
            elif any(r.path == example.raster.path for r in index.rasters.values()):
                side = drawn_square(example.raster, example.window).side  # the box the user chose
                sized = out_of_scale(side, example.raster.path, tiling, drawing_size, sizes, EXAMPLE,
                                     central=example.central)
        else:
            drawn, whole = request.sketch, None
            if isinstance(drawn, StrokeSketch):  # on a map: as the rasters' pixels show the place
                drawn, grid, lies_on = on_the_pixel_grid(drawn, index.rasters, index.tiles_per_raster)
                if grid is not None:
                    whole, drawn = drawn, central_part(drawn, largest)
            sketch, drawn = _drawn_sketch(drawn, whole, model.img_size, request.crop_to_ink)
            if whole is not None:
                sized = out_of_scale(stroke_place_side(whole), grid.path, tiling, drawing_size, sizes, TRACED,
                                     lies_on, central=drawn is not whole)
        raise_if_stopped("the search")
        result = search_query(index, model, sketch, request.ranking, top=request.top, area_wgs84=request.area_wgs84,
                              max_overlap=request.max_overlap, own_place=own_place, feedback=request.feedback)
        raise_if_stopped("writing the hits")
        timings = {k: round(v, 2) for k, v in result.timings_ms.items()}
        unreadable = [{"raster": path, "kind": "unreadable", "reason": why}
                      for path, why in sorted(result.unreadable.items())]
        changed = {c["raster"]: c for c in changed_since_indexed([h.placement.raster for h in result.hits])}
        good, bad = request.feedback.places(index.rasters) if request.feedback is not None else ([], [])
        if request.feedback is not None:  # a mark there named the old pixels, and was read from the new ones
            # said so of a raster with hits too: HITS_CHANGED left out "then search and mark again" (probe)
            marked = [p.raster for p in good + bad if p.raster.path not in result.unreadable]
            changed |= {c["raster"]: c for c in changed_since_indexed(marked, MARK_CHANGED)}
        if example is not None and example.changed:  # said of the example, and of its raster's hits
            changed[example.changed] = {"raster": example.changed, "reason": EXAMPLE_CHANGED}
        not_searched = left_out(index) + unreadable
        partly = partly_indexed(index, result.unreadable, request.area_wgs84)
        unread = [unread_entry(path, places, why, good + bad)
                  for path, (places, why) in sorted(result.unread_places.items())]
        own_only = [{"raster": example.raster.path,
                     "reason": own_place_only(request, bool(not_searched + partly + unread))}
                    ] if example is not None and result.hidden_only else []
        cut = [{"raster": example.raster.path, "reason": example.cut}] if example is not None and example.cut else []
        return SearchOutcome(hits_to_geojson(result.hits, request.out_crs, None), timings, result.hits, sketch,
                             not_searched, sorted(changed.values(), key=lambda c: c["raster"]), partly, unread, sized,
                             own_only, cut, result.scan.to_json())


def _drawn_sketch(drawn: "SketchSource", whole: "StrokeSketch | None", size: int, crop_to_ink: bool):
    """The sketch made ready (worker.sketch.load_sketch), and what of it was drawn: a place's
    central part (worker.place_size.central_part), or the `whole` place where its centre holds
    too little of the strokes to be searched (refused as a sketch that spans too little of its
    frame: a review's case, a large outline with one stroke reaching into the centre's margin,
    searched whole before)."""
    from worker.sketch import load_sketch

    try:
        return load_sketch(drawn, size, crop_to_ink=crop_to_ink), drawn
    except InputError:
        if whole is None or drawn is whole:
            raise
    return load_sketch(whole, size, crop_to_ink=crop_to_ink), whole


def own_place_only(request: SearchRequest, part_unsearched: bool) -> str:
    """Why an example search found nothing when every place it found was the example's own, or
    kept out by it (worker.query_search.own_places): a box over most of a raster, or an area
    round the example. It said nothing, and an empty result looked like a failed search. Where
    some of the index was not searched (`part_unsearched`: rasters left out, searched in part,
    places unread), that is what to wait for, not an index of more rasters."""
    where, wider = (" in the search's area", ", widen the area or search without it") \
        if request.area_wgs84 is not None else ("", "")
    more = ("search again once the rasters and places named as not searched can be" if part_unsearched
            else "search an index holding more rasters")
    return (f"every place found{where} is the example's own place (a search by example never returns it: the square "
            f"round the box, or a place lying mostly inside the box) or overlaps it by more than max_overlap "
            f"{request.max_overlap:g}: choose a smaller box, round what to look for only{wider}, or {more}")


def unread_entry(path: str, places: frozenset, why: str, marks: list) -> dict:
    """A reply's entry for a raster some of whose places (worker.search.place_key) could not be
    read (`why`), among them places the user marked (`marks`: their marks were not used, and
    the user would otherwise wonder why marking a place changed nothing)."""
    from worker.search import place_key

    marked = len(places & {place_key(p) for p in marks if p.raster.path == path})
    which = "that could have been hits" + (f" or were marked ({marked} marked good or bad: those marks were not used)"
                                           if marked else "")
    return {"raster": path, "places": len(places),
            "reason": f"{len(places)} places of it {which} lie where it cannot be read ({why}): left out, the rest "
                      f"of it searched; {PLACE_UNREADABLE_HOW}"}


SEARCH_ATTEMPTS = 3  # searches of an index changed under each of them, before saying so


def search_as_it_is(request: SearchRequest, model: "RetrievalModel", index: TileIndex,
                    reopen: Callable[[TileIndex], TileIndex], named: str,
                    should_stop: StopCheck | None = None) -> SearchOutcome:
    """run_search on `index`, and again on the index as it is now (`reopen` of the outdated
    view) when it changed under the search: a raster removed or indexed again meanwhile made a
    search fail as damaged (its files removed, or a command-line search told to index again the
    raster just removed), or answer with the new raster's features under the removed one's name,
    unsaid. An indexing run's commits only add, and keep the answer. NotFoundError when the
    index (`named` so in messages) was deleted meanwhile; IndexLocked (busy) when it changed
    under every try."""
    attempt = 1
    while True:
        try:
            outcome = run_search(request, model, index, should_stop)
        except CorruptIndexError:
            if not index.outdated():  # damaged as it is now
                raise
            outcome = None
        if outcome is not None and not index.outdated():
            return outcome
        if not holds_an_index(index.dir):
            raise NotFoundError(f"{named} was deleted while this search ran") from None
        if attempt == SEARCH_ATTEMPTS:
            raise IndexLocked(f"{named} changed while each of {SEARCH_ATTEMPTS} searches ran (rasters removed or "
                              "indexed again): search again once it is left alone")
        log.info("%s changed while it was searched (rasters removed or indexed again): searching it as it is now",
                 index.dir)
        attempt += 1
        index = reopen(index)


EXAMPLE_CHANGED = ("changed on disk since it was indexed: the example was read from the file as it is now, while "
                   "the index holds the old pixels' features, by which any hits in it were found; index it again "
                   "(the same index request redoes only the rasters that changed)")


HITS_CHANGED = ("changed on disk since it was indexed: its hits were found by the old pixels' features; index it "
                "again (the same index request redoes only the rasters that changed)")
MARK_CHANGED = ("changed on disk since it was indexed: a place marked in it was named by the old pixels and read "
                "from the file as it is now; index it again (the same index request redoes only the rasters that "
                "changed), then search and mark again")


def changed_since_indexed(rasters: list[RasterInfo], reason: str = HITS_CHANGED) -> list[dict]:
    """Those of `rasters` (the hits', the marks') whose file (or a VRT's sources) changed since
    they were indexed, each with `reason`. Hits there were found by the old pixels' features and
    verified on the new pixels, so they may be wrong, and nothing said so. Only these rasters are
    looked at, a stat each; a VRT's sources (every file of a mosaic) at most once a minute."""
    changed = []
    for raster in {r.path: r for r in rasters}.values():
        if disk_state(raster) == "changed":  # one gone since it was read: the next search leaves it out, saying so
            changed.append({"raster": raster.path, "reason": reason})
    return changed


def refuse_empty(index: TileIndex) -> None:
    """InputError for a complete index holding no tile: its searches answered no hits, as if no
    place looked like the sketch, when no place could."""
    if not index.manifest["rasters"]:
        raise InputError(f"{index.dir.name} holds no rasters (all were removed): index rasters into it")
    if len(index) == 0 and all(r["complete"] for r in index.manifest["rasters"]):
        tiling = index.manifest["tiling"]
        raise InputError(f"{index.dir.name} holds no tiles: none of its rasters' tiles of {tiling['tile']} px holds "
                         f"{100 * tiling['min_valid']:.0f}% valid data (rasters smaller or thinner than a tile, or "
                         "nodata): index them into an index with a smaller tile size or share of valid data (--tile, --min-valid)")


def partly_indexed(index: TileIndex, unreadable: dict[str, str], area_wgs84: Area | None) -> list[dict]:
    """The rasters of `index` a search met only in part, their indexing not finished (a run under
    way, or one that stopped or failed): nothing said that the rest of them was not searched.
    Those `unreadable` now are said as such, and those wholly outside the search's area not at all."""
    partly = index.partly_indexed
    met = [r for r in sorted(partly) if index.rasters[r].path not in unreadable]
    if area_wgs84 is not None:
        whole = [Tile(index.rasters[r], 0, 0, index.rasters[r].width, index.rasters[r].height, 1) for r in met]
        met = [r for r, footprint in zip(met, reproject_rings(whole, LON_LAT)) if footprint.intersects(area_wgs84)]
    out = []
    for raster_id in met:
        done, total = partly[raster_id]
        out.append({"raster": index.rasters[raster_id].path, "tiles_done": done, "tiles_total": total,
                    "reason": f"indexed in part ({done:,} of {total:,} tiles): the rest was not searched; its indexing "
                              "run is under way, or it stopped or failed: index the raster again to finish it (the "
                              "tiles done are kept)"})
    return out


def left_out(index: TileIndex) -> list[dict]:
    """The rasters of `index` a search leaves out while they are being indexed, each with the
    reason (`kind` "indexing"; an unreadable raster's is "unreadable"): those with no tile
    committed (TileIndex.not_started: a search of a new index found nothing, and said nothing),
    and those whose maps would take too much memory (TileIndex.left_out)."""
    first = [{"raster": index.rasters[raster_id].path, "kind": "indexing",
              "reason": "not indexed yet: none of its tiles is committed (its indexing run is under way, committing "
                        "every few seconds, or it stopped or failed: index the raster again to search it, or take it out of the "
                        "index (remove) if it cannot be read)"}
             for raster_id in index.not_started]
    return first + [
        {"raster": index.rasters[raster_id].path, "kind": "indexing",
         "reason": f"still being indexed, and its maps would take {size / 2 ** 20:,.0f} MiB of memory to search before it "
                   f"is complete (over {index.partial_maps_bytes / 2 ** 20:,.0f} MiB, --max-partial-maps-mb): it is "
                   "searched once indexed"}
        for raster_id, size in sorted(index.left_out.items())]
