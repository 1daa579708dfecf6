"""Oriented-edge cells of line drawings, and their HOG blocks at every placement.

Which way the lines run, and where: a sketch of a place keeps the place's layout, so a sketch is
compared with a tile's line drawing by histograms of oriented gradients (HOG). To find the place
wherever the sketch lies, the comparison is made at every 8 px offset: every tile stores the
gradient histograms of its drawing's 8 px cells (on a grid shared by all tiles of one raster and
scale, so their cells join into one map per raster and scale, worker.level_maps), and the HOG
blocks of any window are sums of those cells, normalised block by block (L2-Hys, as Dalal and
Triggs, and scikit-image's `hog`). Two granularities, both from the same cells:
  COARSE  32 px cells, blocks of 2x2 cells, at 16 px steps: scanned everywhere (the shortlist)
  FINE    16 px cells, blocks of 2x2 cells, at 8 px steps: scores the shortlist's neighbourhoods
A window's descriptor is its blocks on a grid of one cell, so scoring a template at every offset
is a dilated convolution of the block map with the template (torch; on the GPU when there is one).
Sizes are in pixels of the model's 224 px drawings ("level pixels").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from worker import gaussian

CELL = 8  # level pixels per stored cell
ORIENTATIONS = 9  # unsigned, 20 degrees each
CELL_QUANT = 255.0  # stored as uint8 of sqrt(value): fine steps where edges are faint
L2HYS_CLIP = 0.2
EPS = 1e-5

# Both sides of every comparison, the sketch and the tiles' and places' drawings, are compared
# smoothed a little, their faint tails cut (each HOG block is normalised, so a block holding only a
# tail would count as much as one with a line). Sigma in px at 224 px. Why both: a drawing's binary
# lines vote, through their gradients, in 4 of the 9 orientations only (0, 45, 90 and 135 degrees),
# so a line at 60 degrees in a sketch met nothing in a tile's cells; smoothed, a line votes in the
# orientations it runs in. On 750 held-out queries (docs/benchmarks/quality.md) smoothing the
# sketch alone took recall@1/5/10 from 0.641/0.735/0.785 to 0.667/0.748/0.800 (seed 2), and both
# sides to 0.736/0.797/0.839; few-strokes sketches gained most (recall@5 0.73 -> 0.86). Sigma was
# chosen with the sketch alone smoothed (0.7, 1.5 and 3 did worse); with both sides, 0.7 and 1.5
# came within a few queries of 1 (seed 2: recall@5 0.791 and 0.785 against 0.797).
LINE_SMOOTHING_SIGMA = 1.0
SMOOTHING_CUT = 0.15  # ink share under which a smoothed pixel is left white


@dataclass(frozen=True)
class BlockSpec:
    """HOG blocks of `block` x `block` cells of `cell` level pixels (a multiple of CELL)."""

    cell: int
    block: int = 2

    @property
    def span(self) -> int:
        """Stored cells per HOG cell."""
        return self.cell // CELL

    @property
    def dim(self) -> int:
        return self.block * self.block * ORIENTATIONS

    def blocks_per_side(self, side: int) -> int:
        """HOG blocks along a window of `side` level pixels (a multiple of the cell)."""
        return side // self.cell - self.block + 1


COARSE = BlockSpec(cell=32)
FINE = BlockSpec(cell=16)


def ink(drawings: torch.Tensor) -> torch.Tensor:
    """(B, S, S) drawings, dark lines on white (uint8, or float in [0, 1]) -> ink in [0, 1]."""
    x = drawings.float()
    if drawings.dtype == torch.uint8:
        x = x / 255.0
    return 1.0 - x


def compared_drawings(drawings: torch.Tensor) -> torch.Tensor:
    """(B, S, S) uint8 line drawings, dark on white -> the drawings a search compares: lines smoothed
    by LINE_SMOOTHING_SIGMA and white where less than SMOOTHING_CUT of ink remains, (B, S, S) uint8
    on the drawings' device (worker.gaussian: scipy's filter, a batch at once; on a GPU, not CPU
    work in the process that feeds it)."""
    pixels = drawings.float()
    smooth = gaussian.filtered(pixels, LINE_SMOOTHING_SIGMA * pixels.shape[-1] / 224)
    smooth[smooth > 255 * (1 - SMOOTHING_CUT)] = 255
    return smooth.clamp(0, 255).round().to(torch.uint8)


def cell_histograms(drawings: torch.Tensor, phase: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """(B, S, S) drawings -> (B, R, C, ORIENTATIONS) float: per 8 px cell, the mean gradient
    magnitude of the ink in each orientation (scikit-image's HOG cell stage: central differences,
    unsigned orientation, one bin per pixel). Cells start at pixel `phase` (row, col), so that a
    tile's cells fall on its raster's shared cell grid."""
    x = ink(drawings)
    g_row, g_col = torch.zeros_like(x), torch.zeros_like(x)
    g_row[:, 1:-1] = x[:, 2:] - x[:, :-2]
    g_col[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    magnitude = torch.hypot(g_row, g_col)
    angle = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0
    bins = (angle / (180.0 / ORIENTATIONS)).long().clamp(0, ORIENTATIONS - 1)
    r0, c0 = phase
    rows, cols = (x.shape[1] - r0) // CELL, (x.shape[2] - c0) // CELL
    magnitude = magnitude[:, r0:r0 + rows * CELL, c0:c0 + cols * CELL]
    bins = bins[:, r0:r0 + rows * CELL, c0:c0 + cols * CELL]
    # one weighted bincount over (image, cell row, cell col, bin): no per-bin image in memory
    b = x.shape[0]
    cell_r = torch.arange(rows * CELL, device=x.device) // CELL
    cell_c = torch.arange(cols * CELL, device=x.device) // CELL
    cell = (cell_r[:, None] * cols + cell_c[None, :])[None]  # 1, H, W
    image = torch.arange(b, device=x.device)[:, None, None] * (rows * cols)
    index = ((image + cell) * ORIENTATIONS + bins).flatten()
    sums = torch.bincount(index, weights=magnitude.flatten().double(), minlength=b * rows * cols * ORIENTATIONS)
    return (sums / (CELL * CELL)).float().view(b, rows, cols, ORIENTATIONS)


def quantise(cells: torch.Tensor) -> np.ndarray:
    """Cell histograms as stored: uint8 of sqrt(value) (values lie in [0, 1])."""
    return (cells.clamp(0, 1).sqrt() * CELL_QUANT).round().to(torch.uint8).cpu().numpy()


def dequantise(stored: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stored cells as float cell histograms. In place on one new tensor: a search dequantises
    the neighbourhoods of 256 windows at once (7M values), and two more temporaries of that size
    made it 18 ms of a query's 450 (profiled on the demo index)."""
    q = torch.as_tensor(np.asarray(stored), device=device).to(torch.float32, copy=True)
    q.div_(CELL_QUANT)
    return q.mul_(q)


