"""Sketch search: find where a sketch lies in the index's rasters, at any offset, size and turn.

The default "layout" ranker slides the sketch's edge layout (worker.query_templates) over every
raster's level maps (worker.level_maps): a coarse scan at 16 px steps everywhere, local peaks,
then a fine HOG score at 8 px steps around each peak, each template's scores calibrated against
its own background; the best placements are read from their rasters and drawn as one picture
each (verified); optionally the paper's cross-attention token score, aligned to where each
placement lies in the tile under it, is blended in; overlapping placements of one place collapse
to the best. A hit is that placement: the turned square of the raster the sketch matched. The
"tokens" ranker is the paper's two stages alone (global-token shortlist over tiles,
cross-attention re-rank), kept for comparison.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import shapely
import torch
import torch.nn.functional as F
from shapely.geometry import Polygon

from worker import edge_cells, query_templates
from worker.edge_cells import CELL, COARSE, FINE
from worker.errors import InputError
from worker.geo import reproject_rings
from worker.store import WGS84, TileIndex
from worker.level_maps import LevelMap
from worker.placement import Placement
from worker.ranking import RankingConfig

SHORTLIST_CHUNK = 65536
COARSE_STEP = 2  # coarse scan every 2 stored cells (16 level px)


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


@dataclass
class Candidate:
    """A placement of one template on one level map: its window's top-left stored cell."""

    map_key: tuple[int, int]
    size: int  # template side, level px
    angle: float
    row: int  # stored cells
    col: int
    coarse: float
    fine: float = 0.0
    tokens: float | None = None
    verified: float | None = None
    score: float = 0.0

    @property
    def rank_key(self) -> tuple:
        """Verified placements first (their scores are on another scale), then by score."""
        return (self.verified is None, -self.score)
    tile_row: int | None = None  # the index row of the tile under it (the "tokens" ranker's tile)

    def placement(self, level: LevelMap) -> Placement:
        half = self.size / 2
        x, y = self.col * CELL + half, self.row * CELL + half
        return Placement(level.raster, x * level.level_px, y * level.level_px, self.size * level.level_px, self.angle)


@dataclass
class Hit:
    """Where the sketch matched: a placement in a raster, its scores, and the index's scale there."""

    rank: int
    score: float
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


@dataclass
class SearchResult:
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)


class Scanner:
    """The dense scans of one index: cells and coarse block maps are made once per level map and
    kept. Cells are padded by PAD stored cells of blank on every side, so a fine search near
    the raster's edge reads blank, not out of bounds."""

    PAD = 8

    def __init__(self, index: TileIndex, device: torch.device):
        self.index = index
        self.device = device
        self._coarse: dict[tuple[int, int], torch.Tensor] = {}
        self._cells: dict[tuple[int, int], torch.Tensor] = {}

    def padded_cells(self, key: tuple[int, int]) -> torch.Tensor:
        if key not in self._cells:
            cells = edge_cells.dequantise(self.index.maps[key].cells, self.device)
            self._cells[key] = F.pad(cells, (0, 0, self.PAD, self.PAD, self.PAD, self.PAD))
        return self._cells[key]

    def cells(self, key: tuple[int, int]) -> torch.Tensor:
        p = self.PAD
        return self.padded_cells(key)[p:-p, p:-p]

    def coarse_blocks(self, key: tuple[int, int]) -> torch.Tensor:
        if key not in self._coarse:
            self._coarse[key] = edge_cells.block_map(self.cells(key), COARSE, step=COARSE_STEP)
        return self._coarse[key]


def scanner_of(index: TileIndex, device: torch.device) -> Scanner:
    """The index's scanner (kept on the index object, so an open index scans without rebuilding)."""
    scanner = getattr(index, "_scanner", None)
    if scanner is None or scanner.device != device:
        scanner = Scanner(index, device)
        index._scanner = scanner
    return scanner


