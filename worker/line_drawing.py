"""Line drawings of imagery: how a tile is put into the sketch domain.

Zero-shot DINOv2 features do not bridge sketches and imagery (measured: 0 of 12 pseudo-sketch
queries in the top 5 of 189 Sentinel-2 tiles against RGB tiles). Drawing each tile as thin
dark edges on white first, and matching the sketch against that drawing, gave 5 of 12.

The drawing is Canny's by scikit-image's rules (Gaussian smoothing that ignores nodata, Sobel
gradients, bilinear non-maximum suppression, quantile thresholds, 8-connected hysteresis), then
a skeleton. The filters run in torch on a whole batch at once, on the device of the tensors
given (the CPU for arrays), and use every torch thread: on this 2-core CPU, 16 tiles took 7.0 ms
a tile with scikit-image (one thread, tile by tile) and 3.9 ms so; in one thread (a drawing
process's share) 6.7 and 5.5 ms. The two steps that follow connected pixels (hysteresis,
skeleton) stay in scipy / scikit-image on the CPU, whatever the filters' device, the batch split
over torch's threads (both release the GIL). The edges differ from
scikit-image's by float rounding only (8 of 90,000 edge pixels on 57 real tiles; only a blank
tile without the contrast floor draws other noise, rounding being all there is to draw), so
the index fingerprint did not change with it and older indexes stay valid.

A tile is drawn at two scales, its edges at 3 px and its big lines at 6 px (at 224 px) in one
picture: what a person draws of a place is mostly its few big lines, which the finer scale breaks
up. Both scales are thresholded apart and thinned once together: 12 tiles took 185 ms, against
118 ms for one scale and 224 ms for two drawn apart (HOG cosine with the latter >= 0.993 on 36
real tiles). Chosen on held-out queries (docs/benchmarks/quality.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from worker.gaussian import filtered
from worker.thread_pools import shared_pool

TILE_EDGE_SIGMA = 3.0  # at 224 px: coarse structure (shorelines, roads, field edges), not texture
# A person sketching a place draws its few big lines; at 3 px many of them break into texture, so
# tile drawings also hold the edges at this scale (px at 224 px), drawn over the others. Chosen on
# held-out queries (docs/benchmarks/quality.md): 5, 6 and 8 all gained, 6 most at recall@5 and @10.
BIG_LINE_SIGMA = 6.0
EDGE_QUANTILES = (0.6, 0.9)  # Canny's low/high thresholds as quantiles of the gradient magnitude
# Quantile thresholds always draw a tenth of the pixels, so open water drew its sun glint as
# lines in every direction, and those tiles matched every sketch a little (65% of the top-5 hits
# of land places were water tiles). No edge is drawn where the grey level's gradient, smoothed
# at this scale (px at 224 px), stays under the floor (grey fraction per px): nothing a person
# would draw. Chosen on the training scene (docs/benchmarks/contrast_floor.md).
CONTRAST_SIGMA = 3.0
CONTRAST_FLOOR = 0.01


def edge_maps(tiles: np.ndarray | torch.Tensor, sigma: float | tuple[float, ...],
              valid: np.ndarray | torch.Tensor | None = None, floor: float = CONTRAST_FLOOR) -> np.ndarray:
    """Boolean one-pixel edges (B, S, S) of RGB uint8 tiles (B, S, S, 3); quantile thresholds keep
    the drawing density comparable between bright and dull scenes, and the contrast floor keeps
    featureless surfaces blank. Smoothing ignores nodata pixels (`valid` False) and no edge is
    drawn where the data ends. Several sigmas draw each scale's edges into one picture, thinned
    once."""
    if len(tiles) == 0:
        return np.zeros((0, *tiles.shape[1:3]), bool)
    sigmas = (sigma,) if isinstance(sigma, (int, float)) else tuple(sigma)
    grey = _grey(_tensor(tiles))
    mask = None if valid is None else _tensor(valid).to(grey.device, grey.dtype)
    if mask is None or bool(mask.all()):
        # one tile's mask for the batch: the smoothing's normaliser is then filtered once, not once
        # a tile (the same numbers; at sigma 6, 12 tiles smoothed in 4.5 ms, not 9.0)
        mask = torch.ones_like(grey[:1])
    strong, weak = zip(*(_canny_candidates(grey, mask, s) for s in sigmas))
    strong = torch.stack(strong, 1).cpu().numpy()  # (B, scales, S, S): each scale's own hysteresis
    weak = torch.stack(weak, 1).cpu().numpy()
    visible = _contrast_above(grey, floor).cpu().numpy() if floor > 0 else np.ones(grey.shape, bool)
    threads = torch.get_num_threads()  # a drawing process's one, or the filters' own
    if threads == 1 or len(grey) == 1:
        return _thin_lines(strong, weak, visible)
    parts = np.array_split(np.arange(len(grey)), min(threads, len(grey)))
    pool = shared_pool(f"thin-lines-{threads}", threads)
    return np.concatenate(list(pool.map(lambda p: _thin_lines(strong[p], weak[p], visible[p]), parts)))


def edge_map(tile: np.ndarray, sigma: float, valid: np.ndarray | None = None,
             floor: float = CONTRAST_FLOOR) -> np.ndarray:
    """One tile's edges (S, S) bool: `edge_maps` of a batch of one."""
    return edge_maps(tile[None], sigma, None if valid is None else valid[None], floor)[0]


