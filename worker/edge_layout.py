"""Edge-layout descriptors: which way the lines run, and where, in a line drawing.

A sketch of a place keeps the place's layout: a shoreline drawn across the upper third runs
across the upper third of the tile. Histograms of oriented gradients (HOG, scikit-image) of the
sketch and of the tile's own line drawing compare exactly that. Measured on held-out scenes
(docs/benchmarks/quality.md), this finds places from sketches far better than the DINOv2 tokens
alone, so ranking leans on it and the token re-rank is blended in (see worker.search).

Two granularities, both from the same drawing:
  COARSE  32 px cells, 2x2-cell blocks: 1296 values, fp16; scanned for every tile (the shortlist)
  FINE    16 px cells, 2x2-cell blocks: 6084 values, stored as uint8; scores the shortlist
Cells are defined at 224 px; drawings of another size are resized to 224 first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from skimage.feature import hog

LAYOUT_SIZE = 224


@dataclass(frozen=True)
class LayoutSpec:
    cell: int  # pixels per cell at LAYOUT_SIZE
    block: int = 2  # cells per block side (L2-Hys normalised per block)
    orientations: int = 9

    @property
    def dim(self) -> int:
        blocks = LAYOUT_SIZE // self.cell - self.block + 1
        return blocks * blocks * self.block * self.block * self.orientations

    def to_json(self) -> dict:
        return asdict(self)


COARSE = LayoutSpec(cell=32)
FINE = LayoutSpec(cell=16)
FINE_QUANT = 255.0  # block-normalised HOG values lie in [0, 1]: uint8 steps of 1/255


def _ink(drawing: np.ndarray) -> np.ndarray:
    """(S, S) drawing, dark ink on white, uint8 or float in [0, 1] -> ink strength in [0, 1] at LAYOUT_SIZE."""
    gray = np.asarray(drawing, np.float32)
    if drawing.dtype == np.uint8:
        gray = gray / 255.0
    if gray.shape != (LAYOUT_SIZE, LAYOUT_SIZE):
        gray = np.asarray(Image.fromarray(gray).resize((LAYOUT_SIZE, LAYOUT_SIZE), Image.Resampling.BILINEAR))
    return 1.0 - gray


def block_hog(drawing: np.ndarray, spec: LayoutSpec) -> np.ndarray:
    """Block-normalised HOG (spec.dim,) float32 of a drawing; values in [0, 1]."""
    return hog(_ink(drawing), orientations=spec.orientations, pixels_per_cell=(spec.cell, spec.cell),
               cells_per_block=(spec.block, spec.block), block_norm="L2-Hys", feature_vector=True).astype(np.float32)


def unit(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    v = np.asarray(v, np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


@dataclass
class Layouts:
    coarse: np.ndarray  # (B, COARSE.dim) fp16, unit rows
    fine: np.ndarray  # (B, FINE.dim) uint8, block HOG * FINE_QUANT


def describe(drawing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One drawing (dark ink on white) -> (unit coarse, fine) float32: a query's form."""
    return unit(block_hog(drawing, COARSE)), block_hog(drawing, FINE)


def describe_drawings(drawings: np.ndarray) -> Layouts:
    """(B, S, S) drawings (dark ink on white) -> both descriptors, in their stored form."""
    coarse, fine = zip(*(describe(d) for d in drawings))
    return Layouts(coarse=np.stack(coarse).astype(np.float16),
                   fine=np.round(np.stack(fine) * FINE_QUANT).astype(np.uint8))


def fine_similarity(sketch_fine: np.ndarray, tiles_fine: np.ndarray) -> np.ndarray:
    """Cosine of the sketch's fine descriptor (float) with stored uint8 tile descriptors (n, FINE.dim)."""
    tiles = np.asarray(tiles_fine, np.float32)
    return unit(tiles) @ unit(sketch_fine)


def fingerprint() -> dict:
    """What decides the stored descriptors (part of the index's tile-encoder fingerprint)."""
    return {"size": LAYOUT_SIZE, "coarse": COARSE.to_json(), "fine": FINE.to_json(), "fine_quant": FINE_QUANT}
