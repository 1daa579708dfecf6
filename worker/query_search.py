"""A search as the user asked it: a sketch or an example, without the example's own place, re-ranked
by the user's marks. It wraps worker.search.search (asked for more places than shown, then
filtered and re-ranked here), so the ranking itself stays in one place."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
from shapely.geometry import Polygon

from wire.protocol import excerpt
from worker import feedback as fb
from worker.cancellation import raise_if_stopped
from worker.errors import InputError, PlaceUnreadable, RasterUnreadable
from worker.example_query import OWN_PLACE_IOU, OWN_PLACE_SHARE, OwnPlace
from worker.geo import Area, nearest_copy, overlap_area, reproject_rings, shared_area
from worker.line_drawing import drawing_device
from worker.placement import Placement, refuse_too_large
from worker.ranking import RankingConfig
from worker.search import (Footprints, Hidden, Hit, SearchResult, add_unread, dedupe, hit_place, place_key,
                           remember_unreadable, search)
from worker.store import WGS84, TileIndex
from worker.verify import describe_places, describe_sketch


def iou(a: Polygon, b: Polygon) -> float:
    inter = overlap_area(a, b) if a.intersects(b) else 0.0
    return float(inter / (a.area + b.area - inter)) if inter > 0 else 0.0


def ground_iou(a: Polygon, b: Polygon) -> float:
    """iou of two lon/lat footprints on the ground, also where one lies a world from the other
    (geo.shared_area): one raster's place past 180 degrees, the same ground in a raster at -180."""
    inter = shared_area(a, b)
    return float(inter / (a.area + b.area - inter)) if inter > 0 else 0.0


def own_places(placements: list[Placement], own: OwnPlace) -> list[bool]:
    """Whether each placement is an example's own place: the square drawn around it (IoU above
    OWN_PLACE_IOU) or, at any scale, a place lying mostly inside the box the user dragged (more
    than OWN_PLACE_SHARE of its area). A place containing a small example, or lying in the
    blank margin of a long box's square, is another place. Each is compared where it lies
    nearest the example, in a CRS whose x wraps round the world (geo.nearest_copy): the same
    ground in a raster whose longitudes run past 180 degrees (0 to 360) lay a world away, and
    came back as a hit."""
    if not placements:
        return []
    centre_x = own.square.centroid.x
    polygons = [nearest_copy(p, own.crs, centre_x) for p in reproject_rings(placements, own.crs)]
    return [iou(p, own.square) > OWN_PLACE_IOU or overlap_area(p, own.box) > OWN_PLACE_SHARE * p.area
            for p in polygons]


def search_query(index: TileIndex, model, sketch: torch.Tensor, ranking: RankingConfig, top: int = 10,
                 area_wgs84: Area | None = None, max_overlap: float = 0.3,
                 own_place: OwnPlace | None = None, feedback: fb.Feedback | None = None) -> SearchResult:
    """The best `top` places for a sketch (3, S, S): worker.search's, less an example's own place
    (`own_place`, own_places), re-ranked by `feedback` (worker.feedback) when given. Marks and
    places in rasters that cannot be read now are left out with the rasters (`unreadable`)."""
    if own_place is None and feedback is None:
        return search(index, model, sketch, ranking, top=top, area_wgs84=area_wgs84, max_overlap=max_overlap)
    started = time.perf_counter()
    good, bad = feedback.places(index.rasters) if feedback else ([], [])
    if feedback:
        refuse_marks_too_large(index, ranking, model.img_size, feedback, good + bad)
        refuse_one_place_good_and_bad(feedback, good, bad)
    asked = max(fb.POOL, 3 * top) if feedback else top
    ranking = replace(ranking, shortlist=max(ranking.shortlist, asked))
    # the example's own places are never hits, and keep the places overlapping them out: left out
    # after the search, they were most of a large example's `top` + 5 places (--top 1 gave none)
    hidden = None if own_place is None else lambda placements: own_places(placements, own_place)
    first = search(index, model, sketch, ranking, top=asked, area_wgs84=area_wgs84, max_overlap=max_overlap,
                   hidden=hidden)
    timings, hits, unreadable = dict(first.timings_ms), first.hits, dict(first.unreadable)
    unread = dict(first.unread_places)
    if feedback is not None:
        raise_if_stopped("the feedback re-rank")
        reranking = time.perf_counter()
        hits = rerank(index, model, sketch, ranking, hits, good, bad, area_wgs84, max_overlap,
                      Unread(unreadable, unread), hidden)
        timings["feedback_ms"] = (time.perf_counter() - reranking) * 1e3  # most of such a search's time
    hits = [replace(h, rank=n + 1) for n, h in enumerate(hits[:top])]
    timings["total_ms"] = (time.perf_counter() - started) * 1e3
    return SearchResult(hits=hits, timings_ms=timings, unreadable=unreadable, unread_places=unread,
                        hidden_only=first.hidden_only and not hits, scan=first.scan)


