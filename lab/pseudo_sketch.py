"""Pseudo-sketches of real imagery: line drawings whose true place is known.

Used for tests, benchmarks and training pairs. Styles:
  canny   - thinned Canny edges of the tile, drawn as dark strokes
  simple  - the same edges traced into polylines, short ones dropped, simplified (fewer, cleaner lines)
  wobbly  - simple lines jittered with real hand-drawn wobble (LASA handwriting strokes)
  sloppy  - wobbly, plus a person's errors (`augment`: missing and extra lines, pen width,
            slight rotation and scale)
  hed     - traced HED edges (needs the HED model)
  partial - the simple lines inside one square holding a quarter of the frame (`only_part`)
  strokes - a few salient strokes only: the 3-8 longest coarse lines, simplified hard, wobbly
  regions - outlines of a coarse colour segmentation (what someone outlining fields draws)
Land-cover outlines (`label_outlines`, `draw_outlines`) are drawn from a label map, not a tile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely
from PIL import Image, ImageDraw
from rasterio import features
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

from worker.line_drawing import CONTRAST_FLOOR, draw_edges, edge_map, visible_structure

QUERY_EDGE_SIGMA = 2.0  # finer than the index's tile drawings: a query is not the indexed drawing
MIN_LINE_SHARE = 0.002  # edge pixels a place needs to be worth sketching (a line across half of it)


def has_lines(tile: np.ndarray, valid: np.ndarray | None = None, floor: float = CONTRAST_FLOOR) -> bool:
    """Whether a place shows anything a person would draw (open water, haze and flat fields do
    not): the benchmark and training only sketch such places."""
    return bool(edge_map(tile, QUERY_EDGE_SIGMA, valid, floor).mean() >= MIN_LINE_SHARE)


def trace_polylines(edges: np.ndarray, min_length: float = 12.0, tolerance: float = 1.5,
                    min_lines: int = 8) -> list[np.ndarray]:
    """Edge pixels -> simplified polylines (row, col): strokes shorter than min_length are
    dropped, but the `min_lines` longest always stay (a sparse scene still gets a drawing)."""
    # fully_connected="high": a one-pixel skeleton steps diagonally; without it every diagonal step
    # splits the line, and long shorelines came out as a few short fragments
    contours = [c for c in find_contours(edges.astype(np.float32), 0.5, fully_connected="high") if len(c) >= 2]
    lengths = np.array([np.linalg.norm(np.diff(c, axis=0), axis=1).sum() for c in contours])
    order = np.argsort(-lengths, kind="stable")
    # a contour walks both sides of a one-pixel line, hence 2 * min_length
    keep = [i for n, i in enumerate(order) if n < min_lines or lengths[i] >= 2 * min_length]
    return [approximate_polygon(contours[i], tolerance=tolerance) for i in keep]


def draw_polylines(lines: list[np.ndarray], shape: tuple[int, int], size: int, width: int = 2) -> Image.Image:
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    sy, sx = size / shape[0], size / shape[1]
    for line in lines:
        draw.line([(c * sx, r * sy) for r, c in line], fill=0, width=width, joint="curve")
    return img


def label_outlines(labels: np.ndarray, valid: np.ndarray, min_region: int = 64,
                   tolerance: float = 1.0) -> list[shapely.LineString]:
    """Boundaries between the classes of a land-cover label raster, as a person would outline
    them: regions under `min_region` pixels are merged into their neighbours, polygons are
    simplified, and the edge of the data (`valid` False beyond it) is not a boundary. Lines are
    in the raster's (col, row) pixel coordinates."""
    labels = np.where(valid, labels, 0).astype(np.int32)
    sieved = features.sieve(labels, size=min_region, connectivity=8)
    data = shapely.union_all([shapely.geometry.shape(g) for g, _ in
                              features.shapes(valid.astype(np.uint8), mask=valid)])
    edge_of_data = shapely.boundary(data).buffer(1.5)  # the raster's frame and any nodata collar
    lines = []
    for geom, _ in features.shapes(sieved, mask=sieved > 0, connectivity=8):
        boundary = shapely.boundary(shapely.geometry.shape(geom).simplify(tolerance)).difference(edge_of_data)
        lines.extend(p for p in shapely.get_parts(shapely.line_merge(boundary)) if not p.is_empty)
    return lines


