"""The dense scans of a search: the sketch's templates slid over every level map.

A coarse scan at 16 px steps everywhere gives local peaks; a fine scan at 8 px steps around each
peak places it. Each template's scores are calibrated as z-values against its own background,
since a small or turned template matches by chance more easily than a large upright one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from worker import edge_cells, query_templates
from worker.cancellation import raise_if_stopped
from worker.candidates import Candidate
from worker.edge_cells import CELL, COARSE, FINE
from worker.ranking import RankingConfig
from worker.search_area import SearchArea
from worker.store import TileIndex
from worker.store.maps import crowds, region, regions

COARSE_STEP = 2  # coarse scan every 2 stored cells (16 level px)


class Scanner:
    """The dense scans of one index. Whole-map coarse block maps (the exact scan) are made once
    per batch of level maps (batch_maps) and kept; neighbourhoods are read from the stored cells (in memory or on disk)
    on demand, blank beyond the raster's edge."""

    def __init__(self, index: TileIndex, device: torch.device):
        self.index = index
        self.device = device
        self._coarse: dict[int, MapBatch] = {}
        self._batches: list[tuple[tuple[int, int], ...]] | None = None
        self._backgrounds: dict[tuple, object] = {}
        self._backgrounds_lock = threading.Lock()  # searches run in several threads (search_threads)

    def shape(self, key: tuple[int, int]) -> tuple[int, int]:
        return tuple(self.index.maps[key].cells.shape[:2])

    def coarse_batches(self, keys: list[tuple[int, int]]) -> list["MapBatch"]:
        """The whole-map coarse block maps of the maps `keys`, in the batches that hold them
        (batch_maps; a batch may hold other maps too), each made once and kept."""
        if self._batches is None:
            self._batches = batch_maps({key: self.shape(key) for key in self.index.maps})
        wanted = set(keys)
        out = []
        for i, members in enumerate(self._batches):
            if wanted.intersection(members):
                if i not in self._coarse:
                    self._coarse[i] = MapBatch.of(self.index, members, self.device)
                out.append(self._coarse[i])
        return out

    def regions(self, spots: list[tuple[tuple[int, int], int, int]], span: int) -> torch.Tensor:
        """Cells of square regions of `span` stored cells at each spot (map key, top-left row,
        col; beyond the map: blank): (n, span, span, ORIENTATIONS) float. Read by region
        (overlapping ones together: worker.store.maps.regions), so a map kept on disk is never
        read whole."""
        picked = np.empty((len(spots), span, span, edge_cells.ORIENTATIONS), np.uint8)
        for key, members in by_map(spots).items():
            corners = [(spots[i][1], spots[i][2]) for i in members]
            picked[members] = regions(self.index.maps[key].cells, corners, span)
        return edge_cells.dequantise(picked, self.device)

    def random_spots(self, keys: list[tuple[int, int]], n: int, side: int,
                     rng: np.random.Generator) -> list[tuple[tuple[int, int], int, int]]:
        """`n` random squares of `side` stored cells inside the maps `keys`, each map drawn in
        proportion to its area: the background that calibrates a score."""
        areas = np.array([np.prod(self.shape(k)) for k in keys], np.float64)
        spots = []
        for k in rng.choice(len(keys), n, p=areas / areas.sum()):
            rows, cols = self.shape(keys[k])
            spots.append((keys[k], int(rng.integers(0, max(1, rows - side))), int(rng.integers(0, max(1, cols - side)))))
        return spots

    def background(self, key: tuple, make):
        """What `make()` computes from random regions of the index, made once per `key` and kept:
        the backgrounds that calibrate scores are drawn with a fixed seed, so every search
        reads and describes the same regions (the refine took 55 ms p50 doing so at every search, 33 now).
        The latest BACKGROUNDS_KEPT are kept (searches limited to other maps make other ones)."""
        with self._backgrounds_lock:
            if key not in self._backgrounds:
                while len(self._backgrounds) >= BACKGROUNDS_KEPT:
                    self._backgrounds.pop(next(iter(self._backgrounds)))
                self._backgrounds[key] = make()
            return self._backgrounds[key]


BACKGROUNDS_KEPT = 16