def refuse_marks_too_large(index: TileIndex, ranking: RankingConfig, size: int, feedback: fb.Feedback,
                           marks: list[Placement]) -> None:
    """worker.placement.refuse_too_large for the marks (good ones first, as `feedback` lists
    them) larger than any place a search of their raster returns: the index's own hits, of any
    size its scales give, are read by a search already, and marking one was never refused."""
    level_side = max(*ranking.sizes, size)  # a placement's side in level px: a template's, or a tile window's
    reach: dict[str, float] = {}
    for level in index.maps.values():
        reach[level.raster.path] = max(reach.get(level.raster.path, 0.0), level_side * level.level_px)
    names = [f"the mark {excerpt(i)}" for i in feedback.positive + feedback.negative]
    beyond = [i for i, mark in enumerate(marks) if mark.side > reach.get(mark.raster.path, 0.0) + 0.01]
    refuse_too_large([marks[i] for i in beyond], size, [names[i] for i in beyond])


def refuse_one_place_good_and_bad(feedback: fb.Feedback, good: list[Placement], bad: list[Placement]) -> None:
    """InputError for a place marked good and bad by ids that differ (a mark turned a quarter, or
    moved a hundredth of a pixel; worker.feedback.Feedback refuses ids naming one place): it was
    re-ranked as marked good and then left out as marked bad, the good mark lost without a word.
    One place is what the re-rank leaves out as a bad mark's (IoU over feedback.SAME_PLACE_IOU)."""
    bad_footprints = reproject_rings(bad, WGS84)
    for good_id, footprint in zip(feedback.positive, reproject_rings(good, WGS84)):
        for bad_id, bad_footprint in zip(feedback.negative, bad_footprints):
            overlap = ground_iou(footprint, bad_footprint)
            if overlap > fb.SAME_PLACE_IOU:
                raise InputError(f"feedback marks one place both good and bad: {excerpt(good_id)} good and "
                                 f"{excerpt(bad_id)} bad overlap by IoU {overlap:.2f}: choose one")


class Unread(NamedTuple):
    """What a search with marks could not read: whole rasters (path: why, as
    SearchResult.unreadable) and places of rasters that open (as SearchResult.unread_places)."""

    rasters: dict[str, str]
    places: dict[str, tuple[frozenset, str]]


# places read, drawn and described as one batch by a re-rank: 3 x a top of 1,000 at once took the
# worker from 1.6 to 3.4 GB, and could not be stopped (it ran on past the worker's time limit, and
# the searches behind it waited; probe)
DESCRIBED_AT_ONCE = 64


def describe_readable(index: TileIndex, places: list[Placement], size: int, device,
                      unread: Unread) -> tuple[list[int], torch.Tensor]:
    """Which of `places` can be read now (their indices, in order) and their descriptors
    (describe_places). A raster that cannot (moved, deleted, damaged since it was indexed) is
    added to `unread.rasters` and remembered on the index, as a search leaves it out
    (worker.search.remember_unreadable), and its places are left out: one mark, or one place past
    the search's verified ones, there failed the whole search (`not_found`). A place of a raster
    that opens but cannot be read there (a damaged block, a mosaic's sheet missing) is left out
    alone, and counted in `unread.places`."""
    readable = [i for i, p in enumerate(places) if p.raster.path not in unread.rasters]
    described: dict[int, torch.Tensor] = {}
    try:  # DESCRIBED_AT_ONCE a batch: the usual case
        for start in range(0, len(readable), DESCRIBED_AT_ONCE):
            raise_if_stopped("describing the next places to re-rank")
            _describe_into(described, places, readable[start:start + DESCRIBED_AT_ONCE], size, device, unread.places)
    except RasterUnreadable:
        by_raster: dict[str, list[int]] = {}
        for i in readable:
            if i not in described:
                by_raster.setdefault(places[i].raster.path, []).append(i)
        for path, indices in by_raster.items():
            raise_if_stopped("describing the next places to re-rank")
            try:
                _describe_into(described, places, indices, size, device, unread.places)
            except RasterUnreadable as exc:
                unread.rasters[path] = str(exc)
                remember_unreadable(index, exc)
                for i in [i for i in described if places[i].raster.path == path]:  # read in an earlier batch
                    del described[i]
    kept = sorted(described)
    return kept, (torch.stack([described[i] for i in kept]) if kept else torch.zeros(0, 1))


