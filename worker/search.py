"""Sketch search: global-token shortlist, cross-attention re-rank, spatial de-duplication."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import Polygon

from worker.geo import reproject_rings
from worker.index import WGS84, TileIndex
from worker.tiling import Tile

SHORTLIST_CHUNK = 65536


def shortlist_topk(query: np.ndarray, rows: np.ndarray, k: int, candidates: np.ndarray | None = None,
                   chunk: int = SHORTLIST_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine scores of the k rows most similar to `query`, best first.

    `rows` (n, D) fp16 or fp32, possibly memory-mapped, is scanned in chunks so a million rows
    never need a full fp32 copy. Ties break by row index, so results are deterministic.
    `candidates` optionally restricts the scan to a boolean mask of rows.
    """
    q = np.asarray(query, np.float32)
    best_idx = np.zeros(0, np.int64)
    best_score = np.zeros(0, np.float32)
    for start in range(0, len(rows), chunk):
        block = np.asarray(rows[start:start + chunk], dtype=np.float32)
        scores = block @ q
        idx = np.arange(start, start + len(block))
        if candidates is not None:
            keep = candidates[start:start + len(block)]
            scores, idx = scores[keep], idx[keep]
        if len(scores) > k:
            part = np.argpartition(-scores, k - 1)[:k]
            # argpartition is not stable on ties: widen to every row scoring at least the k-th
            cut = scores[part].min()
            part = np.nonzero(scores >= cut)[0]
            scores, idx = scores[part], idx[part]
        best_idx = np.concatenate([best_idx, idx])
        best_score = np.concatenate([best_score, scores])
        order = np.lexsort((best_idx, -best_score))[:k]
        best_idx, best_score = best_idx[order], best_score[order]
    return best_idx, best_score


def dedupe(polygons: list[Polygon], order: np.ndarray, max_overlap: float) -> list[int]:
    """Greedy spatial de-duplication: walk `order` (best first) and keep a footprint only if it
    overlaps every kept one by at most `max_overlap` of the smaller of the two areas."""
    kept: list[int] = []
    kept_polys: list[Polygon] = []
    for i in order:
        p = polygons[i]
        if all(p.intersection(q).area <= max_overlap * min(p.area, q.area) for q in kept_polys
               if p.intersects(q)):
            kept.append(int(i))
            kept_polys.append(p)
    return kept


@dataclass
class Hit:
    rank: int
    score: float
    shortlist_score: float
    tile: Tile
    row: int


@dataclass
class SearchResult:
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    candidates: int = 0


def search(index: TileIndex, model, sketch_tensor, top: int = 10, shortlist: int = 200,
           area_wgs84: Polygon | None = None, max_overlap: float = 0.3,
           scales: tuple[int, ...] | None = None) -> SearchResult:
    """Rank the index's tiles for one preprocessed sketch (3, S, S)."""
    t = {"start": time.perf_counter()}
    sketch = model.encode_sketch(sketch_tensor)
    t["encode"] = time.perf_counter()

    mask = None
    if area_wgs84 is not None or scales is not None:
        mask = np.ones(len(index), bool)
        if scales is not None:
            mask &= np.isin(index.records["scale"], scales)
        if area_wgs84 is not None:
            b = index.records["bounds4326"]
            minx, miny, maxx, maxy = area_wgs84.bounds
            mask &= (b[:, 0] <= maxx) & (b[:, 2] >= minx) & (b[:, 1] <= maxy) & (b[:, 3] >= miny)
            rows = np.nonzero(mask)[0]
            if len(rows):
                boxes = shapely.box(b[rows, 0], b[rows, 1], b[rows, 2], b[rows, 3])
                mask[rows] = shapely.intersects(boxes, area_wgs84)
    rows, short_scores = shortlist_topk(sketch.global_token.cpu().numpy(), index.global_tokens,
                                        shortlist, candidates=mask)
    t["shortlist"] = time.perf_counter()

    if len(rows):
        tokens, positions = index.tokens_of(rows)
        scores = model.rerank_scores(sketch, tokens, short_scores, positions)
    else:
        scores = np.zeros(0)
    order = np.lexsort((rows, -scores))
    t["rerank"] = time.perf_counter()

    tiles = [index.tile(int(r)) for r in rows]
    polygons = reproject_rings(tiles, WGS84)
    if area_wgs84 is not None:  # exact footprint test (the mask above used bounding boxes)
        order = np.array([i for i in order if polygons[i].intersects(area_wgs84)], dtype=np.int64)
    kept = dedupe(polygons, order, max_overlap)[:top]
    t["dedupe"] = time.perf_counter()

    hits = [Hit(rank=n + 1, score=float(scores[i]), shortlist_score=float(short_scores[i]), tile=tiles[i],
                row=int(rows[i])) for n, i in enumerate(kept)]
    stages = ["start", "encode", "shortlist", "rerank", "dedupe"]
    timings = {f"{b}_ms": (t[b] - t[a]) * 1e3 for a, b in zip(stages, stages[1:])}
    timings["total_ms"] = (t["dedupe"] - t["start"]) * 1e3
    return SearchResult(hits=hits, timings_ms=timings, candidates=len(rows))
