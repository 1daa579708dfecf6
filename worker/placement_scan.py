"""The dense scans of a search: the sketch's templates slid over every level map.

A coarse scan at 16 px steps everywhere gives local peaks; a fine scan at 8 px steps around each
peak places it. Each template's scores are calibrated as z-values against its own background,
since a small or turned template matches by chance more easily than a large upright one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from worker import edge_cells, query_templates
from worker.candidates import Candidate
from worker.edge_cells import CELL, COARSE, FINE
from worker.ranking import RankingConfig
from worker.store import TileIndex

COARSE_STEP = 2  # coarse scan every 2 stored cells (16 level px)


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


def _fine_scores(scanner: Scanner, templates: torch.Tensor, size: int, spots: list[tuple[tuple[int, int], int, int]],
                 pad: int, inked_only: bool) -> torch.Tensor:
    """Fine cosines of T templates (T, n, n, dim) at every offset within `pad` stored cells of
    each spot (map key, row, col): (B, T, (2 pad + 1)^2)."""
    span = size // CELL + 2 * pad
    ramp = torch.arange(span)
    regions = []
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, (key, _, _) in enumerate(spots):
        by_key.setdefault(key, []).append(i)
    out = [None] * len(spots)
    for key, idx in by_key.items():  # one gather per level map
        cells = scanner.padded_cells(key)
        rows = torch.tensor([spots[i][1] - pad + Scanner.PAD for i in idx]).clamp(0, cells.shape[0] - span)
        cols = torch.tensor([spots[i][2] - pad + Scanner.PAD for i in idx]).clamp(0, cells.shape[1] - span)
        gathered = cells[(rows[:, None] + ramp)[:, :, None], (cols[:, None] + ramp)[:, None, :]]  # B, span, span, O
        for j, i in enumerate(idx):
            out[i] = gathered[j]
    regions = torch.stack(out)
    blocks = edge_cells.block_map(regions, FINE)
    return edge_cells.cosine_map(blocks, templates, FINE, inked_only=inked_only).flatten(2)


BACKGROUND_SPOTS = 96  # random windows per template size that calibrate the fine scores


def refine(scanner: Scanner, templates: query_templates.Templates, ranking: RankingConfig,
           candidates: list[Candidate], keys: list[tuple[int, int]]) -> None:
    """The fine HOG score of each candidate at the best 8 px offset within `fine_radius` cells,
    calibrated per template against random windows of the index searched the same way."""
    pad = ranking.fine_radius
    width = 2 * pad + 1
    rng = np.random.default_rng(0)
    areas = np.array([scanner.cells(k).shape[0] * scanner.cells(k).shape[1] for k in keys], np.float64)
    for size in templates.sizes:
        group = [c for c in candidates if c.size == size]
        if not group:
            continue
        fine = templates.fine[size]  # A angles
        scores = _fine_scores(scanner, fine, size, [(c.map_key, c.row, c.col) for c in group], pad,
                              ranking.inked_only)  # B, A, offsets
        mean = torch.zeros(len(templates.angles))
        std = torch.ones(len(templates.angles))
        if ranking.calibrate:
            spots = []
            for k in rng.choice(len(keys), BACKGROUND_SPOTS, p=areas / areas.sum()):
                rows, cols = scanner.cells(keys[k]).shape[:2]
                spots.append((keys[k], int(rng.integers(0, max(1, rows - size // CELL))),
                              int(rng.integers(0, max(1, cols - size // CELL)))))
            background = _fine_scores(scanner, fine, size, spots, pad, ranking.inked_only).amax(2)  # S, A
            mean, std = background.mean(0), background.std(0).clamp(min=1e-6)
        z = (scores - mean[None, :, None]) / std[None, :, None]
        for c, row in zip(group, z):
            angle = templates.angles.index(c.angle)
            value, at = row[angle].max(0)
            c.fine = float(value)
            c.row += int(at) // width - pad
            c.col += int(at) % width - pad
