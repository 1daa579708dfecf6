"""Line drawings of imagery: how a tile is put into the sketch domain.

Zero-shot DINOv2 features do not bridge sketches and imagery (measured: 0 of 12 pseudo-sketch
queries in the top 5 of 189 Sentinel-2 tiles against RGB tiles). Drawing each tile as thin
dark edges on white first, and matching the sketch against that drawing, gave 5 of 12.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter
from skimage.feature import canny
from skimage.morphology import skeletonize

TILE_EDGE_SIGMA = 3.0  # at 224 px: coarse structure (shorelines, roads, field edges), not texture
EDGE_QUANTILES = (0.6, 0.9)  # Canny's low/high thresholds as quantiles of the gradient magnitude


def edge_map(tile: np.ndarray, sigma: float, valid: np.ndarray | None = None) -> np.ndarray:
    """Boolean one-pixel edges of an RGB uint8 tile; quantile thresholds keep the drawing
    density comparable between bright and dull scenes. Smoothing ignores nodata pixels (`valid`
    False) and no edge is drawn where the data ends."""
    gray = tile.astype(np.float32).mean(-1) / 255.0
    if valid is not None and valid.all():
        valid = None
    low, high = EDGE_QUANTILES
    return skeletonize(canny(gray, sigma=sigma, low_threshold=low, high_threshold=high, use_quantiles=True, mask=valid))


def draw_edges(edges: np.ndarray, size: int, width: int = 2) -> Image.Image:
    """Dark strokes on white at `size` px from a boolean edge map."""
    img = Image.fromarray(np.where(edges, 0, 255).astype(np.uint8))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    if width > 1:
        img = img.filter(ImageFilter.MinFilter(width + 1 - width % 2))
    return img


def tile_line_drawings(tiles: np.ndarray, valid: np.ndarray | None = None, sigma: float = TILE_EDGE_SIGMA) -> np.ndarray:
    """(B, S, S, 3) uint8 tiles and their (B, S, S) valid-pixel masks -> (B, S, S, 3) uint8 line drawings."""
    size = tiles.shape[1]
    out = np.empty_like(tiles)
    for i, tile in enumerate(tiles):
        mask = None if valid is None else valid[i]
        out[i] = np.asarray(draw_edges(edge_map(tile, sigma * size / 224, mask), size))[..., None]
    return out


def fingerprint() -> dict:
    """What decides tile drawings (part of the index's tile-encoder fingerprint)."""
    return {"sigma": TILE_EDGE_SIGMA, "thresholds": EDGE_QUANTILES, "nodata": "masked"}
