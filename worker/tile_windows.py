"""The index's own tile windows under the shortlist, as placements scored by their own drawings.

The level maps join each cell from the tile it is most central in, so a window exactly on a tile
does not see that tile's own drawing at its margins. For a sparse or abstract sketch (a few
strokes, region outlines, a partial drawing) of such a window, that margin decides: on 36
held-out aligned queries made as the quality benchmark makes them (HED, partial, strokes and
regions; seed 0, 3 a scene), the tiles' own stored cells ranked the true tile in the top 5 for
34, where the map's fine score ranked its placement first for 12. So the tiles under the coarse
shortlist are scored by their own cells, and the best few join the candidates, with the HOG
cosine of their own drawing known without reading the raster (worker.verify). On the benchmark,
aligned recall@5 went 0.66 -> 0.77 (docs/benchmarks/quality.md).
"""

from __future__ import annotations

import numpy as np
import torch

from worker import edge_cells, query_templates
from worker.candidates import Candidate
from worker.edge_cells import CELL, FINE
from worker.placement_scan import WINDOW_CELLS as TILE_CELLS  # a tile's 224 level px in stored cells
from worker.store import TileIndex
from worker.verify import drawing_cosine

MIN_OVERLAP = 0.25  # a tile is under a candidate when their windows overlap by this IoU
# A whole tile holds TILE_CELLS whole cells a side, or one fewer when it does not start on its
# level's cell grid (the last tile of a row or column, moved in to end at the raster's edge):
# its cells then start up to 7 level px inside it, and its last row or column is blank.
WHOLE_CELLS = TILE_CELLS - 1
PAIRS_AT_ONCE = 1 << 20  # candidate-tile pairs compared in one go: a raster of a continent in one
# map puts thousands of tiles in each candidate's band: 800 candidates' pairs at once would take
# hundreds of megabytes


def tiles_under(index: TileIndex, candidates: list[Candidate], pairs_at_once: int = PAIRS_AT_ONCE) -> dict[int, float]:
    """Index rows of whole, grid-aligned tiles whose window overlaps a candidate's by IoU >=
    MIN_OVERLAP, each with the best coarse score of the candidates over it."""
    found: dict[int, float] = {}
    by_map: dict[tuple[int, int], list[Candidate]] = {}
    for c in candidates:
        by_map.setdefault(c.map_key, []).append(c)
    for key, group in by_map.items():
        rows = index.rows_of_map(*key)
        rec = index.records[rows]
        whole = (rec["cell_rows"] >= WHOLE_CELLS) & (rec["cell_cols"] >= WHOLE_CELLS)
        rows, rec = rows[whole], rec[whole]
        if not len(rows):
            continue
        r0, c0 = rec["cell_row"].astype(np.float64), rec["cell_col"].astype(np.float64)
        top = np.array([c.row for c in group], np.float64)
        left = np.array([c.col for c in group], np.float64)
        side = np.array([c.size / CELL for c in group])
        coarse = np.array([c.coarse for c in group])
        # only tiles whose rows meet a candidate's: a band of the map's tiles (by first cell row),
        # each pair once
        first = np.searchsorted(r0, top - TILE_CELLS, "right")
        count = np.clip(np.searchsorted(r0, top + side, "left") - first, 0, None)
        best = np.full(len(rows), -np.inf)
        for part in _at_most_pairs(count, pairs_at_once):
            which = np.repeat(part, count[part])
            tile = np.arange(len(which)) - np.repeat(np.cumsum(count[part]) - count[part], count[part]) + first[which]
            dr = np.clip(np.minimum(r0[tile] + TILE_CELLS, top[which] + side[which]) - np.maximum(r0[tile], top[which]), 0, None)
            dc = np.clip(np.minimum(c0[tile] + TILE_CELLS, left[which] + side[which]) - np.maximum(c0[tile], left[which]), 0, None)
            inter = dr * dc
            under = inter / (TILE_CELLS ** 2 + side[which] ** 2 - inter) >= MIN_OVERLAP
            np.maximum.at(best, tile[under], coarse[which[under]])
        for i in np.nonzero(best > -np.inf)[0]:
            found[int(rows[i])] = float(best[i])
    return found


def _at_most_pairs(count: np.ndarray, limit: int) -> list[np.ndarray]:
    """Candidate indices in runs whose pairs (`count` each) add up to at most `limit` (a run of
    one may exceed it)."""
    runs, start, total = [], 0, 0
    for i, n in enumerate(count.tolist()):
        if total + n > limit and i > start:
            runs.append(np.arange(start, i))
            start, total = i, 0
        total += n
    runs.append(np.arange(start, len(count)))
    return runs


def tile_window_candidates(index: TileIndex, templates: query_templates.Templates, candidates: list[Candidate],
                           sketch_descriptor: torch.Tensor, count: int, inked_only: bool) -> list[Candidate]:
    """The `count` tiles under the candidates whose own drawing best matches the upright template
    of a tile's size, as candidates of their own: coarse score from the candidates over them,
    `fine` their own drawing's fine cosine with that template (worker.placement_scan.refine
    calibrates it), `drawn` the HOG cosine of their own drawing with the sketch
    (`sketch_descriptor`, unit), as worker.verify compares a drawn placement."""
    size = TILE_CELLS * CELL
    if count <= 0 or size not in templates.sizes or 0.0 not in templates.angles:
        return []
    under = tiles_under(index, candidates)
    if not under:
        return []
    rows = np.fromiter(under, np.int64)
    cells = edge_cells.dequantise(index.cells_of(rows))[:, :TILE_CELLS, :TILE_CELLS]
    hogs = edge_cells.window_hog(cells, FINE)  # each tile's window: (B, n, n, dim)
    # on the CPU, beside the stored cells and the sketch's descriptor: a few hundred tiles at most
    upright = templates.fine[size][templates.angles.index(0.0)][None].cpu()
    scores = edge_cells.cosine_map(hogs.permute(0, 3, 1, 2), upright, FINE, step=FINE.span,
                                   inked_only=inked_only).flatten()
    best = torch.argsort(scores, descending=True)[:count].numpy()
    drawn = drawing_cosine(hogs[best].flatten(1), sketch_descriptor, inked_only).numpy()
    out = []
    for i, value in zip(best, drawn):
        rec = index.records[rows[i]]
        out.append(Candidate((int(rec["raster_id"]), int(rec["scale"])), size, 0.0, int(rec["cell_row"]),
                             int(rec["cell_col"]), under[int(rows[i])], fine=float(scores[i]), drawn=float(value)))
    return out