def block_map(cells: torch.Tensor, spec: BlockSpec, step: int = 1) -> torch.Tensor:
    """(R, C, O) cells (or a batch (B, R, C, O)) -> L2-Hys normalised blocks at every `step`-th
    cell offset: (B, spec.dim, R', C'). `step` divides spec.span; a window's blocks then lie
    spec.span // step apart in the map (the dilation of `cosine_map`)."""
    if cells.dim() == 3:
        cells = cells[None]
    if spec.span % step:
        raise ValueError(f"step {step} does not divide the {spec.span}-cell span of {spec}")
    x = cells.permute(0, 3, 1, 2)  # B, O, R, C
    k, gap = spec.span, spec.span // step
    hog_cells = F.avg_pool2d(x, k, stride=step) if k > 1 else x  # HOG cells at every step
    rows, cols = block_positions(x.shape[2], spec, step), block_positions(x.shape[3], spec, step)
    if rows <= 0 or cols <= 0:
        return x.new_zeros(x.shape[0], spec.dim, max(rows, 0), max(cols, 0))
    parts = [hog_cells[:, :, i * gap:i * gap + rows, j * gap:j * gap + cols]
             for i in range(spec.block) for j in range(spec.block)]
    blocks = torch.cat(parts, 1)  # B, dim, rows, cols (a new tensor: normalised in place)
    blocks.div_(_norms(blocks))
    blocks.clamp_(max=L2HYS_CLIP)
    return blocks.div_(_norms(blocks))


def block_positions(cells: int, spec: BlockSpec, step: int = 1) -> int:
    """Block positions along `cells` stored cells in a block map made with `step` (block_map);
    0 or less: none."""
    hog_cells = (cells - spec.span) // step + 1 if spec.span > 1 else cells
    return hog_cells - spec.span // step * (spec.block - 1)


def _norms(blocks: torch.Tensor) -> torch.Tensor:
    """Each block's L2 norm, softened by EPS: (B, 1, R, C)."""
    return _squared_norms(blocks).add_(EPS ** 2).sqrt_()


def _squared_norms(blocks: torch.Tensor) -> torch.Tensor:
    """Each block's squared L2 norm (B, 1, R, C), without a squared copy of the blocks
    ((blocks ** 2).sum made two a block map, a quarter of its time)."""
    return torch.linalg.vector_norm(blocks, dim=1, keepdim=True).square_()


def window_descriptor(blocks: torch.Tensor, spec: BlockSpec, row: int = 0, col: int = 0, side: int = 224,
                      step: int = 1) -> torch.Tensor:
    """The HOG descriptor of the window of `side` level px at map position (row, col) of a block
    map (B, dim, R', C') made with `step`: (B, n, n, dim), blocks on a grid of one HOG cell."""
    n = spec.blocks_per_side(side)
    gap = spec.span // step
    picked = blocks[:, :, row:row + (n - 1) * gap + 1:gap, col:col + (n - 1) * gap + 1:gap]
    return picked.permute(0, 2, 3, 1)


