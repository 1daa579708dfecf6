"""Sketches (PNG/JPEG of dark strokes on light, or stroke polylines) -> normalised model input.

A sketch image is a picture of a place: its frame is the place's frame, so it is only padded
white to a square (where a line lies in the frame is what locates it). The paper's release crops
to the ink's bounding box instead (object sketches, where position means nothing);
`crop_to_ink=True` keeps that. Measured on held-out pseudo-sketches (docs/benchmarks/quality.md): cropping to the
ink moved lines away from where they lie in the place and cost most of the recall.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from wire.protocol import MAX_STROKE_POINTS, MAX_STROKES, excerpt
from worker.edge_cells import CELL, compared_drawings
from worker.errors import InputError

MAX_SKETCH_PIXELS = 4096 * 4096
MIN_SKETCH_SIDE = 8
MARGIN_FRACTION = 10 / 224  # the reference's 10 px margin at 224 px
INK_CONTRAST = 40  # grey levels between paper and ink below which a sketch counts as blank
FRAME_MARGIN = 0.05 / 0.9  # of a stroke sketch's span: the canvas's 5% either side, drawn round its frame


@dataclass(frozen=True)
class StrokeSketch:
    """Polylines as drawn: each stroke a list of (x, y); y grows up in map coordinates.

    `frame` (x0, y0, x1, y1) is what the strokes were drawn in, e.g. a sketch pad: the place's
    frame. Without it the strokes' own extent is the frame (on the map, what was drawn is the place).
    `crs`: the map's, for strokes drawn on one (a search draws them as a raster's pixels show
    the place: worker.map_strokes).
    """

    strokes: tuple[tuple[tuple[float, float], ...], ...]
    y_up: bool = True
    frame: tuple[float, float, float, float] | None = None
    crs: str | None = None

    def __post_init__(self) -> None:
        """Refuse what no one draws: more strokes or points than MAX_STROKES and
        MAX_STROKE_POINTS (they would only cost the worker memory), coordinates that are not
        finite, and an extent too large to compute with."""
        if len(self.strokes) > MAX_STROKES:
            raise InputError(f"sketch has {len(self.strokes)} strokes; at most {MAX_STROKES}: draw fewer")
        points = sum(len(s) for s in self.strokes)
        if points > MAX_STROKE_POINTS:
            raise InputError(f"sketch has {points} points; at most {MAX_STROKE_POINTS}: draw fewer or simpler strokes")
        coords = np.array([c for s in self.strokes for p in s for c in p] + list(self.frame or ()), np.float64)
        if not np.isfinite(coords).all():
            raise InputError("sketch strokes or frame contain coordinates that are not finite numbers")
        x0, y0, x1, y1 = self.extent() if self.strokes and all(self.strokes) else (0.0, 0.0, 0.0, 0.0)
        if not np.isfinite([x1 - x0, y1 - y0]).all():
            raise InputError("sketch strokes span more than a float can hold (coordinates near 1e308): draw them in "
                             "map or pixel coordinates")

    def extent(self) -> tuple[float, float, float, float]:
        if self.frame is not None:
            return self.frame
        pts = np.array([p for s in self.strokes for p in s], dtype=np.float64)
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


def open_sketch_image(source: str | Path | bytes) -> Image.Image:
    """Decode a sketch file or bytes to greyscale on white; a clear error for anything unusable."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        w, h = img.size
        if w * h > MAX_SKETCH_PIXELS:
            raise InputError(f"sketch is {w}x{h} px; at most {MAX_SKETCH_PIXELS} pixels (e.g. 4096x4096)")
        if min(w, h) < MIN_SKETCH_SIDE:
            raise InputError(f"sketch is {w}x{h} px; draw on at least {MIN_SKETCH_SIDE}x{MIN_SKETCH_SIDE}")
        img.load()
    except UnidentifiedImageError:  # PIL's words name the bytes sent as "<_io.BytesIO object at 0x7f...>"
        raise InputError("sketch is not a readable PNG/JPEG image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"sketch is not a readable PNG/JPEG image ({exc})") from exc
    img = _upright(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = _flattened(img.convert("RGBA"))
    return _dark_on_light(img.convert("L"))


def _flattened(rgba: Image.Image) -> Image.Image:
    """A transparent sketch on white paper; light strokes on a transparent page (a drawing app's
    white pen), which vanished on white, on black instead."""
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("L")
    if np.ptp(np.asarray(on_white)) >= INK_CONTRAST:
        return on_white
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")


DARK_PAPER_SHARE = 0.85  # of the image darker than the ink level, for light strokes on dark paper
DARK_BORDER_SHARE = 0.95  # of its border too: a page photographed on a dark desk keeps its page


def _dark_on_light(gray: Image.Image) -> Image.Image:
    """Light strokes on dark paper (chalk on a blackboard, a dark-themed app's export) turned dark
    on light, as every sketch is compared. Read as they were, the paper was the ink and a search
    compared a dark square, unsaid. The paper is dark when nearly all the image and its border
    are darker than the ink level: lines are thin. A drawing hatched dark over three quarters of
    its frame, border included, is dark strokes on light paper (at half, such a drawing was turned)."""
    pixels = np.asarray(gray)
    if int(np.ptp(pixels)) < INK_CONTRAST:
        return gray
    level = ink_level(pixels)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.mean(border < level) > DARK_BORDER_SHARE and np.mean(pixels < level) > DARK_PAPER_SHARE:
        return ImageOps.invert(gray)
    return gray


# EXIF orientation -> the turn or flip that shows the image upright (as PIL's ImageOps.exif_transpose
# turns it; that also writes the EXIF back, which raised struct.error on a tag of a wrong type)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: a phone stores a photo of a paper sketch sideways, with an
    EXIF orientation that turns it upright; read without it, it was searched turned 90 degrees.
    EXIF that cannot be read leaves the image as stored."""
    try:
        orientation = img.getexif().get(0x0112)
    except (struct.error, ValueError, OSError, TypeError):
        return img
    turn = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return img if turn is None else img.transpose(turn)


def render_strokes(sketch: StrokeSketch, canvas: int = 512, width_fraction: float = 1 / 100) -> Image.Image:
    """Draw polylines dark on white, fitted into a square canvas keeping their aspect ratio."""
    strokes = [s for s in sketch.strokes if len(s) >= 1]
    if not strokes:
        raise InputError("sketch has no strokes")
    pts = np.array([p for s in strokes for p in s], dtype=np.float64)
    if not np.isfinite(pts).all():
        raise InputError("sketch strokes contain non-finite coordinates")
    refuse_outside_their_frame(sketch)
    x0, y0, x1, y1 = sketch.extent()
    span = max(x1 - x0, y1 - y0)
    if not np.isfinite([x0, y0, x1, y1]).all() or span <= 0:
        raise InputError("sketch strokes have no extent (a single point); draw lines")
    pad = canvas * 0.05
    scale = (canvas - 2 * pad) / span
    off_x = pad + ((canvas - 2 * pad) - (x1 - x0) * scale) / 2
    off_y = pad + ((canvas - 2 * pad) - (y1 - y0) * scale) / 2
    img = Image.new("L", (canvas, canvas), 255)
    draw = ImageDraw.Draw(img)
    width = max(1, int(round(canvas * width_fraction)))
    for stroke in strokes:
        xy = [(off_x + (x - x0) * scale,
               (off_y + (y1 - y) * scale) if sketch.y_up else (off_y + (y - y0) * scale)) for x, y in stroke]
        if len(xy) == 1:
            xy = xy * 2
        draw.line(xy, fill=0, width=width, joint="curve")
    return img


def refuse_outside_their_frame(sketch: StrokeSketch) -> None:
    """InputError for a frame of no width or height, or reversed (a pad's frame of zero width was
    searched as a meaningless drawing), and for strokes wholly outside their frame (drawn
    blank); said in the coordinates the user gave, before map strokes are moved onto a raster's
    pixel grid (worker.map_strokes: the message quoted numbers the user never sent)."""
    if sketch.frame is None:
        return
    x0, y0, x1, y1 = sketch.frame
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"sketch frame {excerpt(list(sketch.frame))} is empty or reversed: give the frame the strokes "
                         "were drawn in as [x0, y0, x1, y1], x1 above x0 and y1 above y0 (strokes_frame), or none")
    if not strokes_meet(sketch.strokes, sketch.frame):  # was called blank
        raise InputError(f"sketch strokes lie wholly outside their frame {excerpt(list(sketch.frame))}: give the frame "
                         "they were drawn in (strokes_frame), in the strokes' coordinates, or none")


def strokes_meet(strokes, frame: tuple[float, float, float, float]) -> bool:
    """Whether any stroke is drawn on the canvas of `frame` (x0, y0, x1, y1): within the frame or
    the margin the canvas shows round it."""
    x0, y0, x1, y1 = frame
    margin = max(x1 - x0, y1 - y0) * FRAME_MARGIN
    lines = [list(s) * 2 if len(s) == 1 else list(s) for s in strokes if s]
    return shapely.box(x0 - margin, y0 - margin, x1 + margin, y1 + margin).intersects(shapely.MultiLineString(lines))


def ink_level(gray: np.ndarray) -> float:
    """The grey level below which a sketch's pixel is ink: halfway between paper and darkest stroke."""
    return (int(gray.min()) + int(gray.max())) / 2


def ink_bbox(gray: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the dark strokes; InputError when there are none."""
    if int(gray.max()) - int(gray.min()) < INK_CONTRAST:
        raise InputError("sketch is blank: no dark strokes on a light background")
    ys, xs = np.nonzero(gray < ink_level(gray))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def prepare_sketch(img: Image.Image, size: int, crop_to_ink: bool = False, strokes: bool = False) -> torch.Tensor:
    """Greyscale sketch -> (3, size, size) float in [0, 1]: the whole image (or the ink's
    bounding box plus a margin), fitted and padded white to a square. `strokes`: the image is
    strokes drawn into their frame (a refusal says what to do of strokes, not of an image)."""
    img = img.convert("L")
    x0, y0, x1, y1 = ink_bbox(np.asarray(img))  # refuses blank sketches either way
    if crop_to_ink:
        margin = int(round(MARGIN_FRACTION * max(x1 - x0, y1 - y0)))
        x0, y0, x1, y1 = max(0, x0 - margin), max(0, y0 - margin), min(img.width, x1 + margin), min(img.height, y1 + margin)
    else:
        x0, y0, x1, y1 = 0, 0, img.width, img.height
    crop = img.crop((x0, y0, x1, y1))
    scale = size / max(crop.size)
    new = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    crop = _fitted(crop, new, scale)
    canvas = Image.new("L", (size, size), 255)
    canvas.paste(crop, ((size - new[0]) // 2, (size - new[1]) // 2))
    _check_ink_span(np.asarray(canvas), strokes)
    arr = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
    return arr[None].expand(3, -1, -1).contiguous()


def _check_ink_span(fitted: np.ndarray, strokes: bool) -> None:
    """InputError for strokes that span less than one cell of the compared drawings once fitted
    (worker.edge_cells.CELL px of 224): a dot or a tiny mark in a large frame was searched and
    found nothing, unsaid. Ink here is anything INK_CONTRAST darker than the paper, so light
    pencil lines beside one black dot count."""
    ys, xs = np.nonzero(fitted < int(fitted.max()) - INK_CONTRAST)
    if not len(xs):
        raise InputError("sketch is blank once fitted to its frame: no dark strokes on a light background")
    span = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    if span < CELL * fitted.shape[0] / 224:
        # strokes on the plugin's pad were told of an image's command-line flag (probe)
        todo = "draw the place's lines across the frame" if strokes else \
            "crop the image to its strokes (or search it with crop_to_ink: --crop-to-ink on the command line)"
        raise InputError(f"the sketch's strokes span {100 * span / fitted.shape[0]:.1f}% of its frame, too small to "
                         f"match anything: {todo}")


def _fitted(img: Image.Image, new: tuple[int, int], scale: float) -> Image.Image:
    """A greyscale sketch resized to `new`. Strokes far thinner than the reduction (a 3 px pen on
    a 4096 px canvas, 0.16 px at 224) faded to light grey, nothing a search saw as a line, and
    the search found nothing, unsaid: when every stroke would fade so, each block of pixels keeps
    its darkest first (a line stays a line, about a pixel wide), then the resize."""
    resized = img.resize(new, Image.Resampling.LANCZOS)
    gray = np.asarray(img)
    block = int(1 / scale)
    if block < 2 or np.asarray(resized).min() < ink_level(gray):
        return resized
    rows, cols = -(-gray.shape[0] // block) * block, -(-gray.shape[1] // block) * block
    padded = np.full((rows, cols), gray.max(), gray.dtype)
    padded[:gray.shape[0], :gray.shape[1]] = gray
    darkest = padded.reshape(rows // block, block, cols // block, block).min(axis=(1, 3))
    return Image.fromarray(darkest).resize(new, Image.Resampling.LANCZOS)


def sketch_pixels(sketch: torch.Tensor) -> np.ndarray:
    """A prepared sketch (3, S, S) in [0, 1] back to its drawing: (S, S) uint8, dark lines on white."""
    return (sketch[0].cpu().numpy() * 255).round().astype(np.uint8)


def compared_lines(sketch: torch.Tensor) -> np.ndarray:
    """A prepared sketch (3, S, S) as a search compares it with places: its drawing (S, S) uint8,
    smoothed as every compared drawing is (worker.edge_cells.compared_drawings)."""
    return compared_drawings(torch.from_numpy(sketch_pixels(sketch))[None])[0].numpy()


def load_sketch(source: str | Path | bytes | StrokeSketch, size: int, crop_to_ink: bool = False) -> torch.Tensor:
    """Any sketch input -> model-ready tensor. Strokes are rendered into their frame (see
    StrokeSketch.frame), so `crop_to_ink` only changes images."""
    strokes = isinstance(source, StrokeSketch)
    return prepare_sketch(render_strokes(source) if strokes else open_sketch_image(source), size, crop_to_ink, strokes)
