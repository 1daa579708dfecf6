"""Sketch search: a shortlist scan over every tile, a re-rank of the shortlist, spatial de-duplication.

With the default "layout" ranker the shortlist is the coarse edge layout and the re-rank the
fine edge layout blended with the cross-attention token score; the "tokens" ranker is the
paper's two stages (global-token shortlist, cross-attention re-rank). See ModelConfig.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import shapely
import torch
from shapely.geometry import Polygon

from worker.edge_layout import fine_similarity
from worker.geo import reproject_rings
from worker.index import WGS84, TileIndex
from worker.tiling import Tile

SHORTLIST_CHUNK = 65536


def _chunk_candidates(block: np.ndarray, q16: torch.Tensor, k: int) -> np.ndarray:
    """Rows of an fp16 block (more than k rows) that may be in the exact top k: a fast fp16 matrix-vector product
    (fp32 accumulation, fp16 output), then every row within twice the output rounding error of
    the k-th score. If a true top-k row scores s, its fp16 score is at least s - e, and the
    k-th fp16 score is at most the true k-th + e, so nothing of the true top k is lost."""
    scores = (torch.from_numpy(block) @ q16).float()
    kth = torch.topk(scores, k).values[-1]
    error = 2.0 ** -10 * float(scores.abs().max()) + 1e-4  # fp16 rounding of the output, with room
    return torch.nonzero(scores >= kth - 2 * error).squeeze(1).numpy()


def shortlist_topk(query: np.ndarray, rows: np.ndarray, k: int, candidates: np.ndarray | None = None,
                   chunk: int = SHORTLIST_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine scores of the k rows most similar to `query`, best first: exactly the
    fp32 brute-force result, ties broken by row index, so results are deterministic.

    `rows` (n, D), possibly memory-mapped, is scanned in chunks. fp16 rows get a fast fp16 pass
    that keeps a safe superset of the top k, rescored in fp32 (10x faster than converting every
    row at 1M rows). `candidates` optionally restricts the scan to a boolean mask of rows.
    """
    q = np.asarray(query, np.float32)
    q16 = torch.from_numpy(q.astype(np.float16))
    best_idx = np.zeros(0, np.int64)
    best_score = np.zeros(0, np.float32)
    for start in range(0, len(rows), chunk):
        block = np.asarray(rows[start:start + chunk])
        idx = np.arange(start, start + len(block))
        if candidates is not None:
            keep = candidates[start:start + len(block)]
            block, idx = block[keep], idx[keep]
        if block.dtype == np.float16 and len(block) > k:
            near = _chunk_candidates(block, q16, k)
            block, idx = block[near], idx[near]
        scores = np.asarray(block, np.float32) @ q
        best_idx = np.concatenate([best_idx, idx])
        best_score = np.concatenate([best_score, scores])
        order = np.lexsort((best_idx, -best_score))[:k]
        best_idx, best_score = best_idx[order], best_score[order]
    return best_idx, best_score


def dedupe(polygons: list[Polygon], order: np.ndarray, max_overlap: float, limit: int | None = None) -> list[int]:
    """Greedy spatial de-duplication: walk `order` (best first) and keep a footprint only if it
    overlaps every kept one by at most `max_overlap` of the smaller of the two areas; stop
    after `limit` kept."""
    kept: list[int] = []
    kept_polys: list[Polygon] = []
    for i in order:
        if limit is not None and len(kept) >= limit:
            break
        p = polygons[i]
        if all(p.intersection(q).area <= max_overlap * min(p.area, q.area) for q in kept_polys
               if p.intersects(q)):
            kept.append(int(i))
            kept_polys.append(p)
    return kept


def standardise(scores: np.ndarray) -> np.ndarray:
    """Scores as z-values over the candidates, so scores of different scales can be blended."""
    scores = np.asarray(scores, np.float64)
    spread = scores.std()
    return (scores - scores.mean()) / spread if spread > 1e-12 else np.zeros_like(scores)


def shortlist_rows(model, index: TileIndex, sketch) -> tuple[np.ndarray, np.ndarray]:
    """The query vector and the index rows the ranker's shortlist scans."""
    if model.config.ranker == "tokens":
        return sketch.global_token.cpu().numpy(), index.global_tokens
    return sketch.layout_coarse, index.coarse_layouts


def candidate_scores(model, sketch, count: int, fine_of: Callable[[], np.ndarray],
                     tokens_of: Callable[[np.ndarray], tuple]) -> np.ndarray:
    """Re-rank scores of `count` shortlisted tiles. `fine_of()` gives their stored fine layouts,
    `tokens_of(i)` the stored tokens and positions of shortlist positions i; each is read only
    when the ranker needs it. The layout ranker computes the token score only for its best
    `token_candidates` tiles by fine layout (the expensive part of a query on a CPU)."""
    if model.config.ranker == "tokens":
        return model.token_scores(sketch, *tokens_of(np.arange(count)))
    scores = standardise(fine_similarity(sketch.layout_fine, fine_of()))
    if model.config.token_weight and count:
        best = np.argsort(-scores, kind="stable")[:model.config.token_candidates]
        scores[best] += model.config.token_weight * standardise(model.token_scores(sketch, *tokens_of(best)))
    return scores


def rerank(model, index: TileIndex, sketch, rows: np.ndarray) -> np.ndarray:
    return candidate_scores(model, sketch, len(rows), lambda: index.fine_layouts_of(rows),
                            lambda i: index.tokens_of(rows[i]))


@dataclass
class Hit:
    rank: int
    score: float
    shortlist_score: float
    tile: Tile
    row: int

    @property
    def raster_path(self) -> str:
        return self.tile.raster.path

    def footprint_pixels(self):
        return self.tile.footprint_pixels()


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
    query, scanned = shortlist_rows(model, index, sketch)
    rows, short_scores = shortlist_topk(query, scanned, shortlist, candidates=mask)
    t["shortlist"] = time.perf_counter()

    scores = rerank(model, index, sketch, rows) if len(rows) else np.zeros(0)
    order = np.lexsort((rows, -scores))
    t["rerank"] = time.perf_counter()

    tiles = [index.tile(int(r)) for r in rows]
    polygons = reproject_rings(tiles, WGS84)
    if area_wgs84 is not None:  # exact footprint test (the mask above used bounding boxes)
        order = np.array([i for i in order if polygons[i].intersects(area_wgs84)], dtype=np.int64)
    kept = dedupe(polygons, order, max_overlap, limit=top)
    t["dedupe"] = time.perf_counter()

    hits = [Hit(rank=n + 1, score=float(scores[i]), shortlist_score=float(short_scores[i]), tile=tiles[i],
                row=int(rows[i])) for n, i in enumerate(kept)]
    stages = ["start", "encode", "shortlist", "rerank", "dedupe"]
    timings = {f"{b}_ms": (t[b] - t[a]) * 1e3 for a, b in zip(stages, stages[1:])}
    timings["total_ms"] = (t["dedupe"] - t["start"]) * 1e3
    return SearchResult(hits=hits, timings_ms=timings, candidates=len(rows))