def window_hog(cells: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
    """The HOG blocks of whole windows from their cells ((B, R, C, O), the window's top-left
    cell first): (B, n, n, dim), scikit-image's `hog` of each. Made at one HOG cell's step, the
    only offsets a whole window reads: a block map at every stored cell's offset (block_map's
    default) computed spec.span squared times the blocks (4 for FINE, 16 for COARSE) and kept
    one of each."""
    if cells.dim() == 3:
        cells = cells[None]
    if cells.shape[1] != cells.shape[2]:
        raise ValueError(f"whole windows are square, not {cells.shape[1]}x{cells.shape[2]} cells")
    blocks = block_map(cells, spec, step=spec.span)
    return window_descriptor(blocks, spec, side=cells.shape[1] * CELL, step=spec.span)


def describe(drawings: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
    """Whole-drawing HOG descriptors (B, n * n * dim), unit length (all-zero stays zero)."""
    return F.normalize(window_hog(cell_histograms(drawings), spec).flatten(1), dim=1)


def fits(blocks: torch.Tensor, side: int, spec: BlockSpec, step: int = 1) -> bool:
    """Whether a template of `side` blocks a side fits in block maps (B, dim, R', C') made with
    `step` (a raster smaller than a template at some scale has no window of its size)."""
    return min(blocks.shape[2:]) >= (side - 1) * (spec.span // step) + 1


def cosine_map(blocks: torch.Tensor, templates: torch.Tensor, spec: BlockSpec, step: int = 1,
               inked_only: bool = False) -> torch.Tensor:
    """Cosine of T templates (T, n, n, dim) with the window at every position of B block maps
    (B, dim, R', C') made with `step`: (B, T, R'', C''). Blank windows score 0. `inked_only`
    measures the window only where the template has lines (what is not drawn is not compared)."""
    return cosine_maps(blocks, {0: templates}, spec, step, inked_only)[0]


def cosine_maps(blocks: torch.Tensor, templates: dict[int, torch.Tensor], spec: BlockSpec, step: int = 1,
                inked_only: bool = False) -> dict[int, torch.Tensor]:
    """cosine_map of several template sets of different sides at once: each key's (T, n, n, dim)
    -> (B, T, R'', C''). Each set must fit in the maps. The smaller templates are padded with
    zeros to the largest side and the maps to match, so one convolution makes every set's
    scores (the same numbers to float rounding: the padding only ever meets zeros). The four
    template sizes of a search: 46 -> 36 ms over 256 windows' neighbourhoods, 20 -> 9 ms over a
    map of 400x400 stored cells; torch's CPU convolution pays more per call than per multiply."""
    dilation = spec.span // step
    for t in templates.values():
        if t.shape[1] != t.shape[2]:
            raise ValueError(f"templates must be square, not {t.shape[1]}x{t.shape[2]} blocks")
        if not fits(blocks, t.shape[1], spec, step):
            raise ValueError(f"templates of {t.shape[1]} blocks a side do not fit in block maps of {tuple(blocks.shape[2:])}")
    side = max(t.shape[1] for t in templates.values())
    weights, wheres = [], []
    for t in templates.values():
        to_side = (0, side - t.shape[2], 0, side - t.shape[1])
        weight = F.pad(t.permute(0, 3, 1, 2), to_side)  # T, dim, side, side
        weights.append(weight)
        wheres.append((weight.norm(dim=1, keepdim=True) > 0).float() if inked_only
                      else F.pad(torch.ones_like(t[:, None, :, :, 0]), to_side))
    weight = torch.cat(weights).contiguous(memory_format=torch.channels_last)
    grow = (side - min(t.shape[1] for t in templates.values())) * dilation
    padded = F.pad(blocks, (0, grow, 0, grow)) if grow else blocks
    dots = F.conv2d(padded, weight, dilation=dilation)
    norms = F.conv2d(_squared_norms(padded), torch.cat(wheres), dilation=dilation).clamp_(min=0).sqrt_()
    t_norms = weight.flatten(1).norm(dim=1)[None, :, None, None]
    scores = dots.div_(norms.mul_(t_norms).add_(1e-6))
    out, first = {}, 0
    for key, t in templates.items():
        rows = blocks.shape[2] - (t.shape[1] - 1) * dilation
        cols = blocks.shape[3] - (t.shape[2] - 1) * dilation
        out[key] = scores[:, first:first + t.shape[0], :rows, :cols]
        first += t.shape[0]
    return out


def fingerprint() -> dict:
    """What decides the stored cells (part of an index's tile-encoder fingerprint)."""
    return {"cell": CELL, "orientations": ORIENTATIONS, "quant": "sqrt-uint8", "gradient": "central",
            "smoothing": {"sigma": LINE_SMOOTHING_SIGMA, "cut": SMOOTHING_CUT}}
