"""A sketch as the templates a search slides over the level maps: a few sizes, a few turns.

A user draws a place a bit larger or smaller than a tile and seldom quite north-up. Each
template is the sketch turned by one of `angles` (undoing a frame turned that way) and drawn at
one of `sizes` level pixels; with the index's scales an octave apart, sizes 160, 192, 224 and
256 give windows at most 1.25x apart (160, 192, 224, 256, 320, ... raster pixels at tile 224),
so a frame 0.6-1.6x a tile is never more than about 12% off a template's size. Templates are
the same HOG blocks as the maps' (worker.edge_cells), computed by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from worker import edge_cells
from worker.edge_cells import COARSE, FINE
from worker.sketch import compared_lines


@dataclass
class Templates:
    """Per size: coarse (A, n, n, dim) and fine (A, m, m, dim) blocks for the A angles."""

    sizes: tuple[int, ...]
    angles: tuple[float, ...]
    coarse: dict[int, torch.Tensor]
    fine: dict[int, torch.Tensor]
    drawings: dict[tuple[int, float], np.ndarray]  # (size, angle) -> the turned, resized sketch (uint8)


def turned(sketch: Image.Image, angle: float, size: int) -> np.ndarray:
    """The sketch turned counterclockwise by `angle` degrees (white where the turn leaves the
    frame) and drawn at `size` px: (size, size) uint8, dark lines on white."""
    img = sketch if angle == 0 else sketch.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=255)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, np.uint8)


def build(sketch_tensor: torch.Tensor, sizes: tuple[int, ...], angles: tuple[float, ...],
          device: torch.device | str = "cpu") -> Templates:
    """Templates of a preprocessed sketch (3, S, S) in [0, 1] (worker.sketch.load_sketch)."""
    for size in sizes:
        if size % COARSE.cell:
            raise ValueError(f"template size {size} is not a multiple of {COARSE.cell}")
    grey = Image.fromarray(compared_lines(sketch_tensor))
    coarse, fine, drawings = {}, {}, {}
    for size in sizes:
        stack = np.stack([turned(grey, a, size) for a in angles])
        for a, d in zip(angles, stack):
            drawings[(size, a)] = d
        cells = edge_cells.cell_histograms(torch.from_numpy(stack).to(device))
        coarse[size] = edge_cells.window_hog(cells, COARSE)
        fine[size] = edge_cells.window_hog(cells, FINE)
    return Templates(tuple(sizes), tuple(angles), coarse, fine, drawings)