def coarse_peaks(scanner: Scanner, templates: query_templates.Templates, ranking: RankingConfig,
                 keys: list[tuple[int, int]]) -> list[Candidate]:
    """Local peaks of the coarse score on every level map, best `ranking.shortlist` overall.

    Templates of different sizes and turns are not equally easy to match by chance (a smaller
    template has fewer blocks, so its best cosine anywhere is higher), so each template's scores
    are calibrated as z-values against its own scores over every window of the index."""
    maps: list[tuple[tuple[int, int], int, torch.Tensor]] = []
    moments: dict[int, torch.Tensor] = {}
    for key in keys:
        blocks = scanner.coarse_blocks(key)
        for size in templates.sizes:
            n = COARSE.blocks_per_side(size)
            gap = COARSE.span // COARSE_STEP
            if blocks.shape[2] < (n - 1) * gap + 1 or blocks.shape[3] < (n - 1) * gap + 1:
                continue  # the raster is smaller than this template at this scale
            scores = edge_cells.cosine_map(blocks, templates.coarse[size], COARSE, COARSE_STEP,
                                           ranking.inked_only)[0]  # A, R, C
            maps.append((key, size, scores))
            flat = scores.flatten(1)
            m = torch.stack([flat.sum(1), (flat ** 2).sum(1), torch.full_like(flat[:, 0], flat.shape[1])])
            moments[size] = moments[size] + m if size in moments else m
    found: list[Candidate] = []
    for key, size, scores in maps:
        total, squares, count = moments[size]
        mean = total / count
        std = (squares / count - mean ** 2).clamp(min=1e-12).sqrt()
        z = (scores - mean[:, None, None]) / std[:, None, None] if ranking.calibrate else scores
        best, angle = z.max(0)
        radius = max(1, size // (CELL * COARSE_STEP) // 4)  # peaks a quarter of the window apart
        pooled = F.max_pool2d(best[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]
        peak = (best >= pooled) & (scores.max(0).values > 0)
        flat = torch.nonzero(peak)
        order = torch.argsort(best[peak], descending=True)[:ranking.shortlist]
        for r, c in flat[order].tolist():
            found.append(Candidate(key, size, templates.angles[int(angle[r, c])], r * COARSE_STEP,
                                   c * COARSE_STEP, float(best[r, c])))
    found.sort(key=lambda c: -c.coarse)
    return found[:ranking.shortlist]


def _fine_scores(scanner: Scanner, template: torch.Tensor, size: int, spots: list[tuple[tuple[int, int], int, int]],
                 pad: int, inked_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Best fine cosine of one template within `pad` stored cells of each spot (map key, row,
    col), and where: (B,) scores, (B,) flat offsets in the (2 pad + 1)^2 neighbourhood."""
    span = size // CELL + 2 * pad
    regions = []
    for key, row, col in spots:
        cells = scanner.padded_cells(key)
        r0, c0 = row - pad + Scanner.PAD, col - pad + Scanner.PAD
        region = cells[max(r0, 0):r0 + span, max(c0, 0):c0 + span]
        if region.shape[:2] != (span, span):  # beyond even the padding: fill with blank
            region = F.pad(region, (0, 0, 0, span - region.shape[1], 0, span - region.shape[0]))
        regions.append(region)
    blocks = edge_cells.block_map(torch.stack(regions), FINE)
    scores = edge_cells.cosine_map(blocks, template[None], FINE, inked_only=inked_only)[:, 0]  # B, 2 pad + 1, ...
    return scores.flatten(1).max(1)


BACKGROUND_SPOTS = 128  # random windows per template that calibrate its fine score


def refine(scanner: Scanner, templates: query_templates.Templates, ranking: RankingConfig,
           candidates: list[Candidate], keys: list[tuple[int, int]]) -> None:
    """The fine HOG score of each candidate at the best 8 px offset within `fine_radius` cells,
    calibrated per template against random windows of the index searched the same way."""
    pad = ranking.fine_radius
    groups: dict[tuple[int, float], list[Candidate]] = {}
    for c in candidates:
        groups.setdefault((c.size, c.angle), []).append(c)
    rng = np.random.default_rng(0)
    areas = np.array([scanner.cells(k).shape[0] * scanner.cells(k).shape[1] for k in keys], np.float64)
    for (size, angle), group in groups.items():
        template = templates.fine[size][templates.angles.index(angle)]
        best, where = _fine_scores(scanner, template, size, [(c.map_key, c.row, c.col) for c in group], pad,
                                   ranking.inked_only)
        width = 2 * pad + 1
        mean, std = 0.0, 1.0
        if ranking.calibrate:
            spots = []
            for k in rng.choice(len(keys), BACKGROUND_SPOTS, p=areas / areas.sum()):
                rows, cols = scanner.cells(keys[k]).shape[:2]
                spots.append((keys[k], int(rng.integers(0, max(1, rows - size // CELL))),
                              int(rng.integers(0, max(1, cols - size // CELL)))))
            background, _ = _fine_scores(scanner, template, size, spots, pad, ranking.inked_only)
            mean, std = float(background.mean()), max(float(background.std()), 1e-6)
        for c, value, at in zip(group, best.tolist(), where.tolist()):
            c.fine = (value - mean) / std
            c.row += at // width - pad
            c.col += at % width - pad


def tile_under(index: TileIndex, level: LevelMap, placement: Placement) -> int | None:
    """The index row of the tile of the placement's raster and scale whose centre is nearest
    the placement's centre (where its tokens describe the placed sketch best)."""
    rec = index.records
    rows = index.rows_of_map(level.raster_id, level.scale)
    if not len(rows):
        return None
    cx = rec["col_off"][rows] + rec["width"][rows] / 2
    cy = rec["row_off"][rows] + rec["height"][rows] / 2
    return int(rows[np.argmin((cx - placement.cx) ** 2 + (cy - placement.cy) ** 2)])


def aligned_positions(placement: Placement, tile, sketch_positions: np.ndarray, grid: int, patch: int,
                      tile_positions: np.ndarray, drawing: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each sketch token lies on the tile's patch grid (M, 2) (row, col), which sketch
    tokens fall inside the tile (M,), and which tile tokens fall inside the placement (N,)."""
    level_px = tile.width / drawing  # raster px per tile-drawing px
    a = math.radians(placement.angle)
    ca, sa = math.cos(a), math.sin(a)
    # sketch token centres in the sketch's frame (drawing px, from the frame's centre) -> raster px
    u = (sketch_positions % grid + 0.5) * patch - drawing / 2
    v = (sketch_positions // grid + 0.5) * patch - drawing / 2
    k = placement.side / drawing
    cols = placement.cx + k * (u * ca + v * sa)
    rows = placement.cy + k * (-u * sa + v * ca)
    t_col = (cols - tile.col_off) / level_px / patch - 0.5
    t_row = (rows - tile.row_off) / level_px / patch - 0.5
    sketch_rc = np.stack([t_row, t_col], 1).astype(np.float32)
    sketch_in = (t_row > -0.5) & (t_row < grid - 0.5) & (t_col > -0.5) & (t_col < grid - 0.5)
    # tile token centres -> raster px -> the placement's frame
    tc = tile.col_off + ((tile_positions % grid) + 0.5) * patch * level_px
    tr = tile.row_off + ((tile_positions // grid) + 0.5) * patch * level_px
    dc, dr = tc - placement.cx, tr - placement.cy
    fu, fv = dc * ca - dr * sa, dc * sa + dr * ca
    half = placement.side / 2
    tile_in = (np.abs(fu) < half) & (np.abs(fv) < half)
    return sketch_rc, sketch_in, tile_in


@dataclass
class Drawn:
    """A placement read from its raster and drawn as one picture, in the sketch's frame."""

    drawing: np.ndarray  # (S, S) uint8, dark lines on white


def draw_placements(placements: list[Placement], size: int) -> np.ndarray:
    """The line drawings of placements, each read as the user's frame sees it: (B, S, S) uint8."""
    from worker.line_drawing import tile_line_drawings

    read = [p.read(size) for p in placements]
    images = np.stack([r[0] for r in read])
    valid = np.stack([r[1] for r in read])
    return tile_line_drawings(images, valid)[..., 0]


def verify(index: TileIndex, sketch_tensor: torch.Tensor, candidates: list[Candidate], ranking: RankingConfig,
           size: int) -> list[int]:
    """Re-score the best `ranking.verify` candidates by the sketch's HOG against their own
    drawing: the place read from its raster at the placement (turned as the sketch's frame) and
    drawn as one picture. The level maps join the drawings of overlapping tiles, each made with
    its own contrast; a person draws what they see in their frame, so the frame drawn as one
    picture is the fairer comparison. Returns the verified candidates' positions, best first."""
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i].score)[:ranking.verify]
    if not order:
        return []
    drawings = draw_placements([candidates[i].placement(index.maps[candidates[i].map_key]) for i in order], size)
    sketch = torch.from_numpy((sketch_tensor[0].cpu().numpy() * 255).round().astype(np.uint8))[None]
    query = edge_cells.describe(sketch, FINE)[0]
    seen = edge_cells.describe(torch.from_numpy(drawings), FINE)
    own = (seen @ query).numpy()
    combined = standardise(own) * ranking.verify_weight + standardise([candidates[i].score for i in order])
    for i, v, z in zip(order, own, combined):
        candidates[i].verified = float(v)
        candidates[i].score = float(z)
    return order


def token_rerank(index: TileIndex, model, sketch_tensor: torch.Tensor, candidates: list[Candidate],
                 ranking: RankingConfig) -> None:
    """Blend the aligned cross-attention score into the best `token_candidates` placements."""
    if not candidates or not ranking.token_weight:
        return
    best = sorted(range(len(candidates)), key=lambda i: candidates[i].rank_key)[:ranking.token_candidates]
    placements = {i: candidates[i].placement(index.maps[candidates[i].map_key]) for i in best}
    for i in best:
        candidates[i].tile_row = tile_under(index, index.maps[candidates[i].map_key], placements[i])
    chosen = [i for i in best if candidates[i].tile_row is not None]
    if not chosen:
        return
    sketch = model.encode_sketch(sketch_tensor)
    grid = model.scorer.grid
    patch = model.img_size // grid
    sketch_pos = sketch.positions.cpu().numpy().astype(np.int64)
    tokens, positions = index.tokens_of(np.array([candidates[i].tile_row for i in chosen]))
    aligned = [aligned_positions(placements[i], index.tile(candidates[i].tile_row), sketch_pos, grid, patch,
                                 pos.astype(np.int64), model.img_size) for i, pos in zip(chosen, positions)]
    rcs, ins, tins = (np.stack(parts) for parts in zip(*aligned))
    scores = model.aligned_token_scores(sketch, tokens, positions, rcs, ins, tins)
    for i, s in zip(chosen, scores):
        candidates[i].tokens = float(s)
    for i, z in zip(chosen, standardise(scores)):
        candidates[i].score += ranking.token_weight * float(z)


def tile_candidates(index: TileIndex, model, sketch_tensor: torch.Tensor, ranking: RankingConfig,
                    mask: np.ndarray | None) -> list[Candidate]:
    """The paper's two stages over tiles: global-token shortlist, cross-attention re-rank."""
    sketch = model.encode_sketch(sketch_tensor)
    rows, short = shortlist_topk(sketch.global_token.cpu().numpy(), index.global_tokens, ranking.shortlist,
                                 candidates=mask)
    scores = model.token_scores(sketch, *index.tokens_of(rows)) if len(rows) else np.zeros(0)
    out = []
    for row, s_short, s in zip(rows, short, scores):
        rec = index.records[row]
        key = (int(rec["raster_id"]), int(rec["scale"]))
        c = Candidate(key, model.img_size, 0.0, int(rec["cell_row"]), int(rec["cell_col"]), float(s_short),
                      fine=0.0, tokens=float(s), score=float(s), tile_row=int(row))
        out.append(c)
    return out


def _tile_placement(index: TileIndex, row: int) -> Placement:
    t = index.tile(row)
    return Placement(t.raster, t.col_off + t.width / 2, t.row_off + t.height / 2, float(t.width))


def search(index: TileIndex, model, sketch_tensor: torch.Tensor, ranking: RankingConfig | None = None, top: int = 10,
           area_wgs84: Polygon | None = None, max_overlap: float = 0.3, scales: tuple[int, ...] | None = None,
           shortlist: int | None = None) -> SearchResult:
    """Rank where a preprocessed sketch (3, S, S) lies in the index's rasters; the best `top`
    non-overlapping placements, best first. `area_wgs84` limits hits to those touching it."""
    ranking = ranking or RankingConfig()
    if shortlist is not None:
        ranking = replace(ranking, shortlist=shortlist)
    t = {"start": time.perf_counter()}
    keys = [k for k in index.maps if scales is None or k[1] in scales]
    if area_wgs84 is not None:
        keys = [k for k in keys if index.map_bounds_wgs84(k).intersects(area_wgs84)]
    if ranking.ranker == "tokens":
        mask = np.isin(index.records["scale"], scales) if scales is not None else None
        candidates = tile_candidates(index, model, sketch_tensor, ranking, mask)
        t["encode"] = t["shortlist"] = t["refine"] = t["verify"] = time.perf_counter()
        placements = [_tile_placement(index, c.tile_row) for c in candidates]
    else:
        templates = query_templates.build(sketch_tensor, ranking.sizes, ranking.angles, model.device)
        scanner = scanner_of(index, model.device)
        t["encode"] = time.perf_counter()
        with torch.inference_mode():
            candidates = coarse_peaks(scanner, templates, ranking, keys)
            t["shortlist"] = time.perf_counter()
            refine(scanner, templates, ranking, candidates, keys)
            t["refine"] = time.perf_counter()
        for c in candidates:
            c.score = c.fine + ranking.coarse_weight * c.coarse
        verify(index, sketch_tensor, candidates, ranking, model.img_size)
        t["verify"] = time.perf_counter()
        token_rerank(index, model, sketch_tensor, candidates, ranking)
        placements = [c.placement(index.maps[c.map_key]) for c in candidates]
    t["rerank"] = time.perf_counter()

    order = np.array(sorted(range(len(candidates)), key=lambda i: (*candidates[i].rank_key, i)), dtype=np.int64)
    polygons = reproject_rings(placements, WGS84)
    if area_wgs84 is not None:
        order = np.array([i for i in order if polygons[i].intersects(area_wgs84)], dtype=np.int64)
    kept = dedupe(polygons, order, max_overlap, limit=top)
    t["dedupe"] = time.perf_counter()
    hits = [Hit(rank=n + 1, score=candidates[i].score, placement=placements[i], scale=candidates[i].map_key[1],
                coarse_score=candidates[i].coarse, fine_score=candidates[i].fine, token_score=candidates[i].tokens)
            for n, i in enumerate(kept)]
    stages = ["start", "encode", "shortlist", "refine", "verify", "rerank", "dedupe"]
    timings = {f"{b}_ms": (t[b] - t[a]) * 1e3 for a, b in zip(stages, stages[1:])}
    timings["total_ms"] = (t["dedupe"] - t["start"]) * 1e3
    return SearchResult(hits=hits, timings_ms=timings)