def visible_structure(tile: np.ndarray, floor: float = CONTRAST_FLOOR) -> np.ndarray:
    """Where an RGB uint8 tile has contrast enough for a line (bool (S, S)); all True at floor 0."""
    if floor <= 0:
        return np.ones(tile.shape[:2], bool)
    return _contrast_above(_grey(_tensor(tile)[None]), floor)[0].numpy()


def draw_edges(edges: np.ndarray, size: int, width: int = 2) -> Image.Image:
    """Dark strokes on white at `size` px from a boolean edge map."""
    if edges.shape != (size, size):
        edges = np.asarray(Image.fromarray(edges).resize((size, size), Image.Resampling.NEAREST))
    return Image.fromarray(_ink(_tensor(np.asarray(edges, bool))[None], width)[0].numpy())


# Tiles drawn at once on a CPU: the filters' arrays of a few tiles stay in the CPU's caches. From
# batches of 16 tiles of 224 px, 4 at a time took 8.9-9.3 ms a tile in one thread against 10.4-11.0
# (5.5-5.7 against 6.4 in two threads; 64 at once: 13.0 in one thread); 2 and 8 at a time were
# slower. A GPU draws a whole batch at once: each filter is then one launch for the batch.
DRAWN_AT_ONCE = 4


def tile_line_drawings(tiles: np.ndarray | torch.Tensor, valid: np.ndarray | torch.Tensor | None = None,
                       floor: float = CONTRAST_FLOOR) -> np.ndarray | torch.Tensor:
    """(B, S, S, 3) uint8 tiles and their (B, S, S) valid-pixel masks -> (B, S, S, 3) uint8 line
    drawings: the edges at TILE_EDGE_SIGMA and at BIG_LINE_SIGMA together (each tile's drawing is
    its own: the same whatever the batch). Arrays are drawn on the CPU, DRAWN_AT_ONCE tiles at a
    time, into an array; a tensor (a GPU's) is filtered on its device, the whole batch at once,
    into a tensor there (the hysteresis and the thinning run on the CPU either way: edge_maps)."""
    if len(tiles) == 0:
        return tiles[:0]
    size = tiles.shape[1]
    sigmas = (TILE_EDGE_SIGMA * size / 224, BIG_LINE_SIGMA * size / 224)
    at_once = len(tiles) if isinstance(tiles, torch.Tensor) else DRAWN_AT_ONCE
    edges = np.concatenate([edge_maps(tiles[i:i + at_once], sigmas, None if valid is None else valid[i:i + at_once],
                                      floor) for i in range(0, len(tiles), at_once)])
    device = tiles.device if isinstance(tiles, torch.Tensor) else "cpu"
    drawings = _ink(torch.from_numpy(edges).to(device), 2)[..., None].expand(-1, -1, -1, 3)
    return drawings.contiguous() if isinstance(tiles, torch.Tensor) else drawings.numpy().copy()


