"""Benchmark queries as users make them: a frame anywhere in a real raster (lab.placements),
drawn in one of several styles, with the frame as the truth.

Scenes: the Sentinel-2 scene is the training scene (lab/train.py samples its windows); the
other rasters (other sensors, resolutions and places) are held out, so their numbers are zero-shot.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lab.placements import PLACEMENTS, Frame, random_frame
from lab.pseudo_sketch import has_lines, label_outlines, load_hand_strokes, pseudo_sketch
from worker.assets import load_asset_paths
from worker.tiling import RasterInfo, TileSettings, open_raster

# name -> (asset key, description); the first is the training scene
SCENES = {
    "s2": ("s2_rgb", "Sentinel-2 10 m, 16-bit, UTM 18N (training scene)"),
    "lsat7": ("lsat7_rgb", "Landsat 7 28.5 m, float, CRS without EPSG code"),
    "rmnp": ("rmnp_rgb", "Landsat (coarsened), 8-bit, EPSG:4326"),
    "osbs": ("osbs_rgb", "NEON aerial 0.1 m, 8-bit, UTM 17N"),
}
TRAIN_SCENES = ("s2",)
# dense to abstract; `outline` (land-cover boundaries) exists only where a scene ships a label map
STYLES = ("canny", "simple", "wobbly", "sloppy", "hed", "partial", "strokes", "regions")
# query by example (worker.example_query): the frame's own pixels, read and drawn by the worker as
# a dragged rectangle is (the upright square around the frame's centre); opt-in (--styles)
EXAMPLE = "example"
LABEL_MAPS = {"lsat7": "lsat7_strata"}
# The rasters are small (373-1947 px), so the benchmark's index cuts 128 px tiles (read to the
# model's 224 px, as a 224 px tile of 1.75x finer imagery would be): more places per raster.
BENCH_TILES = TileSettings(tile=128, overlap=0.25, scales=(1, 2))


@dataclass
class Query:
    scene: str
    placement: str
    style: str
    frame: Frame
    image: Image.Image  # the sketch as drawn (dark strokes on white, 224 px, the frame's extent)


def scene_rasters() -> dict[str, RasterInfo]:
    paths = load_asset_paths()
    return {name: open_raster(Path(paths[key]), None) for name, (key, _) in SCENES.items()}


def make_queries(per_placement: int, seed: int = 0, styles=STYLES, placements=PLACEMENTS,
                 settings: TileSettings = BENCH_TILES) -> list[Query]:
    """`per_placement` frames of each placement kind in each scene, each drawn in every style
    (fixed seed). Only frames with something to draw are used (open water, haze and flat
    fields are not sketched: lab.pseudo_sketch.has_lines)."""
    from lab.hed import load_hed

    rng = np.random.default_rng(seed)
    paths = load_asset_paths()
    strokes = load_hand_strokes(Path(paths["lasa_dir"]))
    hed = load_hed(Path(paths["hed_weights"])) if "hed" in styles else None
    queries = []
    for scene, raster in scene_rasters().items():
        labels = _label_lines(scene, raster)
        for placement in placements:
            for frame, image, valid in sketchable_frames(raster, settings, placement, per_placement, rng):
                for style in styles:
                    if style == EXAMPLE:
                        queries.append(Query(scene, placement, style, frame, example_drawing(frame)))
                        continue
                    sketch = pseudo_sketch(image, style, rng=rng, hand_strokes=strokes, hed=hed, valid=valid)
                    queries.append(Query(scene, placement, style, frame, sketch))
                if labels is not None:
                    outline = draw_lines_in_frame(labels, frame)
                    if (np.asarray(outline) < 128).mean() >= 0.005:
                        queries.append(Query(scene, placement, "outline", frame, outline))
    return queries


def sketchable_frames(raster: RasterInfo, settings: TileSettings, placement: str, count: int,
                      rng: np.random.Generator) -> Iterator[tuple[Frame, np.ndarray, np.ndarray]]:
    """Up to `count` frames of a placement kind in the raster with something to draw (open water,
    haze and flat fields are not sketched: lab.pseudo_sketch.has_lines), each with its pixels and
    valid mask; `rng` is drawn from between them by the caller too (its sketches)."""
    made = 0
    for _ in range(50 * count):
        if made == count:
            return
        frame = random_frame(raster, settings, placement, rng)
        if frame is None:
            return
        image, valid = frame.read()
        if valid.mean() < 0.9 or not has_lines(image, valid):
            continue
        made += 1
        yield frame, image, valid


def example_drawing(frame: Frame, size: int = 224) -> Image.Image:
    """The upright square around a frame as the worker draws an example (worker.example_query)."""
    from worker.example_query import draw_window

    h = frame.side / 2
    return Image.fromarray(draw_window(frame.raster, (frame.cx - h, frame.cy - h, frame.cx + h, frame.cy + h), size)[0])


def _label_lines(scene: str, raster: RasterInfo):
    """Land-cover boundaries of a scene with a label map on its grid (raster pixel coordinates)."""
    import rasterio

    if scene not in LABEL_MAPS:
        return None
    with rasterio.open(load_asset_paths()[LABEL_MAPS[scene]]) as labels, rasterio.open(raster.path) as image:
        if labels.transform != image.transform or labels.shape != image.shape:
            raise ValueError(f"the label map of {scene} is not on its grid")
        return label_outlines(labels.read(1), image.read_masks(1) > 0)


def draw_lines_in_frame(lines, frame: Frame, size: int = 224) -> Image.Image:
    """Lines in raster pixel coordinates (col, row), as they appear in a (turned) frame."""
    import math

    import shapely
    from PIL import ImageDraw

    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    a = math.radians(frame.angle)
    ca, sa = math.cos(a), math.sin(a)
    scale = size / frame.side
    clip = frame.pixel_polygon()
    for line in lines:
        for part in shapely.get_parts(line.intersection(clip)):
            if part.geom_type != "LineString" or part.is_empty:
                continue
            cols, rows = np.asarray(part.coords).T
            dc, dr = cols - frame.cx, rows - frame.cy
            u, v = dc * ca - dr * sa, dc * sa + dr * ca  # the inverse of the frame's rotation
            draw.line(list(zip((u + frame.side / 2) * scale, (v + frame.side / 2) * scale)), fill=0, width=2)
    return img
