"""What training the sketch modules changes, measured: the token score alone, ranking the tiles
of real rasters for pseudo-sketches of tiles (lab/train.py, lab/compare_sketch_modules.py).
The product's own quality, sketches anywhere in a raster, is lab/bench_quality.py's.

Scenes: the Sentinel-2 scene is the training scene (train.py samples its windows); the other
rasters (other sensors, resolutions and places) are held out, so their numbers are zero-shot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


from lab.pseudo_sketch import draw_outlines, has_lines, label_outlines, load_hand_strokes, pseudo_sketch
from lab.queries import SCENES, TRAIN_SCENES
from worker.assets import load_asset_paths
from worker.line_drawing import CONTRAST_FLOOR
from worker.sketch import prepare_sketch
from worker.tiling import Tile, TileReader, TileSettings, open_raster, plan_tiles

# hed: learned edges, a style train.py never sees; partial: a quarter of the place drawn
STYLES = ("canny", "simple", "wobbly", "sloppy", "hed", "partial")
OUTLINE_LABELS = {"lsat7": "lsat7_strata"}  # scenes with a land-cover label map on their grid
EVAL_TILE = 128  # window in raster pixels (read to the model's 224): more places per small raster


@dataclass
class Gallery:
    tiles: list[Tile]
    scene: np.ndarray  # scene name per tile
    images: np.ndarray  # (N, 224, 224, 3) uint8, nodata filled from the nearest valid pixel
    valid: np.ndarray  # (N, 224, 224) bool: which pixels hold data


def build_gallery(size: int = 224) -> Gallery:
    paths = load_asset_paths()
    tiles, scenes, images, masks = [], [], [], []
    for name, (key, _) in SCENES.items():
        info = open_raster(Path(paths[key]), None)
        planned = plan_tiles(info, TileSettings(tile=EVAL_TILE, overlap=0.25, scales=(1,)))
        with TileReader(info, size) as reader:
            for tile in planned:
                image, valid = reader.read(tile)
                if valid.mean() >= 0.5:
                    tiles.append(tile)
                    scenes.append(name)
                    images.append(image)
                    masks.append(valid)
    return Gallery(tiles, np.array(scenes), np.stack(images), np.stack(masks))


@dataclass
class Query:
    target: int  # gallery row of the true place
    scene: str
    style: str
    sketch: "torch.Tensor"  # noqa: F821 (3, 224, 224) preprocessed
    image: "PIL.Image.Image"  # noqa: F821


def make_queries(gallery: Gallery, per_scene: int, seed: int = 0, styles=STYLES, floor: float = CONTRAST_FLOOR,
                 sketchable_floor: float | None = None) -> list[Query]:
    """`per_scene` random places of each scene, each drawn in every style (fixed seed). Only
    places with something to draw are chosen (lab.pseudo_sketch.has_lines at
    `sketchable_floor`, by default the drawing's own contrast `floor`)."""
    from lab.hed import load_hed

    rng = np.random.default_rng(seed)
    paths = load_asset_paths()
    strokes = load_hand_strokes(Path(paths["lasa_dir"]))
    hed = load_hed(Path(paths["hed_weights"])) if "hed" in styles else None
    queries = []
    for scene in SCENES:
        rows = [r for r in np.nonzero(gallery.scene == scene)[0]
                if has_lines(gallery.images[r], gallery.valid[r], floor if sketchable_floor is None else sketchable_floor)]
        for row in rng.choice(rows, min(per_scene, len(rows)), replace=False):
            for style in styles:
                img = pseudo_sketch(gallery.images[row], style, rng=rng, hand_strokes=strokes, hed=hed,
                                   valid=gallery.valid[row], floor=floor)
                queries.append(Query(int(row), scene, style, prepare_sketch(img, 224), img))
    return queries


def outline_queries(gallery: Gallery, min_ink: float = 0.005) -> list[Query]:
    """Sketches drawn from land-cover labels: the outlines of the land-cover regions inside each
    tile of a scene that ships a label map (every such tile with enough outline to draw)."""
    import rasterio

    paths = load_asset_paths()
    queries = []
    for scene, key in OUTLINE_LABELS.items():
        rows = np.nonzero(gallery.scene == scene)[0]
        raster = gallery.tiles[rows[0]].raster
        with rasterio.open(paths[key]) as labels, rasterio.open(raster.path) as image:
            if labels.transform != image.transform or labels.shape != image.shape:
                raise ValueError(f"{paths[key]} is not on the grid of {raster.path}")
            lines = label_outlines(labels.read(1), image.read_masks(1) > 0)
        for row in rows:
            t = gallery.tiles[row]
            img = draw_outlines(lines, t.col_off, t.row_off, t.width, t.height, 224)
            if (np.asarray(img) < 128).mean() >= min_ink:
                queries.append(Query(int(row), scene, "outline", prepare_sketch(img, 224), img))
    return queries


@dataclass
class GalleryCodes:
    """The tokens an index stores of every gallery tile."""

    global_tokens: np.ndarray  # (N, D) fp32
    tokens: np.ndarray  # (N, K, D) fp16
    positions: np.ndarray  # (N, K) int16


def encode_gallery(model, gallery: Gallery, batch: int = 16) -> GalleryCodes:
    from worker.line_drawing import tile_line_drawings

    outs = [model.tile_tokens(tile_line_drawings(gallery.images[i:i + batch], gallery.valid[i:i + batch]))
            for i in range(0, len(gallery.images), batch)]
    cat = lambda get: np.concatenate([get(o) for o in outs])
    return GalleryCodes(cat(lambda o: o.global_token).astype(np.float32), cat(lambda o: o.tokens),
                        cat(lambda o: o.positions))


def token_ranks(model, codes: GalleryCodes, queries) -> list[int]:
    """Rank of each query's own tile by the cross-attention token score alone (what training
    of the sketch modules changes), over every gallery tile."""
    ranks = []
    for q in queries:
        scores = model.token_scores(model.encode_sketch(q.sketch), codes.tokens, codes.positions)
        ranks.append(rank_of(scores, q.target))
    return ranks


def metrics(ranks: list[int]) -> dict[str, float]:
    r = np.asarray(ranks, dtype=np.float64)
    if len(r) == 0:
        return {}
    return {"R@1": float((r <= 1).mean()), "R@5": float((r <= 5).mean()), "R@10": float((r <= 10).mean()),
            "mAP": float((1.0 / r).mean()), "mean rank": float(r.mean()), "n": int(len(r))}


def rank_of(scores: np.ndarray, target: int) -> int:
    """1-based rank of the target; ties count against it."""
    return int((scores >= scores[target]).sum())
