"""Training pairs cut from real rasters: each place's line drawing and pseudo-sketches of it.

A pair set holds no model output, only images, so it is built once on any machine (it needs
rasterio and the rasters) and trained on anywhere (a GPU machine needs only the file). Tiles are
kept as the line drawings the tile encoder sees; sketches as the greyscale images a user's
sketch becomes after preprocessing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from worker.errors import InputError
from worker.sketch import prepare_sketch

STYLES = ("canny", "simple", "wobbly")  # each drawn with a person's errors (augment)
MIN_VALID = 0.9  # share of a window that must hold data
# Sketch images keep 4 grey levels: the anti-aliased edge of a line stays, and a pair set of a
# few thousand sketches stays small enough to carry to a GPU machine (2.3 KB per sketch
# compressed, against 8.4 KB at 256 levels).
SKETCH_GREY_STEP = 85


@dataclass
class PairSet:
    """Per place its tile's line drawing (P, S, S) uint8; per sketch its image (N, S, S) uint8
    (dark lines on white, as preprocessed) and its place (N,)."""

    drawings: np.ndarray
    sketches: np.ndarray
    place: np.ndarray

    def save(self, path: Path) -> None:
        """Written whole or not at all (a temporary file renamed into place)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, drawings=self.drawings, sketches=self.sketches, place=self.place)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "PairSet":
        with np.load(path) as f:
            return cls(f["drawings"], f["sketches"], f["place"])


def random_windows(raster: Path, count: int, rng: np.random.Generator, sizes=(96, 128, 192, 256)) -> list:
    from worker.tiling import Tile, open_raster

    info = open_raster(raster, None)
    tiles = []
    for _ in range(count):
        size = int(min(rng.choice(sizes), info.width, info.height))
        col = int(rng.integers(0, info.width - size + 1))
        row = int(rng.integers(0, info.height - size + 1))
        tiles.append(Tile(info, col, row, size, size, 1))
    return tiles


def build_pairs(rasters: list[Path], windows_per_raster: int, sketches_per_window: int,
                hand_strokes: list[np.ndarray], seed: int, size: int = 224) -> PairSet:
    """Random windows of the rasters that hold data and something to draw, each drawn as the
    tile encoder draws it and sketched `sketches_per_window` times in rotating styles.
    Deterministic for a seed."""
    # imported here: rasterio and shapely are needed where pairs are built, not where they train
    from worker.line_drawing import tile_line_drawings
    from lab.pseudo_sketch import augment, has_lines, pseudo_sketch
    from worker.tiling import TileReader

    rng = np.random.default_rng(seed)
    drawings, sketches, places = [], [], []
    for raster in rasters:
        tiles = random_windows(raster, windows_per_raster, rng)
        with TileReader(tiles[0].raster, size) as reader:
            for tile in tqdm(tiles, desc=f"pairs {raster.name}", unit="window"):
                image, valid = reader.read(tile)
                if valid.mean() < MIN_VALID or not has_lines(image, valid):
                    continue
                place = len(drawings)
                drawings.append(tile_line_drawings(image[None], valid[None])[0, ..., 0])
                for k in range(sketches_per_window):
                    style = STYLES[(place + k) % len(STYLES)]
                    clean = pseudo_sketch(image, style, size, rng=rng, hand_strokes=hand_strokes, valid=valid)
                    try:
                        sketch = prepare_sketch(augment(clean, rng), size)
                    except InputError:  # the errors erased every line of a sparse place
                        try:
                            sketch = prepare_sketch(clean, size)
                        except InputError:  # too small a mark to search at all (worker.sketch)
                            continue
                    grey = np.round(sketch[0].numpy() * 255 / SKETCH_GREY_STEP) * SKETCH_GREY_STEP
                    sketches.append(grey.astype(np.uint8))
                    places.append(place)
    return PairSet(np.stack(drawings), np.stack(sketches), np.array(places, np.int64))