def draw_outlines(lines: list[shapely.LineString], col_off: int, row_off: int, width: int, height: int,
                  size: int) -> Image.Image:
    """The parts of `lines` (raster pixel coordinates) inside a window, drawn at `size` px."""
    window = shapely.box(col_off, row_off, col_off + width, row_off + height)
    parts = []
    for line in lines:
        for part in shapely.get_parts(line.intersection(window)):
            if part.geom_type == "LineString" and not part.is_empty:
                cols, rows = np.asarray(part.coords).T
                parts.append(np.stack([rows - row_off, cols - col_off], 1))
    return draw_polylines(parts, (height, width), size)


def wobble(lines: list[np.ndarray], strokes: list[np.ndarray], amplitude: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Add a real hand's wobble: offsets taken from hand-drawn strokes (their deviation from a
    straight chord), resampled along each line and scaled to `amplitude` pixels."""
    out = []
    for line in lines:
        stroke = strokes[rng.integers(len(strokes))]
        chord = np.linspace(stroke[0], stroke[-1], len(stroke))
        dev = stroke - chord
        dev = dev / (np.abs(dev).max() + 1e-9)
        n = max(len(line) * 8, 16)
        t = np.linspace(0, 1, n)
        seg = np.linspace(0, 1, len(line))
        dense = np.column_stack([np.interp(t, seg, line[:, 0]), np.interp(t, seg, line[:, 1])])
        src = np.linspace(0, 1, len(dev))
        offset = np.column_stack([np.interp(t, src, dev[:, 0]), np.interp(t, src, dev[:, 1])])
        out.append(dense + amplitude * offset)
    return out


def load_hand_strokes(lasa_dir: Path) -> list[np.ndarray]:
    """All human demonstrations of the LASA handwriting set as (1000, 2) point arrays."""
    from scipy.io import loadmat

    strokes = []
    for path in sorted(Path(lasa_dir).glob("*.mat")):
        for demo in loadmat(path, simplify_cells=True)["demos"]:
            strokes.append(np.asarray(demo["pos"], np.float64).T)
    if not strokes:
        raise FileNotFoundError(f"no LASA .mat files in {lasa_dir}: run scripts/setup")
    return strokes


def hed_edges(tile: np.ndarray, hed, keep: float = 0.08) -> np.ndarray:
    """Thinned HED edges: the `keep` share of pixels with the highest edge probability."""
    import torch
    from skimage.morphology import skeletonize

    with torch.inference_mode():
        prob = hed(torch.from_numpy(np.ascontiguousarray(tile))[None])[0].numpy()
    return skeletonize(prob >= np.quantile(prob, 1.0 - keep))


def pseudo_sketch(tile: np.ndarray, style: str = "canny", size: int = 224, rng: np.random.Generator | None = None,
                  hand_strokes: list[np.ndarray] | None = None, hed=None, valid: np.ndarray | None = None,
                  floor: float = CONTRAST_FLOOR) -> Image.Image:
    """A line drawing of an RGB uint8 tile in the given style (`hed` needs a loaded HED model).
    Nothing is drawn where `valid` (the tile's data mask) is False or where the tile is
    featureless (`floor`, see worker.line_drawing): a person draws what they see."""
    if style == "hed":
        if hed is None:
            raise ValueError("the hed style needs a HED model (lab.hed.load_hed)")
        edges = hed_edges(tile, hed) & visible_structure(tile, floor)
        if valid is not None:
            edges &= ndimage.binary_erosion(valid, iterations=3)
        return draw_polylines(trace_polylines(edges), tile.shape[:2], size)
    edges = edge_map(tile, QUERY_EDGE_SIGMA, valid, floor)
    if style == "canny":
        return draw_edges(edges, size)
    lines = trace_polylines(edges)
    if style == "simple":
        return draw_polylines(lines, edges.shape, size)
    if style == "partial":
        if rng is None:
            raise ValueError("partial sketches need an rng")
        return only_part(draw_polylines(lines, edges.shape, size), rng)
    if style in ("wobbly", "sloppy"):
        if rng is None or not hand_strokes:
            raise ValueError(f"{style} sketches need an rng and hand strokes")
        img = draw_polylines(wobble(lines, hand_strokes, amplitude=3.0, rng=rng), edges.shape, size)
        return augment(img, rng) if style == "sloppy" else img
    if style == "strokes":
        if rng is None or not hand_strokes:
            raise ValueError("strokes sketches need an rng and hand strokes")
        return salient_strokes(tile, valid, floor, rng, hand_strokes, size)
    if style == "regions":
        return region_outlines(tile, valid, size)
    raise ValueError(f"unknown pseudo-sketch style {style!r}")


SALIENT_SIGMA = 6.0  # coarser than a query's Canny: the big lines a person remembers


def salient_strokes(tile: np.ndarray, valid: np.ndarray | None, floor: float, rng: np.random.Generator,
                    hand_strokes: list[np.ndarray], size: int) -> Image.Image:
    """3 to 8 of the longest coarse lines of the place, simplified to a few vertices, drawn with
    a real hand's wobble and a thicker pen: the abstract end of what users draw."""
    edges = edge_map(tile, SALIENT_SIGMA, valid, floor)
    lines = trace_polylines(edges, min_length=24.0, tolerance=1.5, min_lines=3)
    lengths = [float(np.linalg.norm(np.diff(line, axis=0), axis=1).sum()) for line in lines]
    keep = [lines[i] for i in np.argsort(lengths)[::-1][:int(rng.integers(3, 9))]]
    keep = [approximate_polygon(line, tolerance=4.0) for line in keep]
    return draw_polylines(wobble(keep, hand_strokes, amplitude=2.0, rng=rng), edges.shape, size, width=3)


def region_outlines(tile: np.ndarray, valid: np.ndarray | None, size: int, segments: int = 8) -> Image.Image:
    """Boundaries between the regions of a coarse colour segmentation (SLIC on a smoothed
    image), outlined as a person would (worker's label_outlines: small regions merged away,
    polygons simplified, the frame's and the data's edge not drawn)."""
    from skimage.filters import gaussian
    from skimage.segmentation import slic

    mask = np.ones(tile.shape[:2], bool) if valid is None else valid
    smooth = gaussian(tile.astype(np.float32) / 255.0, sigma=2.0 * tile.shape[0] / 224, channel_axis=-1)
    labels = slic(smooth, n_segments=segments, compactness=8.0, start_label=1, mask=mask)
    lines = label_outlines(labels, mask, min_region=int(0.01 * labels.size), tolerance=2.0)
    return draw_outlines(lines, 0, 0, tile.shape[1], tile.shape[0], size)


def only_part(img: Image.Image, rng: np.random.Generator, share: float = 0.25) -> Image.Image:
    """What a person who draws only the part of a place they remember draws: the lines inside
    a square holding `share` of the frame, around a random point of ink, in the same frame."""
    ink = np.asarray(img) < 128
    if not ink.any():
        return img
    size = img.size[0]
    side = int(round(size * share ** 0.5))
    ys, xs = np.nonzero(ink)
    i = rng.integers(len(ys))
    y0, x0 = (int(np.clip(v - side // 2, 0, size - side)) for v in (ys[i], xs[i]))
    out = Image.new("L", img.size, 255)
    out.paste(img.crop((x0, y0, x0 + side, y0 + side)), (x0, y0))
    return out


def augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a person's drawing does to a clean one: missing and extra lines, another pen width,
    a slight rotation and scale."""
    from PIL import ImageFilter

    size = img.size[0]
    out = img.copy()
    draw = ImageDraw.Draw(out)
    for _ in range(rng.integers(0, 4)):  # missing lines: erase a few patches
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 16, size // 6))
        draw.rectangle([x - r, y - r, x + r, y + r], fill=255)
    for _ in range(rng.integers(0, 3)):  # extra lines
        pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(int(rng.integers(2, 4)))]
        draw.line(pts, fill=0, width=2)
    if rng.random() < 0.4:
        out = out.filter(ImageFilter.MinFilter(3))  # a thicker pen
    angle, scale = float(rng.uniform(-8, 8)), float(rng.uniform(0.9, 1.1))
    out = out.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=255)
    if scale != 1.0:
        new = max(8, int(round(size * scale)))
        scaled = out.resize((new, new), Image.Resampling.BILINEAR)
        canvas = Image.new("L", (size, size), 255)
        canvas.paste(scaled, ((size - new) // 2, (size - new) // 2))
        out = canvas
    return out