# A mosaic of many small rasters has as many small level maps, and torch's CPU convolution pays
# more per call than per multiply: 1,000 rasters of 240 px (4,000 tiles) took 2.4 s to search
# with one thread and 19 s with two on a busy machine, against 0.9-1.4 s for the same pixels as
# one VRT. Maps of at most SMALL_MAP_CELLS stored cells are scanned in batches of similar shapes,
# padded to the largest: at most BATCH_CELLS cells a batch, padding at most PADDING of its maps'.
SMALL_MAP_CELLS = 128 * 128
BATCH_CELLS = 1 << 20
PADDING = 0.25


def batch_maps(shapes: dict[tuple[int, int], tuple[int, int]]) -> list[tuple[tuple[int, int], ...]]:
    """Level maps (key: rows, cols of stored cells) in the batches their coarse scan runs in:
    small maps of similar shapes together, each larger one alone."""
    batches, current, own, widest = [], [], 0, 0
    for key in sorted(shapes, key=lambda k: (shapes[k], k)):  # by shape: a batch's most rows are its last map's
        rows, cols = shapes[key]
        if rows * cols > SMALL_MAP_CELLS:
            batches.append((key,))
            continue
        padded = (len(current) + 1) * rows * max(widest, cols)
        if current and (padded > BATCH_CELLS or padded > (1 + PADDING) * (own + rows * cols)):
            batches.append(tuple(current))
            current, own, widest = [], 0, 0
        current.append(key)
        own += rows * cols
        widest = max(widest, cols)
    if current:
        batches.append(tuple(current))
    return batches


