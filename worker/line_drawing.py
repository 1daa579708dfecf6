"""Line drawings of imagery: how a tile is put into the sketch domain.

Zero-shot DINOv2 features do not bridge sketches and imagery (measured: 0 of 12 pseudo-sketch
queries in the top 5 of 189 Sentinel-2 tiles against RGB tiles). Drawing each tile as thin
dark edges on white first, and matching the sketch against that drawing, gave 5 of 12.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage
from skimage.feature import canny
from skimage.morphology import skeletonize

TILE_EDGE_SIGMA = 3.0  # at 224 px: coarse structure (shorelines, roads, field edges), not texture
EDGE_QUANTILES = (0.6, 0.9)  # Canny's low/high thresholds as quantiles of the gradient magnitude
# Quantile thresholds always draw a tenth of the pixels, so open water drew its sun glint as
# lines in every direction, and those tiles matched every sketch a little (65% of the top-5 hits
# of land places were water tiles). No edge is drawn where the grey level's gradient, smoothed
# at this scale (px at 224 px), stays under the floor (grey fraction per px): nothing a person
# would draw. Chosen on the training scene (docs/benchmarks/contrast_floor.md).
CONTRAST_SIGMA = 3.0
CONTRAST_FLOOR = 0.01


def edge_map(tile: np.ndarray, sigma: float, valid: np.ndarray | None = None,
             floor: float = CONTRAST_FLOOR) -> np.ndarray:
    """Boolean one-pixel edges of an RGB uint8 tile; quantile thresholds keep the drawing
    density comparable between bright and dull scenes, and the contrast floor keeps featureless
    surfaces blank. Smoothing ignores nodata pixels (`valid` False) and no edge is drawn where
    the data ends."""
    gray = _grey(tile)
    if valid is not None and valid.all():
        valid = None
    low, high = EDGE_QUANTILES
    edges = canny(gray, sigma=sigma, low_threshold=low, high_threshold=high, use_quantiles=True, mask=valid)
    if floor > 0:
        edges &= _contrast_above(gray, floor)
    return skeletonize(edges)


def visible_structure(tile: np.ndarray, floor: float = CONTRAST_FLOOR) -> np.ndarray:
    """Where an RGB uint8 tile has contrast enough for a line (bool (S, S)); all True at floor 0."""
    if floor <= 0:
        return np.ones(tile.shape[:2], bool)
    return _contrast_above(_grey(tile), floor)


def _grey(tile: np.ndarray) -> np.ndarray:
    return tile.astype(np.float32).mean(-1) / 255.0


def _contrast_above(gray: np.ndarray, floor: float) -> np.ndarray:
    return ndimage.gaussian_gradient_magnitude(gray, CONTRAST_SIGMA * gray.shape[0] / 224) >= floor


def draw_edges(edges: np.ndarray, size: int, width: int = 2) -> Image.Image:
    """Dark strokes on white at `size` px from a boolean edge map."""
    img = Image.fromarray(np.where(edges, 0, 255).astype(np.uint8))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    if width > 1:
        img = img.filter(ImageFilter.MinFilter(width + 1 - width % 2))
    return img


def tile_line_drawings(tiles: np.ndarray, valid: np.ndarray | None = None, sigma: float = TILE_EDGE_SIGMA,
                       floor: float = CONTRAST_FLOOR) -> np.ndarray:
    """(B, S, S, 3) uint8 tiles and their (B, S, S) valid-pixel masks -> (B, S, S, 3) uint8 line drawings."""
    size = tiles.shape[1]
    out = np.empty_like(tiles)
    for i, tile in enumerate(tiles):
        mask = None if valid is None else valid[i]
        out[i] = np.asarray(draw_edges(edge_map(tile, sigma * size / 224, mask, floor), size))[..., None]
    return out


def fingerprint() -> dict:
    """What decides tile drawings (part of the index's tile-encoder fingerprint)."""
    return {"sigma": TILE_EDGE_SIGMA, "thresholds": EDGE_QUANTILES, "nodata": "masked",
            "contrast_floor": (CONTRAST_SIGMA, CONTRAST_FLOOR)}