def _describe_into(described: dict[int, torch.Tensor], places: list[Placement], indices: list[int], size: int,
                   device, unread_places: dict[str, tuple[frozenset, str]]) -> None:
    """The descriptors of `places` at `indices` into `described`, less the places that cannot be
    read, counted in `unread_places` (describe_readable)."""
    unread: dict[int, PlaceUnreadable] = {}
    found = describe_places([places[i] for i in indices], size, device, unread)
    for number, exc in unread.items():
        add_unread(unread_places, exc.path, {place_key(places[indices[number]])}, exc.reason)
    described.update((i, d) for n, (i, d) in enumerate(zip(indices, found)) if n not in unread)


def rerank(index: TileIndex, model, sketch: torch.Tensor, ranking: RankingConfig, hits: list[Hit],
           good: list[Placement], bad: list[Placement], area_wgs84: Area | None, max_overlap: float,
           unread: Unread, hidden: Hidden | None) -> list[Hit]:
    """The search's places and those like the good ones, re-ranked by Rocchio (worker.feedback),
    places marked bad left out, overlapping places collapsed to the best: best first. Rasters
    and places found unreadable on the way are added to `unread`, and left out with their marks.
    `hidden`: as search's (the example's own places), in the searches like the good ones too."""
    size, device = model.img_size, drawing_device(model.device)
    kept, good_d = describe_readable(index, good, size, device, unread)
    good = [good[i] for i in kept]
    kept, bad_d = describe_readable(index, bad, size, device, unread)
    bad = [bad[i] for i in kept]
    pool = list(hits)
    prior = list(range(1, len(hits) + 1))
    if good:
        good_drawings = places_as_sketches(good[:fb.EXPANSIONS], size)
        for drawing in good_drawings:
            raise_if_stopped("searching for places like the ones marked good")
            more = search(index, model, drawing, ranking, top=fb.EXPANSION_TOP, area_wgs84=area_wgs84,
                          max_overlap=max_overlap, hidden=hidden)
            unread.rasters.update(more.unreadable)
            for path, (places, why) in more.unread_places.items():
                add_unread(unread.places, path, places, why)
            pool += more.hits
            prior += list(range(1, len(more.hits) + 1))
    pool, prior = each_place_once(pool, prior)
    kept, candidates = describe_readable(index, [h.placement for h in pool], size, device, unread)
    pool, prior = [pool[i] for i in kept], [prior[i] for i in kept]
    if not pool:  # the area, or rasters that cannot be read, left no place: no hits, as without marks
        return []
    query = fb.rocchio_query(describe_sketch(sketch), good_d, bad_d)
    scores = fb.feedback_scores(candidates, query, np.asarray(prior, np.float64))
    rejected = marked_bad([h.placement for h in pool], reproject_rings(bad, WGS84), max_overlap)
    order = np.array([i for i in np.argsort(-scores, kind="stable") if not rejected[i]], dtype=np.int64)
    kept = dedupe(Footprints([h.placement for h in pool]), order, max_overlap)
    return [replace(pool[i], rank=n + 1, score=float(scores[i])) for n, i in enumerate(kept)]


def marked_bad(placements: list[Placement], bad: list[Polygon], max_overlap: float) -> list[bool]:
    """Whether each placement is a place marked bad (lon/lat footprints `bad`) to the user: that
    place (IoU over feedback.SAME_PLACE_IOU), or one lying more than `max_overlap` of its own
    area inside it, which the bad place had kept out of the search that showed it. Left out by
    IoU alone, a neighbour lying 51-89% inside one came back in its stead (probe). A larger
    place holding a bad one is another place, and may come."""
    if not bad or not placements:
        return [False] * len(placements)

    def inside(p: Polygon, f: Polygon) -> bool:  # the shared area found once, not again for the IoU
        shared = shared_area(p, f)
        return shared > max_overlap * p.area or shared > fb.SAME_PLACE_IOU * (p.area + f.area - shared)

    return [any(inside(p, f) for f in bad) for p in reproject_rings(placements, WGS84)]


def each_place_once(pool: list[Hit], prior: list[int]) -> tuple[list[Hit], list[int]]:
    """A re-rank's candidates with each place once, at the best rank any search gave it: the
    searches like the good places find the sketch's own places again, and at a max_overlap of 1
    the same hit came back two and four times (probe)."""
    hits: dict[tuple, Hit] = {}
    ranks: dict[tuple, int] = {}
    for hit, rank in zip(pool, prior):
        key = hit_place(hit.placement)
        hits.setdefault(key, hit)
        ranks[key] = min(rank, ranks.get(key, rank))
    return list(hits.values()), list(ranks.values())


def places_as_sketches(places: list[Placement], size: int) -> list[torch.Tensor]:
    """Places drawn as one picture each, as sketch tensors (3, S, S) in [0, 1]."""
    from worker.verify import draw_placements

    drawings = draw_placements(places, size)
    return [torch.from_numpy(d.astype(np.float32) / 255.0)[None].expand(3, -1, -1).contiguous() for d in drawings]
