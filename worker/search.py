"""Sketch search: find where a sketch lies in the index's rasters, at any offset, size and turn.

The default "layout" ranker slides the sketch's edge layout (worker.query_templates) over every
raster's level maps (worker.level_maps): a coarse scan at 16 px steps everywhere, local peaks,
then a fine HOG score at 8 px steps around each peak, each template's scores calibrated against
its own background; the tiles under its best peaks (more than are refined) join it, scored by
their own stored drawings (worker.tile_windows); the best placements are read from their rasters
and drawn as one picture each (verified); optionally the paper's cross-attention token score,
aligned to where each placement lies in the tile under it, is blended in; overlapping placements
of one place collapse to the best. A hit is that placement: the turned square of the raster the
sketch matched. The "tokens" ranker is the paper's two stages alone (global-token shortlist over
tiles, cross-attention re-rank), kept for comparison.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from shapely.geometry import Polygon

from worker import query_templates
from worker.geo import Area, overlap_area, reproject_rings, shared_area
from worker.line_drawing import drawing_device
from worker.placement import Placement
from worker.ann import (AUTO_MIN_TILES, MIN_WINDOWS, REBUILD, SET_ASIDE, AnnShortlist, big_enough, check_windows,
                        left_mid_swap, query_vectors, why_not_current)
from worker.candidates import Candidate
from worker.cancellation import raise_if_stopped, say_why_slow
from worker.errors import CorruptIndexError, RasterUnreadable
from worker.placement_scan import ANN_MARGIN, ANN_SPAN, ann_peaks, coarse_peaks, refine, scanner_of
from worker.ranking import RankingConfig
from worker.search_area import SearchArea
from worker.store import WGS84, TileIndex
from worker.tile_windows import tile_window_candidates
from worker.token_ranking import tile_candidates, tile_placement, token_rerank
from worker.verify import describe_sketch, verify
from worker.vrt_sheets import gone_sheets


class Footprints:
    """Candidates' footprints, to tell whether two are one place: two in one raster are compared
    in its pixels (exact; near a pole, lon/lat areas are far from the ground's), two in different
    rasters on the ground, in lon/lat (across 180 degrees too: geo.shared_area)."""

    def __init__(self, placements: list[Placement]) -> None:
        self.placements = placements
        self.lonlat = reproject_rings(placements, WGS84)
        self.pixels = Placement.pixel_polygons(placements)

    def shares_little(self, i: int, others: list[int], max_overlap: float) -> bool:
        """Whether footprint `i` shares with each of `others` at most `max_overlap` of the smaller of the two."""
        for k in others:
            same_raster = self.placements[i].raster.path == self.placements[k].raster.path
            polygons = self.pixels if same_raster else self.lonlat
            a, b = polygons[i], polygons[k]
            shared = overlap_area(a, b) if same_raster else shared_area(a, b)
            if shared > max_overlap * min(a.area, b.area):
                return False
        return True


def dedupe(footprints: Footprints, order: np.ndarray, max_overlap: float, limit: int | None = None,
           hidden: frozenset[int] = frozenset()) -> list[int]:
    """Greedy spatial de-duplication: walk `order` (best first) and keep a footprint only if it
    shares with every kept one at most `max_overlap` of the smaller of the two areas; stop after
    `limit` kept. `hidden` footprints are kept, keeping those overlapping them out, but never
    returned nor counted (an example's own place). One place is kept once, whatever
    `max_overlap`: at 1, two candidates refined to one place were both hits, one id twice (probe).
    A search's stop check is looked at every 64 footprints (a top of 1,000 took 1.5 s, which a
    cancel waited for)."""
    kept: list[int] = []
    shown: list[int] = []
    places: set[tuple] = set()
    for n, i in enumerate(order):
        if limit is not None and len(shown) >= limit:
            break
        if n % 64 == 63:
            raise_if_stopped("de-duplicating the next hits")
        place = hit_place(footprints.placements[int(i)])
        if place not in places and footprints.shares_little(int(i), kept, max_overlap):
            kept.append(int(i))
            places.add(place)
            if int(i) not in hidden:
                shown.append(int(i))
    return shown


def places_to_verify(scores: list[float], footprints: Footprints, area_wgs84: Area | None, ranking: RankingConfig,
                     hidden: frozenset[int] = frozenset(), max_overlap: float = 0.3,
                     unreadable: frozenset[int] = frozenset()) -> list[int]:
    """The best `ranking.verify` candidates that can be hits, best first: those meeting the
    search's area, less `hidden` ones and those the hidden ones keep out (dedupe), and less
    `unreadable` ones (on a mosaic's gone sheet: mark_gone_sheets). Before, an
    area search verified the best candidates anywhere, and when they lay outside the area, none
    of its hits was verified; a large example's own places, and places overlapping them, took
    every verification, and its hits were shown unverified, with no score."""
    if ranking.verify <= 0:
        return []
    by_score = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept_out_by = dedupe(footprints, np.array([i for i in by_score if i in hidden], np.int64), max_overlap)
    chosen: list[int] = []
    for i in by_score:
        if len(chosen) >= ranking.verify:
            break
        if i not in hidden and i not in unreadable \
                and (area_wgs84 is None or footprints.lonlat[i].intersects(area_wgs84)) \
                and footprints.shares_little(i, kept_out_by, max_overlap):
            chosen.append(i)
    return chosen


log = logging.getLogger(__name__)
Hidden = Callable[[list[Placement]], list[bool]]  # which placements are never hits (search's `hidden`)


@dataclass
class Hit:
    """Where the sketch matched: a placement in a raster, its scores, and the index's scale there."""

    rank: int
    # higher is better, comparable between one search's hits; None for a hit ranked below the
    # verified ones (worker.verify), which was not verified: its stage scores are on another scale
    score: float | None
    placement: Placement
    scale: int
    coarse_score: float
    fine_score: float
    token_score: float | None = None

    @property
    def raster_path(self) -> str:
        return self.placement.raster.path

    def footprint_pixels(self) -> Polygon:
        return self.placement.pixel_polygon()


@dataclass(frozen=True)
class Scan:
    """How a search found its candidates (the reply's `scan`): `by` "ann" (the index's ANN
    shortlist), "exact" (every window of the maps searched), "ann+exact" (the shortlist, and the
    rasters it cannot answer for scanned exactly beside it), "none" (the search met no map).
    `advice` says what would make such searches faster, where the user can: an exact scan's
    time grows with the area searched (2.8 s for the coarse scan of 50,000 tiles' area on 2
    cores), minutes at 10M tiles where the shortlist answers in a third of a second, and only
    the worker's log said why."""

    by: str
    advice: str | None = None

    def to_json(self) -> dict:
        return {"by": self.by, "advice": self.advice}


@dataclass
class SearchResult:
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # rasters left out, by path: why (RasterUnreadable)
    # places of searched rasters that cannot be read (a mosaic's sheet gone, a damaged block), left
    # out of the hits: by raster path, the places (place_key) and the first one's reason
    unread_places: dict[str, tuple[frozenset, str]] = field(default_factory=dict)
    # no hit, and places that could have been: each `hidden` (an example's own place) or kept out by one
    hidden_only: bool = False
    scan: Scan | None = None  # how its candidates were found: set by every search


def ann_shortlist(index: TileIndex, ranking: RankingConfig, area: SearchArea | None = None) -> AnnShortlist | None:
    """The index's ANN shortlist when this search should ask it (shortlist_of)."""
    return shortlist_of(index, ranking, area)[0]


def shortlist_of(index: TileIndex, ranking: RankingConfig,
                 area: SearchArea | None = None) -> tuple[AnnShortlist | None, str | None]:
    """The index's ANN shortlist when this search should ask it (kept on the open index), and,
    when it asks none though one would answer faster, why and what to do (in the log once while
    it lasts, and in the reply's Scan). "auto" asks it when the maps searched hold enough tiles
    (worker.ann.big_enough): a smaller index is scanned as fast, and nothing is said."""
    searched = len(index) if area is None else sum(len(index.rows_of_map(*key)) for key in area.keys)
    if ranking.ann == "off" or (ranking.ann == "auto" and not big_enough(searched)):
        return None, None
    try:
        return _shortlist_on_disk(index, ranking)
    except CorruptIndexError as exc:
        return None, passed_over(index, ranking, exc)


def passed_over(index: TileIndex, ranking: RankingConfig, damage: CorruptIndexError) -> str:
    """Why a search scans exactly past a damaged shortlist, and what to do; `ann` "on" fails
    (its user asked for the shortlist) with the damage. Before, every search of "auto" failed
    with `corrupt_index` until someone ran `build-ann`, though the exact scan answers: a plugin
    user, who cannot ask "off", could not search the index at all."""
    if ranking.ann == "on":
        raise damage
    what = str(damage).removesuffix(f"; {REBUILD}")
    return _warn_once(index, ("damaged", what), f"the index's ANN shortlist is damaged ({what}); scanning exactly "
                                                "(`build-ann` builds it again)")


def _shortlist_on_disk(index: TileIndex, ranking: RankingConfig) -> tuple[AnnShortlist | None, str | None]:
    """shortlist_of, once it is to be asked: the one on disk, or why none answers."""
    on_disk = AnnShortlist.stamp_of(index.dir)
    if on_disk is None:
        if left_mid_swap(index.dir):  # was said as having none, and to build one (hours at scale)
            return None, _warn_once(index, ("set_aside",), SET_ASIDE)
        if ranking.ann == "auto" and index.complete_rasters != set(index.rasters):
            return None, None  # the first run of a large index builds one once its rasters are complete
        # a large index without one scanned exactly without a word, and `--ann on` looked like a slow shortlist
        return None, _warn_once(index, ("none",), NO_SHORTLIST)
    if getattr(index, "_ann", None) is None or index._ann.stamp != on_disk:  # built or updated since
        index._ann = AnnShortlist.open(index.dir)
    if index._ann is None:  # swapped out while it was opened, none in place yet
        return None, None
    try:
        index._ann.check_files()
    except CorruptIndexError:
        if AnnShortlist.stamp_of(index.dir) == index._ann.stamp:
            raise
        index._ann = AnnShortlist.open(index.dir)  # swapped for another since the stamp was read: that one
        if index._ann is None:
            return None, None
    seen = index._ann_damage
    if seen is not None and seen[0] == index._ann.stamp:  # damage a search read in its windows
        raise CorruptIndexError(seen[1])
    if index._ann.answers_for(index) is None:
        why = why_not_current(index._ann.info, index)
        return None, _warn_once(index, ("stale", index._ann.stamp), STALE.format(why))
    index._ann_warned = None
    return index._ann, None


NO_SHORTLIST = ("the index has no ANN shortlist; scanning exactly (`build-ann` builds one, for an index of "
                f"{MIN_WINDOWS} windows or more; an index run that completes an index of {AUTO_MIN_TILES:,} tiles or "
                "more builds one, unless told not to: --no-ann)")
STALE = ("the index's ANN shortlist is older than its tiles or this worker ({}); scanning exactly (`build-ann` builds "
         "it again, as does an index run that completes all the index's rasters)")


def _warn_once(index: TileIndex, state: tuple, message: str) -> str:
    """Warn of the shortlist's state once while it lasts on this open index (a feedback search
    runs up to four searches, and a service answers many, each of which said it again); the
    message."""
    if index._ann_warned != state:
        index._ann_warned = state
        log.warning("%s: %s", index.dir, message)
    return message


def not_in_shortlist(index: TileIndex, shortlist: AnnShortlist, area: SearchArea) -> list[tuple[int, int]]:
    """The area's maps the ANN shortlist cannot answer for: rasters added since it was built, or
    being indexed. They are scanned exactly beside it; before, one raster being added to a
    10M-tile index made every search scan all of it exactly until the shortlist was updated."""
    answered = shortlist.answers_for(index) or set()
    return [key for key in area.keys if key[0] not in answered]


def beside_advice(index: TileIndex, added: list[tuple[int, int]]) -> str | None:
    """What to do about the complete rasters among those scanned exactly beside the shortlist
    (their maps `added`, not_in_shortlist); None when all are being indexed: the run under way
    adds them once it completes."""
    indexed = len({raster_id for raster_id, _ in added} & index.complete_rasters)
    if not indexed:
        return None
    return (f"{indexed} raster{'s' if indexed > 1 else ''} indexed since the index's ANN shortlist was built, scanned "
            "exactly beside it (an index run that completes all the index's rasters adds them to it: run the index "
            "request again; `build-ann` builds it anew, which takes longer)")


def ann_neighbours(index: TileIndex, ranking: RankingConfig, area: SearchArea) -> int:
    """Windows asked of the ANN shortlist a query vector: more when the area holds a part of the
    index (its windows are then a part of FAISS's answers), at most MAX_ANN_NEIGHBOURS."""
    return int(min(MAX_ANN_NEIGHBOURS, ranking.ann_neighbours / max(area.share(index), 1e-9)))


MAX_ANN_NEIGHBOURS = 8192


def search(index: TileIndex, model, sketch_tensor: torch.Tensor, ranking: RankingConfig | None = None, top: int = 10,
           area_wgs84: Area | None = None, max_overlap: float = 0.3, scales: tuple[int, ...] | None = None,
           shortlist: int | None = None, hidden: Hidden | None = None) -> SearchResult:
    """Rank where a preprocessed sketch (3, S, S) lies in the index's rasters; the best `top`
    non-overlapping placements, best first. `area_wgs84` limits hits to those touching it;
    `hidden` says which placements are never hits, though they keep out those overlapping them
    (an example's own place: worker.query_search).
    A raster that cannot be read now (moved, deleted, on an unplugged drive) is left out, and
    the result says so (`unreadable`): before, it failed every search of its index. The open
    index remembers it until its file changes, or for UNREADABLE_RETRY_S."""
    unreadable = _unreadable(index)
    while True:
        leave_out = frozenset(i for i, r in index.rasters.items() if r.path in unreadable)
        try:
            result = _search(index, model, sketch_tensor, ranking, top, area_wgs84, max_overlap, scales, shortlist,
                             leave_out, hidden)
        except RasterUnreadable as exc:
            if exc.path in unreadable:  # left out, and read all the same: a bug, not the file
                raise
            log.warning("%s", exc)
            remember_unreadable(index, exc)
            # a drive unplugged takes many: found at once, not a search each
            _remember_gone(unreadable, [r.path for r in index.rasters.values()])
            continue
        # only the verified places are read: a hit below them, in a raster deleted or unplugged
        # since it was indexed, was returned as if it were there, its raster not named
        if _remember_gone(unreadable, [h.raster_path for h in result.hits]):
            continue
        result.unreadable = {path: why for path, (_, why) in unreadable.items()}
        return result


def hidden_rows(hidden: Hidden | None, footprints: Footprints) -> frozenset[int]:
    """The candidates (rows of `footprints`) that `hidden` says are never hits (search's `hidden`)."""
    if hidden is None or not footprints.placements:
        return frozenset()
    return frozenset(i for i, is_hidden in enumerate(hidden(footprints.placements)) if is_hidden)


def _remember_gone(unreadable: dict[str, tuple[tuple, str]], paths: list[str]) -> bool:
    """Remember those of `paths` whose file is gone as unreadable (worker.search._unreadable);
    whether any was not remembered before."""
    gone = [path for path in dict.fromkeys(paths) if path not in unreadable and _file_state(path) is None]
    now = time.monotonic()
    for path in gone:
        unreadable[path] = ((None, now), str(RasterUnreadable(path, "no such file")))
    return bool(gone)


UNREADABLE_RETRY_S = 60.0  # a raster left out is tried again after this, also when its own file did not change


def remember_unreadable(index: TileIndex, exc: RasterUnreadable) -> None:
    """Leave the raster `exc` names out of this open index's searches until its file changes, or
    for UNREADABLE_RETRY_S (worker.query_search finds some too: a place marked in it)."""
    _unreadable(index)[exc.path] = ((_file_state(exc.path), time.monotonic()), str(exc))


def _unreadable(index: TileIndex) -> dict[str, tuple[tuple, str]]:
    """The rasters this open index found unreadable (path: its file's state and the time then,
    why), less those whose file has changed since (put back, or replaced) or, when it is there,
    that were found a while ago (a VRT whose sources are back is the same file): they are tried
    again. A file still missing is not tried again until it is there."""
    found = index.__dict__.setdefault("_unreadable", {})
    for path, ((state, when), _) in list(found.items()):
        if _file_state(path) != state or (state is not None and time.monotonic() - when > UNREADABLE_RETRY_S):
            found.pop(path, None)  # searches run in several threads
    return found


def _file_state(path: str) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _search(index: TileIndex, model, sketch_tensor: torch.Tensor, ranking: RankingConfig | None, top: int,
            area_wgs84: Area | None, max_overlap: float, scales: tuple[int, ...] | None, shortlist: int | None,
            leave_out: frozenset[int], hidden: Hidden | None = None) -> SearchResult:
    ranking = ranking or RankingConfig()
    if shortlist is not None:
        ranking = replace(ranking, shortlist=shortlist)
    if ranking.uses_tokens:
        index.require_tokens("the tokens ranker" if ranking.ranker == "tokens" else "a token weight")
    t = {"start": time.perf_counter()}
    area = SearchArea.of(index, scales, area_wgs84, leave_out)
    keys = area.keys
    stages = ["start", "encode", "shortlist", "refine", "verify", "rerank", "dedupe"]
    if not keys:  # the area meets no raster of the index, or no scale asked is indexed
        return SearchResult(hits=[], timings_ms={**{f"{s}_ms": 0.0 for s in stages[1:]},
                                                 "total_ms": (time.perf_counter() - t["start"]) * 1e3},
                            scan=Scan("none"))
    if ranking.ranker == "tokens":
        mask = area.tile_rows(index)
        candidates = tile_candidates(index, model, sketch_tensor, ranking, mask)
        t["encode"] = t["shortlist"] = t["refine"] = t["verify"] = time.perf_counter()
        scan = Scan("exact")
        footprints = Footprints([tile_placement(index, c.tile_row) for c in candidates])
        mark_gone_sheets(candidates, footprints)
        hide = hidden_rows(hidden, footprints)
    else:
        templates = query_templates.build(sketch_tensor, ranking.sizes, ranking.angles, model.device)
        sketch_descriptor = describe_sketch(sketch_tensor)
        scanner = scanner_of(index, model.device)
        t["encode"] = time.perf_counter()
        raise_if_stopped("the shortlist")
        shortlist, advice = shortlist_of(index, ranking, area)
        added = [] if shortlist is None else not_in_shortlist(index, shortlist, area)
        if added:
            advice = beside_advice(index, added)
            if len(added) == len(area.keys):  # the area holds only maps it cannot answer for
                shortlist = None
        scan = Scan("exact" if shortlist is None else "ann+exact" if added else "ann", advice)
        if advice is not None:  # a `timeout` says it
            say_why_slow(advice)
        pool = max(ranking.shortlist, ranking.tile_window_pool)
        with torch.inference_mode():
            if shortlist is not None:
                near_area = None if area.whole else lambda rows: area.meets_each(
                    rows[:, :2], rows[:, 2] - ANN_MARGIN, rows[:, 3] - ANN_MARGIN, ANN_SPAN)
                try:
                    windows, _ = shortlist.search(query_vectors(templates.coarse),
                                                  ann_neighbours(index, ranking, area), keep=near_area)
                    check_windows(index, windows)
                except CorruptIndexError as exc:  # damage seen only by reading the windows it names
                    index._ann_damage = (shortlist.stamp, str(exc))  # not asked again until built again
                    scan = Scan("exact", passed_over(index, ranking, exc))
                    say_why_slow(scan.advice)
                    shortlist = None
            if shortlist is None:
                peaks = coarse_peaks(scanner, templates, ranking, area, pool)
            else:
                peaks = ann_peaks(scanner, templates, ranking, windows[:ranking.ann_windows], pool, area)
                if added:
                    peaks = sorted(peaks + coarse_peaks(scanner, templates, ranking, area.only(added), pool),
                                   key=lambda c: -c.coarse)[:pool]
            candidates = peaks[:ranking.shortlist]
            candidates += tile_window_candidates(index, templates, peaks[:ranking.tile_window_pool], sketch_descriptor,
                                                 ranking.tile_windows, ranking.inked_only)
            t["shortlist"] = time.perf_counter()
            raise_if_stopped("refining the shortlist")
            refine(scanner, templates, ranking, candidates, keys)
            t["refine"] = time.perf_counter()
        for c in candidates:
            c.score = c.fine + ranking.coarse_weight * c.coarse
        footprints = Footprints([c.placement(index.maps[c.map_key]) for c in candidates])
        mark_gone_sheets(candidates, footprints)
        hide = hidden_rows(hidden, footprints)
        raise_if_stopped("verifying the best placements")
        gone = frozenset(i for i, c in enumerate(candidates) if c.unreadable is not None)
        to_verify = places_to_verify([c.score for c in candidates], footprints, area_wgs84, ranking, hide, max_overlap,
                                     gone)
        verify(sketch_descriptor, candidates, footprints.placements, to_verify, ranking, model.img_size,
               drawing_device(model.device))
        t["verify"] = time.perf_counter()
        raise_if_stopped("the token re-rank")
        token_rerank(index, model, sketch_tensor, candidates, ranking)
    t["rerank"] = time.perf_counter()

    readable = [i for i, c in enumerate(candidates) if c.unreadable is None]
    order = np.array(sorted(readable, key=lambda i: (*candidates[i].rank_key, i)), dtype=np.int64)
    if area_wgs84 is not None:
        order = np.array([i for i in order if footprints.lonlat[i].intersects(area_wgs84)], dtype=np.int64)
    kept = dedupe(footprints, order, max_overlap, limit=top, hidden=hide)
    t["dedupe"] = time.perf_counter()
    verified = any(c.verified is not None for c in candidates)
    hits = [Hit(rank=n + 1, score=None if verified and candidates[i].verified is None else candidates[i].score,
                placement=footprints.placements[i], scale=candidates[i].map_key[1], coarse_score=candidates[i].coarse,
                fine_score=candidates[i].fine, token_score=candidates[i].tokens)
            for n, i in enumerate(kept)]
    timings = {f"{b}_ms": (t[b] - t[a]) * 1e3 for a, b in zip(stages, stages[1:])}
    timings["total_ms"] = (t["dedupe"] - t["start"]) * 1e3
    could_be_hits = [i for i in range(len(candidates)) if i not in hide
                     and (area_wgs84 is None or footprints.lonlat[i].intersects(area_wgs84))]
    return SearchResult(hits=hits, timings_ms=timings,
                        unread_places=unread_places([candidates[i] for i in could_be_hits],
                                                    [footprints.placements[i] for i in could_be_hits]),
                        hidden_only=not kept and len(order) > 0,  # the first in order is shown unless hidden
                        scan=scan)


def mark_gone_sheets(candidates: list[Candidate], footprints: Footprints) -> None:
    """Candidate.unreadable for the candidates on a VRT mosaic's sheet that is gone now
    (worker.vrt_sheets): never read, never hits, and said. A few stats a search; nothing for
    rasters that are no VRTs."""
    for candidate, why in zip(candidates, gone_sheets(footprints.placements)):
        if why is not None:
            candidate.unreadable = why


def unread_places(candidates: list[Candidate], placements: list[Placement]) -> dict[str, tuple[frozenset, str]]:
    """The places that could not be read (Candidate.unreadable), by raster path: which, and the
    first one's reason (SearchResult.unread_places). `candidates` are those that could have been
    hits (in the search's area, not hidden): an area away from a gone sheet was warned of it."""
    said: dict[str, tuple[frozenset, str]] = {}
    for candidate, placement in zip(candidates, placements):
        if candidate.unreadable is not None:
            add_unread(said, placement.raster.path, {place_key(placement)}, candidate.unreadable)
    return said


def add_unread(said: dict[str, tuple[frozenset, str]], path: str, places: frozenset | set, why: str) -> None:
    """More `places` (place_key) of the raster at `path` that could not be read, into `said` (as
    SearchResult.unread_places: the first reason is kept; a place met again, by another of a
    feedback search's searches, is counted once)."""
    before, first = said.get(path, (frozenset(), why))
    said[path] = (before | frozenset(places), first)


def hit_place(placement: Placement) -> tuple:
    """A placement's raster and its square there (place_key): two placements with one are one hit."""
    return placement.raster.path, place_key(placement)


def place_key(placement: Placement) -> tuple[float, float, float, float]:
    """A placement's square (centre, side, angle in its raster's pixels), as unread_places counts it."""
    return round(placement.cx, 1), round(placement.cy, 1), round(placement.side, 1), round(placement.angle, 1)
