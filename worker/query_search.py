"""A search as the user asked it: a sketch or an example, without the example's own place, re-ranked
by the user's marks. It wraps worker.search.search (asked for more places than shown, then
filtered and re-ranked here), so the ranking itself stays in one place."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from rasterio.crs import CRS
from shapely.geometry import Polygon

from worker import feedback as fb
from worker.cancellation import raise_if_stopped
from worker.errors import RasterUnreadable
from worker.example_query import OWN_PLACE_SHARE
from worker.geo import Area, overlap_area, reproject_rings
from worker.line_drawing import drawing_device
from worker.placement import Placement
from worker.ranking import RankingConfig
from worker.search import Footprints, Hit, SearchResult, dedupe, search
from worker.store import WGS84, TileIndex
from worker.verify import describe_places, describe_sketch

OWN_PLACE_MARGIN = 5  # extra places asked for, to fill the list after the example's own place is left out


def iou(a: Polygon, b: Polygon) -> float:
    inter = overlap_area(a, b) if a.intersects(b) else 0.0
    return float(inter / (a.area + b.area - inter)) if inter > 0 else 0.0


def share_of_smaller(a: Polygon, b: Polygon) -> float:
    inter = overlap_area(a, b) if a.intersects(b) else 0.0
    return float(inter / min(a.area, b.area)) if inter > 0 else 0.0


def overlapping(placements: list[Placement], footprints: list[Polygon], crs: CRS, limit: float,
                measure: Callable[[Polygon, Polygon], float] = iou) -> list[bool]:
    """Whether each placement overlaps any footprint (polygons in `crs`) by `measure` above `limit`."""
    if not footprints or not placements:
        return [False] * len(placements)
    polygons = reproject_rings(placements, crs)
    return [any(measure(p, f) > limit for f in footprints) for p in polygons]


def search_query(index: TileIndex, model, sketch: torch.Tensor, ranking: RankingConfig, top: int = 10,
                 area_wgs84: Area | None = None, max_overlap: float = 0.3,
                 own_place: tuple[Polygon, CRS] | None = None, feedback: fb.Feedback | None = None) -> SearchResult:
    """The best `top` places for a sketch (3, S, S): worker.search's, less those sharing more
    than OWN_PLACE_SHARE of the smaller with `own_place` (an example's footprint and its CRS),
    re-ranked by `feedback` (worker.feedback) when given. Marks in rasters that cannot be read
    now are left out with the rasters (`unreadable`)."""
    if own_place is None and feedback is None:
        return search(index, model, sketch, ranking, top=top, area_wgs84=area_wgs84, max_overlap=max_overlap)
    started = time.perf_counter()
    good, bad = feedback.places(index.rasters) if feedback else ([], [])
    asked = max(top + OWN_PLACE_MARGIN, fb.POOL if feedback else 0, 3 * top if feedback else 0)
    ranking = replace(ranking, shortlist=max(ranking.shortlist, asked))
    first = search(index, model, sketch, ranking, top=asked, area_wgs84=area_wgs84, max_overlap=max_overlap)
    timings, hits, unreadable = dict(first.timings_ms), first.hits, dict(first.unreadable)
    if feedback is not None:
        raise_if_stopped("the feedback re-rank")
        device = drawing_device(model.device)
        good, bad = (readable_marks(marks, model.img_size, device, unreadable) for marks in (good, bad))
        hits = rerank(index, model, sketch, ranking, hits, good, bad, area_wgs84, max_overlap)
    if own_place is not None:
        footprint, crs = own_place
        own = overlapping([h.placement for h in hits], [footprint], crs, OWN_PLACE_SHARE, share_of_smaller)
        hits = [h for h, is_own in zip(hits, own) if not is_own]
    hits = [replace(h, rank=n + 1) for n, h in enumerate(hits[:top])]
    timings["total_ms"] = (time.perf_counter() - started) * 1e3
    return SearchResult(hits=hits, timings_ms=timings, unreadable=unreadable)


def readable_marks(marks: list[Placement], size: int, device, unreadable: dict[str, str]
                   ) -> tuple[list[Placement], torch.Tensor]:
    """The marked places whose rasters can be read now, and their descriptors (describe_places).
    A raster that cannot (moved, deleted, damaged since it was indexed) is added to `unreadable`
    (path: why) and its marks left out, as the search leaves the raster out: a mark there failed
    the whole search with `not_found`."""
    kept, described = [], []
    by_raster: dict[str, list[Placement]] = {}
    for place in marks:
        by_raster.setdefault(place.raster.path, []).append(place)
    for path, places in by_raster.items():
        if path in unreadable:
            continue
        try:
            described.append(describe_places(places, size, device))
        except RasterUnreadable as exc:
            unreadable[path] = str(exc)
            continue
        kept += places
    return kept, (torch.cat(described) if described else torch.zeros(0, 1))


def rerank(index: TileIndex, model, sketch: torch.Tensor, ranking: RankingConfig, hits: list[Hit],
           good: tuple[list[Placement], torch.Tensor], bad: tuple[list[Placement], torch.Tensor],
           area_wgs84: Area | None, max_overlap: float) -> list[Hit]:
    """The search's places and those like the good ones, re-ranked by Rocchio (worker.feedback),
    places marked bad left out, overlapping places collapsed to the best: best first. `good`,
    `bad`: the marked places and their descriptors (readable_marks)."""
    (good, good_d), (bad, bad_d) = good, bad
    size = model.img_size
    pool = list(hits)
    prior = list(range(1, len(hits) + 1))
    if good:
        good_drawings = places_as_sketches(good[:fb.EXPANSIONS], size)
        for drawing in good_drawings:
            raise_if_stopped("searching for places like the ones marked good")
            more = search(index, model, drawing, ranking, top=fb.EXPANSION_TOP, area_wgs84=area_wgs84,
                          max_overlap=max_overlap).hits
            pool += more
            prior += list(range(1, len(more) + 1))
    candidates = describe_places([h.placement for h in pool], size, drawing_device(model.device))
    query = fb.rocchio_query(describe_sketch(sketch), good_d, bad_d)
    scores = fb.feedback_scores(candidates, query, np.asarray(prior, np.float64))
    rejected = overlapping([h.placement for h in pool], reproject_rings(bad, WGS84), WGS84, fb.SAME_PLACE_IOU)
    order = np.array([i for i in np.argsort(-scores, kind="stable") if not rejected[i]], dtype=np.int64)
    kept = dedupe(Footprints([h.placement for h in pool]), order, max_overlap)
    return [replace(pool[i], rank=n + 1, score=float(scores[i])) for n, i in enumerate(kept)]


def places_as_sketches(places: list[Placement], size: int) -> list[torch.Tensor]:
    """Places drawn as one picture each, as sketch tensors (3, S, S) in [0, 1]."""
    from worker.verify import draw_placements

    drawings = draw_placements(places, size)
    return [torch.from_numpy(d.astype(np.float32) / 255.0)[None].expand(3, -1, -1).contiguous() for d in drawings]
