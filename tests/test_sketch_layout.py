"""Sketch framing and edge layouts: where a line lies in the sketch is what locates the place."""

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

import torch

from worker import edge_cells
from worker.errors import InputError
from lab.pseudo_sketch import draw_outlines, label_outlines, only_part, trace_polylines
from worker.sketch import StrokeSketch, compared_lines, load_sketch, prepare_sketch, sketch_pixels


def _ink_box(tensor) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(tensor[0].numpy() < 0.5)
    return xs.min(), ys.min(), xs.max(), ys.max()


def _drawing(lines, size=224) -> Image.Image:
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for line in lines:
        draw.line(line, fill=0, width=2)
    return img


def test_a_photo_of_a_sketch_is_read_as_its_exif_orientation_shows_it(tmp_path):
    """A phone stores a photo sideways with an EXIF orientation that viewers turn it upright by;
    read without it, a photo of a paper sketch was searched turned 90 degrees."""
    import io
    import struct

    from worker.sketch import open_sketch_image

    stored = _drawing([[(20, 10), (200, 10)]], size=224).crop((0, 0, 224, 112))  # a line along the top, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the top edge becomes the right edge
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif, quality=95)
    upright = np.asarray(open_sketch_image(buf.getvalue()))
    assert upright.shape == (224, 112), "as the photo is shown: taller than wide"
    ink = np.nonzero(upright < 128)
    assert ink[1].min() > 90, "the line along the right edge, where a viewer shows it"

    # orientation 6 beside a tag of another type than its own (a signed -5 as the resolution unit):
    # turning the image and writing that EXIF back raised struct.error, `internal`
    entries = [(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x0128, 8, 1, struct.pack("<hH", -5, 0))]
    raw = (b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, len(entries))
           + b"".join(struct.pack("<HHI", *entry[:3]) + entry[3] for entry in entries) + struct.pack("<I", 0))
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=raw, quality=95)
    assert np.asarray(open_sketch_image(buf.getvalue())).shape == (224, 112)