@dataclass(frozen=True)
class MapBatch:
    """Level maps scanned as one: their coarse block maps padded to one shape (B, dim, R, C),
    and each map's own block positions (B, 2) (past them: padding, never a place)."""

    keys: tuple[tuple[int, int], ...]
    blocks: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(cls, index: TileIndex, keys: tuple[tuple[int, int], ...], device: torch.device) -> "MapBatch":
        shapes = [index.maps[key].cells.shape[:2] for key in keys]
        if len(keys) == 1:
            cells = edge_cells.dequantise(np.asarray(index.maps[keys[0]].cells), device)[None]
        else:
            cells = torch.zeros(len(keys), max(r for r, _ in shapes), max(c for _, c in shapes),
                                edge_cells.ORIENTATIONS, device=device)
            for i, (key, (rows, cols)) in enumerate(zip(keys, shapes)):
                cells[i, :rows, :cols] = edge_cells.dequantise(np.asarray(index.maps[key].cells), device)
        positions = torch.tensor([[edge_cells.block_positions(n, COARSE, COARSE_STEP) for n in shape]
                                  for shape in shapes], device=device).reshape(-1, 2)
        return cls(keys, edge_cells.block_map(cells, COARSE, step=COARSE_STEP), positions)

    def places(self, score_shape: tuple[int, int], template_blocks: int) -> torch.Tensor:
        """Where a template of `template_blocks` a side lies wholly in its own map, in scores of
        `score_shape` (R, C): (B, R, C) bool."""
        reach = (template_blocks - 1) * (COARSE.span // COARSE_STEP)
        last = (self.positions - reach)[:, :, None]  # B, 2, 1
        rows = torch.arange(score_shape[0], device=last.device)[None, :] < last[:, 0]
        cols = torch.arange(score_shape[1], device=last.device)[None, :] < last[:, 1]
        return rows[:, :, None] & cols[:, None, :]


def by_map(spots: list[tuple[tuple[int, int], int, int]]) -> dict[tuple[int, int], list[int]]:
    """The positions in `spots` (map key, row, col) of each map's spots."""
    out: dict[tuple[int, int], list[int]] = {}
    for i, (key, _, _) in enumerate(spots):
        out.setdefault(key, []).append(i)
    return out


def scanner_of(index: TileIndex, device: torch.device) -> Scanner:
    """The index's scanner (kept on the index object, so an open index scans without rebuilding)."""
    scanner = getattr(index, "_scanner", None)
    if scanner is None or scanner.device != device:
        scanner = Scanner(index, device)
        index._scanner = scanner
    return scanner


def coarse_peaks(scanner: Scanner, templates: query_templates.Templates, ranking: RankingConfig,
                 area: SearchArea, limit: int) -> list[Candidate]:
    """Local peaks of the coarse score on every level map of `area`, best `limit` overall of
    those that meet it.

    Templates of different sizes and turns are not equally easy to match by chance (a smaller
    template has fewer blocks, so its best cosine anywhere is higher), so each template's scores
    are calibrated as z-values against its own scores over every window of the index."""
    scanned: list[tuple[MapBatch, int, torch.Tensor, torch.Tensor]] = []  # batch, size, scores, places
    moments: dict[int, torch.Tensor] = {}
    searched = set(area.keys)
    for batch in scanner.coarse_batches(area.keys):
        raise_if_stopped("the coarse scan of the next level maps")
        fitting = {size: t for size, t in templates.coarse.items()  # a raster may be smaller than a template
                   if edge_cells.fits(batch.blocks, COARSE.blocks_per_side(size), COARSE, COARSE_STEP)}
        if not fitting:
            continue
        in_area = torch.tensor([key in searched for key in batch.keys], device=batch.blocks.device)
        for size, scores in edge_cells.cosine_maps(batch.blocks, fitting, COARSE, COARSE_STEP, ranking.inked_only).items():
            places = batch.places(scores.shape[2:], COARSE.blocks_per_side(size)) & in_area[:, None, None]
            if not places.any():
                continue
            scanned.append((batch, size, scores, places))
            m = _moments(scores, places)
            moments[size] = moments[size] + m if size in moments else m
    found: list[Candidate] = []
    for batch, size, scores, places in scanned:
        total, squares, count = moments[size]
        mean = total / count
        std = (squares / count - mean ** 2).clamp(min=1e-12).sqrt()
        z = (scores - mean[:, None, None]) / std[:, None, None] if ranking.calibrate else scores
        best, angle = z.max(1)  # B, R, C
        best = best.masked_fill(~places, -torch.inf)
        pooled = neighbourhood_max(best[:, None], peak_radius(size))[:, 0]
        peak = places & (best >= pooled) & (scores.amax(1) > 0)
        for b, key in enumerate(batch.keys):
            if key in area.boxes:
                steps = np.arange(max(peak.shape[1:])) * COARSE_STEP
                inside = area.meets(key, steps[:peak.shape[1], None], steps[None, :peak.shape[2]], size // CELL)
                peak[b] &= torch.from_numpy(inside).to(peak.device)
        at = torch.nonzero(peak)
        order = torch.argsort(best[peak], descending=True)[:limit]
        for b, r, c in at[order].tolist():
            found.append(Candidate(batch.keys[b], size, templates.angles[int(angle[b, r, c])], r * COARSE_STEP,
                                   c * COARSE_STEP, float(best[b, r, c])))
    found.sort(key=lambda c: -c.coarse)
    return found[:limit]


def _moments(scores: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """Per angle, the sum and the sum of squares of scores (B, A, R, C) over `places` (B, R, C),
    and their count: (3, A)."""
    if bool(places.all()):
        flat = scores.transpose(0, 1).flatten(1)
        return torch.stack([flat.sum(1), (flat ** 2).sum(1), torch.full_like(flat[:, 0], flat.shape[1])])
    kept = scores * places[:, None]
    return torch.stack([kept.sum((0, 2, 3)), (kept * scores).sum((0, 2, 3)),
                        torch.full_like(kept[0, :, 0, 0], float(places.sum()))])


ANN_MARGIN = 14  # stored cells around an ANN window that its local scan covers (half a tile)
ANN_BACKGROUND = 48  # random neighbourhoods that calibrate the local coarse scores
WINDOW_CELLS = 28  # a tile's 224 level px in stored cells: the ANN's windows (worker.ann)
ANN_SPAN = WINDOW_CELLS + 2 * ANN_MARGIN  # stored cells a side of an ANN window's local scan


def ann_peaks(scanner: Scanner, templates: query_templates.Templates, ranking: RankingConfig,
              windows: np.ndarray, limit: int, area: SearchArea | None = None) -> list[Candidate]:
    """The coarse scan where the ANN shortlist points (windows: raster id, scale, row, col of
    grid windows): each window and half a tile around it scanned exactly, scores calibrated
    against random neighbourhoods of the index, and the local peaks kept as the exact scan keeps
    them (coarse_peaks): the neighbourhoods of nearby windows overlap, so a peak found in several
    is kept once, and a neighbourhood may hold more than one place worth refining. Only peaks
    that meet `area`, at places the exact scan could have found (inside the maps), are kept."""
    if not len(windows):
        return []
    side = ANN_SPAN

    def background_blocks() -> torch.Tensor:
        spots = scanner.random_spots(list(scanner.index.maps), ANN_BACKGROUND, side, np.random.default_rng(0))
        return edge_cells.block_map(scanner.regions(spots, side), COARSE, step=COARSE_STEP)

    background = scanner.background(("ann", side), background_blocks)
    spots = [((int(r), int(s)), int(row) - ANN_MARGIN, int(col) - ANN_MARGIN) for r, s, row, col in windows]
    local = local_scores(scanner, spots, side, templates, ranking)
    origins = np.array([(row, col) for _, row, col in spots]).reshape(-1, 2)
    shapes = np.array([scanner.shape(key) for key, _, _ in spots]).reshape(-1, 2)
    peaks = []  # per template size: region, top-left stored cell in its map, angle, z
    backgrounds = edge_cells.cosine_maps(background, templates.coarse, COARSE, COARSE_STEP, ranking.inked_only)
    for size in templates.sizes:
        flat = backgrounds[size].permute(1, 0, 2, 3).flatten(1)  # A, ...
        mean, std = flat.mean(1), flat.std(1).clamp(min=1e-6)
        if not ranking.calibrate:
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        scores = local[size]  # B, A, R, C
        best, angle = ((scores - mean[None, :, None, None]) / std[None, :, None, None]).max(1)
        radius = peak_radius(size)
        pooled = neighbourhood_max(best[:, None], radius)[:, 0]
        peak = (best >= pooled) & (scores.amax(1) > 0)
        at = torch.nonzero(peak).cpu().numpy()
        found = angle[peak].cpu().numpy(), best[peak].cpu().numpy()
        # where the exact scan could have put the square (the neighbourhoods reach past the maps' edges)
        corner = origins[at[:, 0]] + at[:, 1:] * COARSE_STEP
        inside = ((corner >= 0) & (corner + size // CELL <= shapes[at[:, 0]])).all(1)
        if area is not None and area.boxes:
            inside &= area.meets_each(windows[at[:, 0], :2], corner[:, 0], corner[:, 1], size // CELL)
        peaks.append((size, at[inside, 0], corner[inside], *(f[inside] for f in found)))
    return apart(peaks, spots, templates.angles, limit)


def local_scores(scanner: Scanner, spots: list[tuple[tuple[int, int], int, int]], side: int,
                  templates: query_templates.Templates, ranking: RankingConfig) -> dict[int, torch.Tensor]:
    """Each template size's coarse cosines over the square of `side` stored cells at each spot:
    (spots, angles, R, C). The neighbourhoods of nearby windows overlap, so squares crowded
    together (worker.store.maps.crowds) are scored as one block and cut apart (the same
    numbers, each made once); the others are scored together as a batch."""
    def scored(cells: torch.Tensor) -> dict[int, torch.Tensor]:
        blocks = edge_cells.block_map(cells, COARSE, step=COARSE_STEP)
        return edge_cells.cosine_maps(blocks, templates.coarse, COARSE, COARSE_STEP, ranking.inked_only)

    alone, crowded = [], []
    for key, members in by_map(spots).items():
        for group, box in crowds([spots[i][1:] for i in members], side):
            ids = [members[g] for g in group]
            on_steps = all((spots[i][1] - box[0]) % COARSE_STEP == 0 and (spots[i][2] - box[1]) % COARSE_STEP == 0
                           for i in ids)  # each square's scores then lie on the block's grid of positions
            if len(ids) > 1 and on_steps:
                crowded.append((key, ids, box))
            else:
                alone.extend(ids)
    out: dict[int, torch.Tensor] = {}
    if alone:
        for size, scores in scored(scanner.regions([spots[i] for i in alone], side)).items():
            out[size] = scores.new_empty((len(spots), *scores.shape[1:]))
            out[size][alone] = scores
    for key, ids, (top, left, height, width) in crowded:
        cells = edge_cells.dequantise(region(scanner.index.maps[key].cells, top, left, height, width), scanner.device)
        for size, scores in scored(cells).items():
            rows, cols = scores.shape[2] - (height - side) // COARSE_STEP, scores.shape[3] - (width - side) // COARSE_STEP
            if size not in out:
                out[size] = scores.new_empty((len(spots), scores.shape[1], rows, cols))
            for i in ids:
                r, c = (spots[i][1] - top) // COARSE_STEP, (spots[i][2] - left) // COARSE_STEP
                out[size][i] = scores[0, :, r:r + rows, c:c + cols]
    return out


def neighbourhood_max(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """The largest score within `radius` positions (a square) of each position of (B, 1, R, C):
    what a peak must equal. Along rows, then along columns (the same numbers as one square
    max-pool), each a running max by doubling spans (_running_max): torch's CPU max-pool took
    0.24-0.35 s for 4 maps of 1,446 x 1,446 positions (19,000 tiles), a quarter of the exact
    coarse scan; this, 13-57 ms."""
    return _running_max(_running_max(scores, radius, 2), radius, 3)


def _running_max(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """The max of x over positions i - radius .. i + radius along `dim` (outside x: -inf), by
    maxima of spans doubled (1, 2, 4, ...) and two overlapping spans joined."""
    n, width = x.shape[dim], 2 * radius + 1
    pad = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
    spans, span = F.pad(x, pad, value=-torch.inf), 1  # spans[i]: the max of x over [i, i + span) padded
    while 2 * span <= width:
        kept = spans.shape[dim] - span
        spans, span = torch.maximum(spans.narrow(dim, 0, kept), spans.narrow(dim, span, kept)), 2 * span
    return torch.maximum(spans.narrow(dim, 0, n), spans.narrow(dim, width - span, n))


def peak_radius(size: int) -> int:
    """How far apart (coarse steps) two peaks of a template of `size` level px must lie: a
    quarter of its side."""
    return max(1, size // (CELL * COARSE_STEP) // 4)


def apart(peaks: list, spots: list[tuple[tuple[int, int], int, int]], angles: tuple[float, ...],
          limit: int) -> list[Candidate]:
    """The best `limit` of the neighbourhoods' peaks (per template size: region, top-left stored
    cell (row, col) in its map, angle index, z), best first, none within peak_radius of a better
    one of the same map and template size: the neighbourhoods of nearby windows overlap, so most
    peaks are found more than once."""
    rows = []  # size, region, row, col (stored cells), angle index, z
    for size, region, corner, angle, z in peaks:
        rows.append(np.column_stack([np.full(len(region), size), region, corner, angle, z]))
    table = np.concatenate(rows) if rows else np.zeros((0, 6))
    table = table[np.argsort(-table[:, 5], kind="stable")]
    # A place found from several neighbourhoods is the same place: only its first finding (the
    # best) can be kept, so the others leave before the loop (about two rows in three on the demo
    # scene are such repeats).
    maps = np.array([key for key, _, _ in spots], np.int64).reshape(-1, 2)[table[:, 1].astype(np.int64)]
    place = np.column_stack([maps, table[:, [0, 2, 3]].astype(np.int64)])
    table = table[first_of_each(place)]
    kept: list[Candidate] = []
    taken: dict[tuple, list[tuple[int, int]]] = {}
    for size, square, row, col, a, z in table.tolist():  # Python numbers: the loop's own cost
        size, row, col = int(size), int(row), int(col)
        key = spots[int(square)][0]
        reach = peak_radius(size) * COARSE_STEP
        bucket = (key, size, row // (reach + 1), col // (reach + 1))
        near = [p for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                for p in taken.get((key, size, bucket[2] + dr, bucket[3] + dc), ())]
        if any(abs(row - r) <= reach and abs(col - c) <= reach for r, c in near):
            continue
        taken.setdefault(bucket, []).append((row, col))
        kept.append(Candidate(key, size, angles[int(a)], row, col, float(z)))
        if len(kept) == limit:
            break
    return kept


def first_of_each(rows: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct row of an integer table, in order
    (np.unique(axis=0) gives the same, through a sort of whole rows as bytes, ten times slower)."""
    if not len(rows):
        return np.zeros(0, np.int64)
    order = np.lexsort(rows.T[::-1])  # stable: equal rows keep their order, the first leads
    ordered = rows[order]
    leads = np.ones(len(rows), bool)
    leads[1:] = (ordered[1:] != ordered[:-1]).any(1)
    return np.sort(order[leads])


def _fine_blocks(scanner: Scanner, size: int, spots: list[tuple[tuple[int, int], int, int]], pad: int) -> torch.Tensor:
    """Fine block maps of the neighbourhood within `pad` stored cells of a window of `size` level
    px at each spot (map key, row, col): (B, dim, R, C)."""
    span = size // CELL + 2 * pad
    return edge_cells.block_map(scanner.regions([(key, row - pad, col - pad) for key, row, col in spots], span), FINE)


def _fine_scores(blocks: torch.Tensor, templates: torch.Tensor, inked_only: bool) -> torch.Tensor:
    """Fine cosines of T templates (T, n, n, dim) at every offset of fine block maps
    (worker.placement_scan._fine_blocks): (B, T, (2 pad + 1)^2)."""
    return edge_cells.cosine_map(blocks, templates, FINE, inked_only=inked_only).flatten(2)


def _refine_backgrounds(scanner: Scanner, sizes: tuple[int, ...], keys: list[tuple[int, int]],
                        pad: int) -> dict[int, torch.Tensor]:
    """Fine block maps of BACKGROUND_SPOTS random windows of each template size in the maps
    `keys`, drawn from one seeded generator in the order of `sizes`."""
    rng = np.random.default_rng(0)
    return {size: _fine_blocks(scanner, size, scanner.random_spots(keys, BACKGROUND_SPOTS, size // CELL, rng), pad)
            for size in sizes}


BACKGROUND_SPOTS = 96  # random windows per template size that calibrate the fine scores


def refine(scanner: Scanner, templates: query_templates.Templates, ranking: RankingConfig,
           candidates: list[Candidate], keys: list[tuple[int, int]]) -> None:
    """The fine HOG score of each candidate at its best turn and 8 px offset within `fine_radius`
    cells, calibrated per template against random windows of the index searched the same way,
    and moved there. The turn is the fine score's choice, not the coarse peak's: 32 px cells
    tell turns 10 degrees apart poorly, and the fine scores of every turn are computed anyway.
    Held-out recall@1/5/10 0.600/0.708/0.764 -> 0.641/0.735/0.785 (750 queries, seed 2; seed 0
    in docs/benchmarks/quality.md), at no cost. A tile window (worker.tile_windows) keeps its
    place, and its own drawing's fine cosine, which it arrives with, is calibrated against the
    background windows' cosines at their own place: the best of 25 offsets of a random window
    scores higher than one place does, so against that a tile window's z-value came out about
    0.5 too low and the placements beat the tile a sketch was drawn on. (A placement's best over
    turns as well is not calibrated once more against the background's best over turns: that
    changed recall by a query or two either way, docs/benchmarks/quality.md.)"""
    pad = ranking.fine_radius
    width = 2 * pad + 1
    backgrounds = None
    if ranking.calibrate:
        backgrounds = scanner.background(("refine", templates.sizes, tuple(keys), pad),
                                         lambda: _refine_backgrounds(scanner, templates.sizes, keys, pad))
    for size in templates.sizes:
        raise_if_stopped("refining the next template size")  # a cancel waited for the whole stage (2 s, measured)
        group = [c for c in candidates if c.size == size]
        if not group:
            continue
        fine = templates.fine[size]  # A angles
        mean = torch.zeros(len(templates.angles), device=fine.device)
        std = torch.ones(len(templates.angles), device=fine.device)
        at_mean, at_std = mean, std
        if ranking.calibrate:
            background = _fine_scores(backgrounds[size], fine, ranking.inked_only)  # S, A, offsets
            best = background.amax(2)
            mean, std = best.mean(0), best.std(0).clamp(min=1e-6)
            at = background[:, :, pad * width + pad]  # the window itself, no offset tried
            at_mean, at_std = at.mean(0), at.std(0).clamp(min=1e-6)
        for c in group:
            if c.drawn is not None:  # a tile window: its own drawing's cosine at its own place, calibrated so
                angle = templates.angles.index(c.angle)
                c.fine = float((c.fine - at_mean[angle]) / at_std[angle])
        movable = [c for c in group if c.drawn is None]
        if not movable:
            continue
        scores = _fine_scores(_fine_blocks(scanner, size, [(c.map_key, c.row, c.col) for c in movable], pad), fine,
                              ranking.inked_only)  # B, A, offsets
        z = (scores - mean[None, :, None]) / std[None, :, None]
        for c, row in zip(movable, z):  # row: angles x offsets
            value, flat = row.flatten().max(0)
            angle, at = divmod(int(flat), row.shape[1])
            c.fine = float(value)
            c.angle = templates.angles[angle]
            c.row += at // width - pad
            c.col += at % width - pad