def drawing_device(device: torch.device) -> torch.device | None:
    """Where tiles and places are drawn for a model on `device`: on a CUDA GPU, there (tensors, a
    batch at once); else None, on the CPU (arrays, DRAWN_AT_ONCE at a time). Not on MPS, which
    has no float64 for the cells' bincount."""
    return device if device.type == "cuda" else None


def fingerprint() -> dict:
    """What decides tile drawings (part of the index's tile-encoder fingerprint)."""
    return {"sigma": TILE_EDGE_SIGMA, "big_lines": BIG_LINE_SIGMA, "thresholds": EDGE_QUANTILES, "nodata": "masked",
            "contrast_floor": (CONTRAST_SIGMA, CONTRAST_FLOOR)}


def _tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pixels as a tensor, sharing an array's memory where torch can (copied where it cannot:
    read-only or reversed arrays)."""
    if isinstance(pixels, torch.Tensor):
        return pixels
    return torch.from_numpy(np.require(pixels, requirements=("W", "C")))


def _grey(tiles: torch.Tensor) -> torch.Tensor:
    return tiles.to(torch.float32).mean(-1) / 255.0


def _ink(edges: torch.Tensor, width: int) -> torch.Tensor:
    """Edges (B, S, S) bool drawn as dark strokes on white, uint8: 3 px wide, centred, for width 2
    or 3 (PIL's MinFilter of the odd size at or above `width`, as drawings always were)."""
    for _ in range((width + 1 - width % 2) // 2):
        edges = _neighbourhood(edges, any_of=True)
    return torch.where(edges, 0, 255).to(torch.uint8)


def _neighbourhood(pixels: torch.Tensor, any_of: bool) -> torch.Tensor:
    """Over each pixel's 3x3 neighbourhood of (B, H, W) bool, pixels past the border False: any
    set (a dilation) or all set (an erosion). Shifted views, 30x faster than a max-pool here."""
    p = F.pad(pixels, (1, 1, 1, 1))
    if any_of:
        rows = p[:, :, :-2] | p[:, :, 1:-1] | p[:, :, 2:]
        return rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]
    rows = p[:, :, :-2] & p[:, :, 1:-1] & p[:, :, 2:]
    return rows[:, :-2] & rows[:, 1:-1] & rows[:, 2:]


def _contrast_above(grey: torch.Tensor, floor: float) -> torch.Tensor:
    """Where the grey level's Gaussian gradient magnitude reaches `floor` (B, S, S) bool."""
    sigma = CONTRAST_SIGMA * grey.shape[-2] / 224
    down = filtered(grey, sigma, (1, 0), "symmetric")
    across = filtered(grey, sigma, (0, 1), "symmetric")
    return torch.sqrt(down ** 2 + across ** 2) >= floor


def _canny_candidates(grey: torch.Tensor, mask: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Canny's thinned edge pixels above the high threshold and above the low one (B, S, S) bool
    each; `mask` (B, S, S) or (1, S, S) for all tiles: 1 where a pixel is valid."""
    eps = torch.finfo(torch.float32).eps
    smoothed = filtered(grey * mask, sigma, (0, 0), "constant") / (filtered(mask, sigma, (0, 0), "constant") + eps)
    inner = _neighbourhood(mask > 0, any_of=False)  # no edge where the data ends, nor on the border
    padded = F.pad(smoothed[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    rows = padded[:, 2:, :] - padded[:, :-2, :]
    cols = padded[:, :, 2:] - padded[:, :, :-2]
    di = rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]  # Sobel along rows (axis 0)
    dj = cols[:, :-2, :] + 2 * cols[:, 1:-1, :] + cols[:, 2:, :]  # Sobel along columns (axis 1)
    magnitude = torch.sqrt(di * di + dj * dj)
    low, high = torch.quantile(magnitude.flatten(1), torch.tensor(EDGE_QUANTILES, device=grey.device), dim=1,
                               interpolation="linear")[:, :, None, None]
    peak = inner & (magnitude >= low.clamp_min(1e-14)) & _local_maxima(di, dj, magnitude)
    return peak & (magnitude >= high), peak


def _local_maxima(di: torch.Tensor, dj: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Bilinear non-maximum suppression (B, S, S) bool: the magnitude is no less than the two
    values interpolated a pixel away along the gradient, on either side (scikit-image's rule).
    Every pixel at once from shifted views: 9 ms for 12 tiles, where gathering the 40% of pixels
    above the low threshold took 14 ms, with the same edges. Border pixels are not edges
    (_canny_candidates masks them)."""
    h, w = magnitude.shape[-2:]
    padded = F.pad(magnitude, (1, 1, 1, 1))

    def shifted(down: int, right: int) -> torch.Tensor:
        return padded[:, 1 + down:1 + down + h, 1 + right:1 + right + w]

    ai, aj = di.abs(), dj.abs()
    same_sign = ((di > 0) & (dj > 0)) | ((di <= 0) & (dj <= 0))
    steep = torch.where(same_sign, ai > aj, ai >= aj)
    weight = torch.where(steep, aj / ai, ai / aj)
    # the neighbours on the gradient's plus side, straight and diagonal; the minus side mirrors them
    diagonal_plus = torch.where(same_sign, shifted(1, 1), shifted(-1, 1))
    diagonal_minus = torch.where(same_sign, shifted(-1, -1), shifted(1, -1))
    straight_plus = torch.where(steep, torch.where(same_sign, shifted(1, 0), shifted(-1, 0)), shifted(0, 1))
    straight_minus = torch.where(steep, torch.where(same_sign, shifted(-1, 0), shifted(1, 0)), shifted(0, -1))
    plus = diagonal_plus * weight + straight_plus * (1 - weight) <= magnitude
    minus = diagonal_minus * weight + straight_minus * (1 - weight) <= magnitude
    return plus & minus


def _thin_lines(strong: np.ndarray, weak: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """The CPU's part of a drawing (B, S, S) bool: each scale's hysteresis (strong and weak
    (B, scales, S, S)), the scales joined, kept where `visible`, thinned. scipy's labelling and
    scikit-image's thinning release the GIL, so parts of a batch run in threads (16 tiles: 15 ms
    labelled in one thread, 10 in two; 35 ms thinned in one, 21 in two)."""
    b, scales, h, w = strong.shape
    edges = _hysteresis(strong.reshape(b * scales, h, w), weak.reshape(b * scales, h, w))
    return _skeleton(edges.reshape(b, scales, h, w).any(axis=1) & visible)


_BATCH_8_CONNECTED = np.zeros((3, 3, 3), bool)
_BATCH_8_CONNECTED[1] = True  # 8-connected within a tile, never across tiles


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The weak pixels 8-connected to a strong one (B, S, S) bool, for a whole batch in one pass."""
    labels, count = ndimage.label(weak, _BATCH_8_CONNECTED)
    if count == 0:
        return weak
    keep = np.zeros(count + 1, bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    return keep[labels]


def _skeleton(edges: np.ndarray) -> np.ndarray:
    """Each tile's edges thinned to one pixel (B, S, S) bool: the tiles side by side with a blank
    column between them, skeletonised as one image (the thinning looks only at 3x3 neighbours)."""
    b, h, w = edges.shape
    if b == 0:
        return edges
    strip = np.zeros((h, b * (w + 1)), bool)
    view = strip.reshape(h, b, w + 1)
    view[:, :, :w] = edges.transpose(1, 0, 2)
    thin = skeletonize(strip).reshape(h, b, w + 1)[:, :, :w]
    return np.ascontiguousarray(thin.transpose(1, 0, 2))