def test_light_strokes_on_dark_paper_are_searched_as_the_same_drawing():
    """Chalk on a blackboard, a dark-themed app's export, a white pen on a transparent layer: the
    search compares the same drawing as dark strokes on white. Before, the dark paper was read as
    the ink (a search compared a dark square, unsaid), and white strokes on a transparent page
    were called blank. A photo of a white page on a dark desk keeps its page as the paper."""
    import io

    from PIL import ImageOps

    from worker.sketch import open_sketch_image

    def encoded(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    drawing = _drawing([[(10, 200), (120, 60), (290, 90)], [(40, 20), (260, 280)]], size=300)
    as_drawn = prepare_sketch(open_sketch_image(encoded(drawing)), 224)
    on_blackboard = prepare_sketch(open_sketch_image(encoded(ImageOps.invert(drawing))), 224)
    assert torch.equal(on_blackboard, as_drawn)
    white_pen = Image.new("RGBA", drawing.size, (255, 255, 255, 0))
    white_pen.putalpha(ImageOps.invert(drawing))  # opaque white where the lines are, transparent elsewhere
    assert torch.allclose(prepare_sketch(open_sketch_image(encoded(white_pen)), 224), as_drawn, atol=1 / 255)

    hatched = Image.new("L", (300, 300), 255)  # fields hatched dark over three quarters of the frame, a road across
    draw = ImageDraw.Draw(hatched)
    for k in range(-300, 600, 6):
        draw.line([(k, 0), (k + 300, 300)], fill=0, width=4)
    draw.rectangle([0, 140, 300, 160], fill=255)
    assert np.mean(np.asarray(hatched) < 128) > 0.7
    assert np.array_equal(np.asarray(open_sketch_image(encoded(hatched))), np.asarray(hatched)), "was turned"

    on_desk = Image.new("L", (300, 300), 30)  # a dark desk round the page, the page most of the photo
    on_desk.paste(drawing.crop((30, 30, 270, 270)), (30, 30))
    page = np.asarray(open_sketch_image(encoded(on_desk)))
    assert page[250, 100] > 200 and page[5, 5] < 50, "read as it is: the page light, the desk dark"


def test_a_sketch_sent_that_is_no_image_is_refused_without_python_words():
    """Sketch bytes that are no image (the plugin's Load image… of a text file) were refused
    with "cannot identify image file <_io.BytesIO object at 0x7f...>", shown in the dock."""
    with pytest.raises(InputError) as refused:
        load_sketch(b"a user's notes, not an image", 224)
    assert str(refused.value) == "sketch is not a readable PNG/JPEG image (no image format recognised)"


def test_a_sketch_image_keeps_its_frame_unless_cropping_to_ink_is_asked():
    img = _drawing([[(10, 20), (90, 60)]], size=448)  # a stroke in the upper-left corner of the frame
    x0, y0, x1, y1 = _ink_box(prepare_sketch(img, 224))
    assert x1 < 60 and y1 < 40  # still in the upper-left, at half size
    x0, y0, x1, y1 = _ink_box(prepare_sketch(img, 224, crop_to_ink=True))
    assert x1 - x0 > 180  # the paper's preprocessing: the stroke fills the sketch


def test_a_thin_pen_on_a_large_canvas_keeps_its_lines_where_they_lie():
    """A 3 px pen on a 4096 px canvas (a tablet's) is 0.16 px at the model's 224: its strokes
    faded to light grey, nothing a search saw as a line, and a search found nothing, unsaid.
    They keep their lines now, where a thick pen's lie; a sketch that already kept its lines
    is prepared as before."""
    def drawn(size: int, width: int) -> Image.Image:
        img = Image.new("L", (size, size), 255)
        draw, f = ImageDraw.Draw(img), size / 224
        draw.line([(10 * f, 30 * f), (200 * f, 60 * f), (150 * f, 210 * f)], fill=0, width=width)
        draw.line([(20 * f, 180 * f), (120 * f, 100 * f)], fill=0, width=width)
        return img

    thin, thick = (prepare_sketch(drawn(4096, w), 224)[0].numpy() < 0.5 for w in (3, 24))
    assert thin.sum() > 0.5 * thick.sum()
    near_thick = ndimage.binary_dilation(thick, iterations=2)
    assert (thin & near_thick).sum() > 0.95 * thin.sum()  # where the thick pen's lines lie
    usual = drawn(512, 5)  # the plugin's pad: unchanged
    assert torch.equal(prepare_sketch(usual, 224)[0],
                       torch.from_numpy(np.asarray(usual.resize((224, 224), Image.Resampling.LANCZOS), np.float32) / 255))


def test_a_mark_too_small_for_its_frame_is_refused_but_light_lines_beside_a_dot_are_not():
    """A dot in a large frame was searched and answered no hits, unsaid; light pencil lines
    beside one black dot are a sketch (ink counts from the paper, not from the darkest mark)."""
    from worker.errors import InputError

    dot = Image.new("L", (4000, 4000), 255)
    ImageDraw.Draw(dot).ellipse([1995, 1995, 2005, 2005], fill=0)
    with pytest.raises(InputError, match=r"too small to match anything: crop the image to its strokes \(or search it "
                                         "with crop_to_ink"):
        prepare_sketch(dot, 224)
    pencil = Image.new("L", (224, 224), 255)
    draw = ImageDraw.Draw(pencil)
    draw.line([(10, 30), (210, 40)], fill=150, width=2)
    draw.point((100, 100), fill=0)
    assert prepare_sketch(pencil, 224)[0].min() < 1.0
    x0, _, x1, _ = _ink_box(prepare_sketch(dot, 224, crop_to_ink=True))
    assert x1 - x0 > 100  # cropped to it, the mark fills the frame


def test_pad_strokes_are_placed_in_the_pad_frame():
    stroke = ((10.0, 10.0), (50.0, 30.0))
    framed = load_sketch(StrokeSketch((stroke,), y_up=False, frame=(0.0, 0.0, 200.0, 200.0)), 224)
    x0, y0, x1, y1 = _ink_box(framed)
    assert x1 < 70 and y1 < 50
    fitted = load_sketch(StrokeSketch((stroke,), y_up=False), 224)  # no frame: the strokes' extent is the place
    x0, y0, x1, y1 = _ink_box(fitted)
    assert x1 - x0 > 180
    beside = ((205.0, 20.0), (208.0, 190.0))  # just past the frame, where the canvas still shows it: drawn
    assert (load_sketch(StrokeSketch((beside,), y_up=False, frame=(0.0, 0.0, 200.0, 200.0)), 224) < 0.5).any()
    with pytest.raises(InputError, match="wholly outside their frame"):
        load_sketch(StrokeSketch((((300.0, 20.0), (320.0, 190.0)),), y_up=False, frame=(0.0, 0.0, 200.0, 200.0)), 224)
    # strokes of different lengths, a dot among them, as every hand drawing has: was `internal`
    # (a ragged list given to shapely), since the frame was checked against the strokes
    drawn = [[[10, 10], [100, 80], [200, 40]], [[50, 190], [150, 150]], [[120, 120]]]
    assert (load_sketch(StrokeSketch(drawn, y_up=False, frame=(0.0, 0.0, 200.0, 200.0)), 224) < 0.5).any()


def test_edge_layout_prefers_lines_at_the_same_place_and_direction():
    tiles = {"top horizontal": [[(0, 40), (224, 50)]], "bottom horizontal": [[(0, 180), (224, 190)]],
             "vertical": [[(110, 0), (115, 224)]], "top diagonal": [[(0, 0), (224, 100)]]}
    drawings = torch.from_numpy(np.stack([np.asarray(_drawing(lines)) for lines in tiles.values()]))
    sketch = torch.from_numpy(np.array(_drawing([[(10, 46), (120, 52), (214, 58)]])))[None]  # a looser top line
    names = list(tiles)
    for spec in (edge_cells.COARSE, edge_cells.FINE):
        scores = edge_cells.describe(drawings, spec) @ edge_cells.describe(sketch, spec)[0]
        assert names[int(scores.argmax())] == "top horizontal"


def test_cells_give_scikit_image_hog_exactly_and_survive_storage():
    """A window's HOG blocks summed from stored 8 px cells are scikit-image's `hog` of the same
    drawing (cells 16/32 px, 2x2 blocks, L2-Hys), and the uint8 storage keeps their ranking."""
    from skimage.feature import hog

    rng = np.random.default_rng(0)
    drawings = np.stack([np.asarray(_drawing([[tuple(rng.integers(0, 224, 2)) for _ in range(3)] for _ in range(4)]))
                         for _ in range(30)])
    cells = edge_cells.cell_histograms(torch.from_numpy(drawings))
    for spec in (edge_cells.COARSE, edge_cells.FINE):
        reference = np.stack([hog(1 - d / 255.0, orientations=9, pixels_per_cell=(spec.cell, spec.cell),
                                  cells_per_block=(2, 2), block_norm="L2-Hys") for d in drawings])
        at_every_offset = edge_cells.window_descriptor(edge_cells.block_map(cells, spec), spec)  # what placements read
        whole_windows = edge_cells.window_hog(cells, spec)  # templates, tiles and drawings: one HOG cell's step
        for ours in (at_every_offset, whole_windows):
            assert np.abs(ours.flatten(1).numpy() - reference).max() < 1e-5
    stored = edge_cells.dequantise(edge_cells.quantise(cells))
    fine = lambda c: torch.nn.functional.normalize(
        edge_cells.window_descriptor(edge_cells.block_map(c, edge_cells.FINE), edge_cells.FINE).flatten(1), dim=1)
    exact, kept = fine(cells), fine(stored)
    assert (exact @ exact[7] - kept @ exact[7]).abs().max() < 0.02
    assert int((kept @ exact[7]).argmax()) == 7


def test_a_one_pixel_diagonal_line_is_traced_as_one_long_stroke():
    """Skeleton lines step diagonally; tracing must not split them into specks."""
    edges = np.zeros((100, 100), bool)
    steps = np.arange(10, 90)
    edges[steps, steps] = True  # 80 pixels touching only at their corners, 112 px long
    lengths = [np.linalg.norm(np.diff(line, axis=0), axis=1).sum() for line in trace_polylines(edges, min_lines=0)]
    assert max(lengths) > 200  # the contour walks both sides of the line: about 2 x 112


def test_land_cover_outlines_follow_class_boundaries_not_specks_or_the_data_edge():
    """Outline sketches of a label map: a field boundary is drawn; a 3x3 speck of another class
    and the edge of the data (a nodata collar on the right) are not."""
    labels = np.ones((128, 128), np.int32)
    labels[:, 40:] = 2  # a field edge at column 40
    labels[80:83, 10:13] = 3  # a speck a person would not outline
    valid = np.ones((128, 128), bool)
    valid[:, 100:] = False
    ink = np.asarray(draw_outlines(label_outlines(labels, valid), 0, 0, 128, 128, 128)) < 128
    columns = np.nonzero(ink.any(axis=0))[0]
    assert ink[:, 38:43].any(axis=1).mean() > 0.9  # the field edge, top to bottom
    assert set(columns) <= set(range(37, 44))  # nothing else: no speck, no collar line


def test_a_partial_sketch_keeps_a_quarter_of_the_frame_in_place():
    full = _drawing([[(0, y), (223, y)] for y in range(8, 224, 16)])  # lines over the whole frame
    part = np.asarray(only_part(full, np.random.default_rng(0))) < 128
    ys, xs = np.nonzero(part)
    assert (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) <= 0.26 * 224 * 224
    assert np.array_equal(part, part & (np.asarray(full) < 128))  # the same lines, where they were
    assert part.sum() > 0.2 * (np.asarray(full) < 128).sum()


@pytest.mark.parametrize("end", [(200, 130), (200, 160), (150, 200)])
def test_the_sketch_is_compared_smoothed_with_its_lines_where_they_lie(end):
    """Where a line lies in the sketch locates the place: the drawing a search compares
    (worker.sketch.compared_lines) is smoothed, but adds no ink farther than 2 px from a line
    and cuts no line away."""
    img = Image.new("L", (224, 224), 255)
    ImageDraw.Draw(img).line([(20, 100), end], fill=0, width=2)
    sketch = prepare_sketch(img, 224)
    compared = compared_lines(sketch)
    drawn = sketch_pixels(sketch) < 128
    assert (compared[drawn] < 255).all()  # every line kept, lighter where smoothed
    assert (compared[drawn] > 0).any()  # and smoothed: a 2 px line is no longer full black
    near = ndimage.binary_dilation(drawn, iterations=2)
    assert (compared[~near] == 255).all()


def test_the_compared_smoothing_is_scipys_gaussian_filter_batched_in_torch():
    """The smoothing of every compared drawing (worker.edge_cells.compared_drawings) runs in
    torch, a batch at once on the drawings' device; it is scipy's Gaussian filter, with which
    its sigma was chosen, to one grey level at a rounding tie, at the drawings' sizes and beyond."""
    rng = np.random.default_rng(0)
    for size in (224, 512, 100):
        drawings = np.stack([np.asarray(_drawing([[tuple(rng.integers(0, size, 2)) for _ in range(3)]
                                                   for _ in range(4)], size=size)) for _ in range(6)])
        ours = edge_cells.compared_drawings(torch.from_numpy(drawings)).numpy().astype(int)
        sigma = edge_cells.LINE_SMOOTHING_SIGMA * size / 224
        reference = ndimage.gaussian_filter(drawings.astype(np.float32), (0, sigma, sigma))
        reference[reference > 255 * (1 - edge_cells.SMOOTHING_CUT)] = 255
        reference = np.clip(reference, 0, 255).round().astype(int)
        assert np.abs(ours - reference).max() <= 1
        assert (ours != reference).mean() < 1e-4
        assert (ours != drawings).any()  # smoothed, not handed back as drawn


def test_the_templates_and_the_verification_compare_the_smoothed_sketch():
    """Both of a search's comparisons read the smoothed drawing (chosen on held-out queries,
    docs/benchmarks/quality.md), not the sketch as drawn: the upright template at the drawing's
    own size is that drawing, and the verification's descriptor is made from it."""
    from worker import query_templates
    from worker.verify import describe_sketch

    img = Image.new("L", (224, 224), 255)
    ImageDraw.Draw(img).line([(20, 100), (200, 160), (120, 30)], fill=0, width=2)
    sketch = prepare_sketch(img, 224)
    smoothed = compared_lines(sketch)
    assert not np.array_equal(smoothed, sketch_pixels(sketch))
    templates = query_templates.build(sketch, (224,), (0.0,))
    assert np.array_equal(templates.drawings[(224, 0.0)], smoothed)
    expected = edge_cells.describe(torch.from_numpy(smoothed)[None], edge_cells.FINE)[0]
    assert torch.allclose(describe_sketch(sketch), expected)
