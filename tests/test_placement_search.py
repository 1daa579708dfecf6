"""A sketch is found wherever it lies: off the tile grid, larger or smaller, turned; hits say
where it matched. Real Sentinel-2 tiles (the session index of conftest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lab.placements import iou, random_frame
from lab.pseudo_sketch import has_lines, pseudo_sketch
from worker import edge_cells
from worker.level_maps import level_pixel
from worker.placement import Placement
from worker.ranking import RankingConfig
from worker.search import search
from worker.sketch import prepare_sketch
from worker.store import TileIndex
from worker.tiling import TileReader, TileSettings


@pytest.fixture(scope="module")
def index(s2_index):
    return TileIndex.open(s2_index)


def test_a_tiles_cells_are_its_levels_cells_where_it_is_most_central(index):
    """Each tile stores its drawing's cells on a grid shared by its raster and scale; the level
    map takes every cell from the tile it is most central in, so the middle of a tile is its own."""
    from worker.tile_features import cells_on_grid

    row = int(np.nonzero(index.records["scale"] == 1)[0][7])
    rec = index.records[row]
    level = index.maps[(int(rec["raster_id"]), 1)]
    assert level.level_px == level_pixel(224, 1, 224) == 1.0
    r0, c0 = int(rec["cell_row"]), int(rec["cell_col"])
    own = index.cells_of(np.array([row]))[0]
    centre = slice(8, 20)  # the middle 96 px of the tile's 224: nearer its centre than any neighbour's
    assert np.array_equal(level.cells[r0 + 8:r0 + 20, c0 + 8:c0 + 20], own[centre, centre])
    # the stored cells are the drawing's own, on the shared grid
    tile = index.tile(row)
    with TileReader(tile.raster, 224) as reader:
        image, valid = reader.read(tile)
    from worker.line_drawing import tile_line_drawings

    drawing = tile_line_drawings(image[None], valid[None])[..., 0]
    again, origin = cells_on_grid(drawing, [tile], 224)
    assert np.array_equal(again[0], own) and tuple(origin[0]) == (r0, c0, rec["cell_rows"], rec["cell_cols"])


def test_a_tiles_line_votes_in_the_orientation_it_runs_in_whichever_of_the_nine(index):
    """Tile drawings are binary lines, whose raw gradients point 0, 45, 90 or 135 degrees only: a
    line at 60 degrees voted in none of its own orientation bin, where a sketched line at 60
    degrees votes. The index stores the cells of each drawing smoothed as the sketch is
    (worker.edge_cells.compared_drawings), so a line at the centre of any of the nine bins votes
    most in its own. Measured: share of its votes in its own bin 0.41-1.00 (unsmoothed: 0.00 for
    the five bins between the diagonals)."""
    from worker.tile_features import cells_on_grid

    angles = np.arange(10, 180, 20)  # the centres of the nine 20-degree bins of the gradient
    drawings = []
    for gradient in angles:  # a 2 px line across the drawing, perpendicular to its gradient
        line = np.deg2rad(gradient + 90)
        img = Image.new("L", (224, 224), 255)
        dx, dy = 150 * np.cos(line), 150 * np.sin(line)  # (col, row): gradient angle = atan2(row, col)
        ImageDraw.Draw(img).line([(112 - dx, 112 - dy), (112 + dx, 112 + dy)], fill=0, width=2)
        drawings.append(np.asarray(img))
    tile = index.tile(int(np.nonzero(index.records["scale"] == 1)[0][0]))
    cells, _ = cells_on_grid(np.stack(drawings), [tile] * len(angles), 224)
    votes = edge_cells.dequantise(cells).sum((1, 2))  # (9, ORIENTATIONS)
    own = votes[np.arange(len(angles)), np.arange(len(angles))] / votes.sum(1)
    assert (votes.argmax(1) == torch.arange(len(angles))).all(), votes.argmax(1)
    assert own.min() >= 0.35, own


def test_overlapping_regions_read_together_are_the_regions_read_one_by_one(index):
    """A search reads hundreds of squares of a level map, crowded around its best places
    (worker.store.maps.regions reads those near each other as one block). On a map read from
    disk, every square equals its own read: inside, across the map's edges (blank beyond), near
    each other and apart."""
    from worker.store.maps import MapFile, region, regions

    cells = index.maps[(0, 1)].cells
    assert isinstance(cells, MapFile)
    rows, cols = cells.shape[:2]
    span = 56
    rng = np.random.default_rng(0)
    crowd = [(int(r), int(c)) for r, c in rng.integers(-20, 60, (40, 2))]  # overlapping, some beyond the top-left edge
    apart = [(int(r), int(c)) for r, c in rng.integers(0, min(rows, cols), (10, 2))]
    edge = [(rows - 10, cols - 30), (rows + 5, 3)]  # partly and wholly beyond the map
    corners = crowd + apart + edge
    together = regions(cells, corners, span)
    for got, (r, c) in zip(together, corners):
        assert np.array_equal(got, region(cells, r, c, span))
    assert together[:40].any() and not together[-1].any()


def test_a_placement_reads_what_the_user_sees_in_a_turned_frame(index):
    tile = index.tile(40)
    with TileReader(tile.raster, 224) as reader:
        expected, _ = reader.read(tile)
    centre = (tile.col_off + tile.width / 2, tile.row_off + tile.height / 2)
    straight, valid = Placement(tile.raster, *centre, tile.width).read(224)
    assert np.array_equal(straight, expected) and valid.all()
    turned, _ = Placement(tile.raster, *centre, tile.width, angle=90).read(224)
    assert np.abs(turned.astype(int) - np.rot90(expected, -1).astype(int)).mean() < 1.0  # a frame turned left


@pytest.mark.parametrize("window, out", [((-50, 100, 250, 400), (97, 97)),  # past the left edge, averaged
                                         ((1800, 1850, 2100, 2150), (150, 150)),  # past the bottom-right corner
                                         ((300, -7, 524, 217), (224, 224)),  # past the top, read as is
                                         ((-500, 300, -100, 700), (64, 64))])  # wholly outside
def test_a_place_reaching_past_the_raster_reads_as_gdals_boundless_read(index, window, out):
    """Places at a raster's edge are read only where they lie inside (GDAL's boundless read is
    slow): the values of the boundless read wherever an output pixel lies wholly inside (to
    GDAL's rounding when averaging: 1 apart at most), masked beyond; only the pixels the edge
    cuts are masked too."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from worker.tiling import read_reaching_past

    raster = index.rasters[0]
    bands = list(raster.bands)
    col0, row0, col1, row1 = window
    resampling = Resampling.average if col1 - col0 > out[1] else Resampling.bilinear
    with rasterio.open(raster.path) as src:
        assert (src.width, src.height) == (1933, 1947)
        got = read_reaching_past(src, bands, col0, row0, col1, row1, out, resampling)
        expected = src.read(bands, window=Window(col0, row0, col1 - col0, row1 - row0), out_shape=(len(bands), *out),
                            resampling=resampling, masked=True, boundless=True)
    assert got.shape == expected.shape
    got_valid, expected_valid = ~np.ma.getmaskarray(got).any(0), ~np.ma.getmaskarray(expected).any(0)
    assert not (got_valid & ~expected_valid).any()  # nothing past the edge is read as data
    cut = expected_valid & ~got_valid  # valid in the boundless read, masked here
    rest = cut.copy()
    rest[:, cut.sum(0).argmax()] = False
    rest[cut.sum(1).argmax(), :] = False
    assert not rest.any()  # only the column and the row the edge cuts
    assert np.abs(got.data[:, got_valid].astype(np.int64) - expected.data[:, got_valid]).max(initial=0) <= 1
    assert got_valid.any() == (window != (-500, 300, -100, 700))


def _sketch_of(frame: Placement, style: str = "simple"):
    image, valid = frame.read(224)
    return prepare_sketch(pseudo_sketch(image, style, valid=valid), 224)


def test_an_off_grid_larger_turned_sketch_is_found_where_it_lies(index, model):
    """The issue's case: a window shifted by half a tile from the grid, 1.4x a tile's side,
    turned by 10 degrees. Measured: rank 1, IoU 0.91 with the sketched window, at scale 2 turned
    10 degrees (0.96 with two template sizes, not four; the tile ranker of index format 3 had no
    hit with IoU over 0.14 in its top 5)."""
    raster = index.rasters[0]
    frame = Placement(raster, cx=3.5 * 168 + 112 + 84, cy=5 * 168 + 112 + 84, side=1.4 * 224, angle=10.0)
    hits = search(index, model, _sketch_of(frame), top=5).hits
    overlaps = [iou(h.footprint_pixels(), frame.pixel_polygon()) for h in hits]
    assert max(overlaps) >= 0.5, overlaps
    best = hits[int(np.argmax(overlaps))]
    assert abs(best.placement.angle - 10.0) <= 10.0 and best.scale == 2


@pytest.mark.parametrize("frame_angle, coarse_angle", [(10.0, 0.0), (0.0, -10.0), (-10.0, 10.0)])
def test_the_fine_score_chooses_the_turn_of_a_place(index, model, frame_angle, coarse_angle):
    """The coarse scan's 32 px cells tell turns 10 degrees apart poorly, so a place often reaches
    the refine at the wrong turn; there it is scored at every turn and keeps its best (held-out
    recall@5 0.708 -> 0.735, docs/benchmarks/quality.md). A peak at the sketched place, handed
    over at another turn, leaves at the frame's."""
    from worker import query_templates
    from worker.candidates import Candidate
    from worker.placement_scan import refine, scanner_of

    frame = Placement(index.rasters[0], cx=6 * 168 + 112 + 40, cy=4 * 168 + 112 + 40, side=224.0, angle=frame_angle)
    ranking = RankingConfig()
    templates = query_templates.build(_sketch_of(frame), ranking.sizes, ranking.angles, model.device)
    key = (0, 1)  # raster 0 at scale 1: one level px a raster px
    peak = Candidate(key, 224, coarse_angle, row=int(frame.cy - 112) // 8, col=int(frame.cx - 112) // 8, coarse=0.0)
    with torch.inference_mode():
        refine(scanner_of(index, model.device), templates, ranking, [peak], [key])
    assert peak.angle == frame_angle
    assert iou(peak.placement(index.maps[key]).pixel_polygon(), frame.pixel_polygon()) >= 0.8


def test_sketches_anywhere_are_found_in_the_top_5(index, model):
    """12 frames anywhere in the scene (random offset, 0.6-1.6x a tile, turned up to 15
    degrees; fixed seed), drawn as traced lines. Measured: 11 of 12 in the top 5 with IoU >= 0.25
    (the same with the sketch compared smoothed or not; 9 before the fine score chose each
    place's turn; 10 with two template sizes, not four; 9 before tile drawings held the big
    lines); the tile ranker of index format 3 found 4."""
    rng = np.random.default_rng(3)
    settings = TileSettings(scales=(1, 2))
    found = tried = 0
    while tried < 12:
        frame = random_frame(index.rasters[0], settings, "free", rng)
        image, valid = frame.read(224)
        if not has_lines(image, valid):
            continue
        tried += 1
        hits = search(index, model, _sketch_of(frame), top=5).hits
        found += any(iou(h.footprint_pixels(), frame.pixel_polygon()) >= 0.25 for h in hits)
    assert found >= 9, f"only {found} of 12"


def test_a_sketch_of_the_tile_at_the_rasters_far_edge_meets_that_tiles_own_drawing(index, model):
    """The last tile of a row is moved in to end at the raster's edge, off its level's cell grid,
    so it holds 27 whole cells a side, not 28. A sketch drawn exactly on it is compared with its
    own stored drawing (worker.tile_windows) like any other tile's, and that window is the best
    tile window (measured: IoU 0.97 with the frame; before, such tiles were left out and the
    best tile window did not overlap the frame at all)."""
    from worker import query_templates
    from worker.placement_scan import coarse_peaks, scanner_of
    from worker.search_area import SearchArea
    from worker.tile_windows import TILE_CELLS, tile_window_candidates
    from worker.verify import describe_sketch

    rec = index.records
    edge = np.nonzero((rec["scale"] == 1) & (rec["cell_cols"] == TILE_CELLS - 1) & (rec["cell_rows"] == TILE_CELLS))[0]
    tile = index.tile(int(edge[len(edge) // 2]))
    assert tile.col_off + tile.width == tile.raster.width  # it ends at the raster's edge
    frame = Placement(tile.raster, tile.col_off + 112, tile.row_off + 112, 224.0)
    sketch = _sketch_of(frame)
    ranking = RankingConfig()
    templates = query_templates.build(sketch, ranking.sizes, ranking.angles, model.device)
    candidates = coarse_peaks(scanner_of(index, model.device), templates, ranking, SearchArea.of(index), ranking.shortlist)
    windows = tile_window_candidates(index, templates, candidates, describe_sketch(sketch), ranking.tile_windows,
                                     ranking.inked_only)
    best = windows[0].placement(index.maps[windows[0].map_key])
    assert iou(best.pixel_polygon(), frame.pixel_polygon()) >= 0.9


def test_the_tiles_under_the_peaks_do_not_depend_on_how_their_pairs_are_split(index, model):
    """Tile windows come from the tiles under the best 800 coarse peaks, each peak compared with
    the band of tiles its rows meet, a bounded number of pairs at a time (a raster of a continent
    in one map puts thousands of tiles in each band). Split into runs of at most 300 pairs, the
    tiles and their scores are those compared all at once (measured: 175 tiles under the scene's
    800 peaks; 176 under 525 with two template sizes)."""
    from worker import query_templates
    from worker.placement_scan import coarse_peaks, scanner_of
    from worker.search_area import SearchArea
    from worker.tile_windows import tiles_under

    frame = Placement(index.rasters[0], 700.0, 900.0, 250.0, angle=5.0)
    ranking = RankingConfig()
    templates = query_templates.build(_sketch_of(frame), ranking.sizes, ranking.angles, model.device)
    peaks = coarse_peaks(scanner_of(index, model.device), templates, ranking, SearchArea.of(index), 800)
    whole = tiles_under(index, peaks)
    assert len(peaks) > 400 and len(whole) > 100, (len(peaks), len(whole))
    assert tiles_under(index, peaks, pairs_at_once=300) == whole


def test_a_mosaic_of_small_rasters_is_scanned_as_each_raster_alone(tmp_path, model, assets, monkeypatch):
    """Small level maps are scanned in batches, padded to one shape (a mosaic of 1,000 small
    rasters took 12 times as long scanned one map at a time). The padding is never a place, and a
    map view over some rasters of a batch finds places only in those: the peaks are those of each
    map scanned alone, for the whole mosaic and for a view over part of it."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from shapely.geometry import box

    from conftest import write_raster
    from worker import placement_scan, query_templates
    from worker.geo import bbox_to_wgs84
    from worker.search_area import SearchArea
    from worker.store import IndexWriter

    with rasterio.open(assets["s2_rgb"]) as src:
        pixels = src.read(window=((0, 1100), (0, 1100)))
    utm = CRS.from_epsg(32618)
    rasters = []
    for i, (side, r, c) in enumerate([(300, 0, 0), (260, 0, 300), (300, 300, 0), (330, 300, 300), (240, 640, 100),
                                      (300, 640, 400), (280, 0, 700), (360, 700, 700)]):
        rasters.append(write_raster(tmp_path / f"chip{i}.tif", np.ascontiguousarray(pixels[:, r:r + side, c:c + side]),
                                    crs=utm, transform=from_origin(500_000 + c * 10, 4_000_000 - r * 10, 10, 10)))
    IndexWriter(tmp_path / "index", model, TileSettings(scales=(1,))).build(rasters)
    mosaic = TileIndex.open(tmp_path / "index")
    shapes = {key: level.cells.shape[:2] for key, level in mosaic.maps.items()}
    assert len(placement_scan.batch_maps(shapes)) < len(shapes) // 2  # they are scanned in batches

    frame = Placement(mosaic.rasters[3], 150.0, 160.0, 200.0, angle=5.0)
    ranking = RankingConfig()
    templates = query_templates.build(_sketch_of(frame), ranking.sizes, ranking.angles, model.device)
    view = bbox_to_wgs84((500_000 + 2_500, 4_000_000 - 6_000, 500_000 + 6_000, 4_000_000 - 2_000), utm)  # 4 chips, in part
    areas = {"whole": SearchArea.of(mosaic), "view": SearchArea.of(mosaic, None, view)}
    assert len(areas["view"].keys) < len(mosaic.maps) and areas["view"].boxes

    def peaks(area):
        found = placement_scan.coarse_peaks(placement_scan.Scanner(mosaic, model.device), templates, ranking, area, 300)
        return {(c.map_key, c.size, c.angle, c.row, c.col): c.coarse for c in found}

    batched = {name: peaks(area) for name, area in areas.items()}
    monkeypatch.setattr(placement_scan, "SMALL_MAP_CELLS", 0)  # every map alone, as before batches
    for name, area in areas.items():
        alone = peaks(area)
        assert len(alone) > 20 and set(batched[name]) == set(alone), name
        assert max(abs(batched[name][k] - alone[k]) for k in alone) < 1e-3, name
    assert {k[0] for k in batched["view"]} <= set(areas["view"].keys)


def test_a_partial_sketch_is_verified_only_where_it_has_lines(index):
    """A user who draws half of a place leaves the other half blank; the verification measures
    the place only where the sketch has lines, so the place is not marked down for what was left
    out, and it still scores above other places. Measured on a tile of the scene drawn by the
    worker, its right half erased as the sketch, both compared smoothed as a search compares them:
    its own place 0.88 (0.73 over the whole frame), the best of 20 other tiles 0.40 (0.26 over the
    whole frame). (Both unsmoothed: 0.89 (0.73) against 0.52 (0.34).)"""
    from worker.verify import describe_drawings, drawing_cosine, draw_placements

    rows = np.nonzero(index.records["scale"] == 1)[0]
    places = [Placement(t.raster, t.col_off + 112, t.row_off + 112, 224.0) for t in map(index.tile, rows[20:41])]
    drawings = draw_placements(places, 224)
    half = drawings[:1].copy()
    half[:, :, 112:] = 255
    described, sketch = describe_drawings(drawings), describe_drawings(half)[0]
    inked = drawing_cosine(described, sketch, inked_only=True)
    whole = drawing_cosine(described, sketch, inked_only=False)
    assert inked[0] >= 0.85 and whole[0] <= 0.78, (float(inked[0]), float(whole[0]))
    assert inked[0] > inked[1:].max() + 0.3, (float(inked[0]), float(inked[1:].max()))


def test_places_verified_as_on_a_gpu_are_described_as_on_the_cpu(index):
    """On a GPU, verification draws and describes its places there, a batch at once
    (worker.line_drawing.drawing_device). The CPU standing in for the GPU runs that path here:
    the descriptors of 12 places, some turned and some reaching past the raster's edge, must be
    the CPU path's."""
    from worker.verify import describe_places

    rows = np.nonzero(index.records["scale"] == 1)[0]
    tiles = list(map(index.tile, rows[:12]))
    places = [Placement(t.raster, t.col_off + 40 * (i % 3), t.row_off + 112, 224.0 + 16 * i, angle=10.0 * (i % 3 - 1))
              for i, t in enumerate(tiles)]
    assert any(p.window()[0] < 0 or p.window()[1] < 0 for p in places)  # past the raster's edge
    on_cpu = describe_places(places, 224)
    as_on_gpu = describe_places(places, 224, torch.device("cpu"))
    assert on_cpu.shape == (12, on_cpu.shape[1]) and on_cpu.abs().sum() > 0
    assert torch.equal(as_on_gpu, on_cpu)


def test_a_few_strokes_sketch_meets_its_place_in_the_big_lines_of_the_drawing(index, assets):
    """A person sketching a place draws a few of its big lines. Tile drawings hold the edges at
    3 px and the big lines at 6 px (worker.line_drawing), so a few-strokes sketch of a tile (3-8
    long lines, simplified, with a real hand's wobble) meets its own place more closely. Measured
    over 30 tiles of the scene, each sketch against all 30 places (the verification's cosine,
    where the sketch has lines, sketch and places smoothed as a search compares them): its own
    place first for all 30 either way, by a mean margin of 0.354 over the best other place (own
    cosine 0.728); drawn at 3 px only, 0.305. (With only the sketch smoothed, the tiles' binary
    lines voting in 4 of the 9 orientations: 0.199 (0.511) against 0.181.)"""
    from pathlib import Path

    from lab.pseudo_sketch import load_hand_strokes
    from worker.line_drawing import TILE_EDGE_SIGMA, draw_edges, edge_maps, tile_line_drawings
    from worker.verify import describe_drawings, describe_sketch, drawing_cosine

    rows = np.nonzero(index.records["scale"] == 1)[0]
    places = [Placement(t.raster, t.col_off + 112, t.row_off + 112, 224.0) for t in map(index.tile, rows[10:80])]
    pixels = [place.read(224) for place in places]
    keep = [i for i, (image, valid) in enumerate(pixels) if has_lines(image, valid)][:30]
    pixels = [pixels[i] for i in keep]
    hand = load_hand_strokes(Path(assets["lasa_dir"]))
    rng = np.random.default_rng(0)
    sketches = [describe_sketch(prepare_sketch(pseudo_sketch(image, "strokes", rng=rng, hand_strokes=hand, valid=valid), 224))
                for image, valid in pixels]
    images, masks = np.stack([image for image, _ in pixels]), np.stack([valid for _, valid in pixels])
    fine_only = np.stack([np.asarray(draw_edges(e, 224)) for e in edge_maps(images, TILE_EDGE_SIGMA, masks)])

    def own_and_margin(drawings: np.ndarray) -> tuple[float, float]:
        described = describe_drawings(drawings)
        cosines = torch.stack([drawing_cosine(described, sketch, inked_only=True) for sketch in sketches])
        own = cosines.diagonal()
        best_other = (cosines - 10 * torch.eye(len(cosines))).max(1).values
        assert (own > best_other).all()
        return float(own.mean()), float((own - best_other).mean())

    assert len(pixels) == 30
    (own, margin), (_, margin_fine) = own_and_margin(tile_line_drawings(images, masks)[..., 0]), own_and_margin(fine_only)
    assert own >= 0.70 and margin >= 0.33, (own, margin)
    assert margin > margin_fine + 0.03, (margin, margin_fine)


def test_the_papers_ranker_and_the_token_score_run_on_an_index_with_tokens(index, model, assets, tmp_path):
    """`--ranker tokens` (global-token shortlist over tiles, cross-attention re-rank) returns tile
    windows; the layout ranker with a token weight scores its placements with the aligned
    cross-attention. Both need an index built with tokens; on the default index, without them,
    they are refused with what to do."""
    from rasterio.crs import CRS

    from worker.errors import InputError
    from worker.geo import bbox_to_wgs84, reproject_rings
    from worker.store import WGS84, IndexWriter
    from worker.tiling import TileSettings

    tile = index.tile(int(np.nonzero(index.records["scale"] == 1)[0][20]))
    frame = Placement(tile.raster, tile.col_off + 112, tile.row_off + 112, 224.0)
    sketch = _sketch_of(frame, "canny")
    for ranking in (RankingConfig(ranker="tokens"), RankingConfig(token_weight=0.5)):
        with pytest.raises(InputError, match="index --tokens"):
            search(index, model, sketch, ranking, top=5)
    IndexWriter(tmp_path / "tokens", model, TileSettings(scales=(1,)), tokens=True).build([assets["s2_rgb"]])
    index = TileIndex.open(tmp_path / "tokens")
    tiles = search(index, model, sketch, RankingConfig(ranker="tokens"), top=5).hits
    assert len(tiles) == 5 and all(h.placement.angle == 0 and h.token_score is not None for h in tiles)
    raster = index.rasters[0]  # the paper's ranker shortlists tiles inside a search's area, too
    (x0, x1), (y0, y1) = raster.affine * (np.array([0.0, raster.width / 2]), np.array([raster.height / 2, raster.height]))
    corner = bbox_to_wgs84((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), CRS.from_wkt(raster.crs_wkt))
    inside = search(index, model, sketch, RankingConfig(ranker="tokens", shortlist=10), top=5, area_wgs84=corner).hits
    assert len(inside) == 5 and all(p.intersects(corner) for p in reproject_rings([h.placement for h in inside], WGS84))
    placed = search(index, model, sketch, RankingConfig(token_weight=0.5), top=5).hits
    assert any(h.token_score is not None for h in placed)
    assert iou(placed[0].footprint_pixels(), frame.pixel_polygon()) >= 0.5


def test_a_raster_rewritten_between_searches_is_read_anew(tmp_path, assets):
    """Verification keeps rasters open between searches (GDAL keeps their decoded blocks); a file
    written again in place must not be drawn from the old handle."""
    import rasterio

    from conftest import write_raster
    from worker.line_drawing import tile_line_drawings
    from worker.tiling import open_raster
    from worker.verify import draw_placements

    with rasterio.open(assets["s2_rgb"]) as src:
        land = src.read(window=((112, 560), (448, 896)))
        profile = {"crs": src.crs, "transform": src.transform}
    path = write_raster(tmp_path / "scene.tif", land, **profile)
    frame = Placement(open_raster(path, None), cx=224, cy=224, side=224, angle=10.0)
    before = draw_placements([frame], 224)
    write_raster(path, np.ascontiguousarray(land[:, ::-1]), **profile)  # the same file, its rows upside down
    after = draw_placements([frame], 224)
    image, valid = frame.read(224)
    assert np.array_equal(after, tile_line_drawings(image[None], valid[None])[..., 0])
    assert (before != after).mean() > 0.02


def test_a_place_found_from_several_neighbourhoods_keeps_its_best_finding():
    """The ANN's neighbourhoods overlap, so a place is found several times over; only its first
    finding in score order (the best) goes on. Same positions as np.unique's first occurrences,
    on a table of many repeats, empty and all-distinct tables included."""
    from worker.placement_scan import first_of_each

    rng = np.random.default_rng(0)
    for rows in (rng.integers(0, 3, (2000, 5)), np.zeros((0, 5), np.int64), np.arange(12).reshape(4, 3)):
        expected = np.sort(np.unique(rows, axis=0, return_index=True)[1]) if len(rows) else np.zeros(0)
        assert first_of_each(rows).tolist() == expected.tolist()


@pytest.mark.parametrize("radius", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("shape", [(3, 1, 17, 23), (2, 1, 3, 40)])
def test_a_peak_is_compared_with_every_score_in_its_square(radius, shape):
    """A local peak must equal the best score in the square around it (rows, then columns, each a
    running max): the same as one square max-pool, at the map's edges and corners too, on ties,
    where no template fits (-inf) and in maps narrower than the square."""
    from worker.placement_scan import neighbourhood_max

    scores = torch.randn(shape)
    scores[0, 0, :5, :5] = 2.0  # a plateau in a corner
    scores[-1, 0, :, -4:] = -torch.inf  # past where a template fits
    square = torch.nn.functional.max_pool2d(scores, 2 * radius + 1, stride=1, padding=radius)
    assert torch.equal(neighbourhood_max(scores, radius), square)


@pytest.mark.parametrize("inked_only", [True, False])
def test_templates_of_several_sides_score_in_one_pass_as_each_window_compared_alone(inked_only):
    """The scans score templates of every size in one convolution (edge_cells.cosine_maps, the
    smaller ones padded): each size's cosine at every position equals that window's blocks
    compared with the template directly (only where the template has lines when `inked_only`),
    on maps taller than wide, with blank windows scoring 0."""
    from worker.edge_cells import COARSE

    step, gap = 2, COARSE.span // 2
    rng = np.random.default_rng(4)
    blocks = torch.from_numpy(rng.random((2, COARSE.dim, 19, 15), np.float32))
    blocks[1, :, :9, :9] = 0  # a blank corner
    templates = {side: torch.from_numpy(rng.random((3, side, side, COARSE.dim), np.float32)) for side in (2, 3, 5)}
    for t in templates.values():
        t[1, 0] = 0  # a turned template's blank row
    scores = edge_cells.cosine_maps(blocks, templates, COARSE, step, inked_only)
    for side, t in templates.items():
        rows, cols = 19 - (side - 1) * gap, 15 - (side - 1) * gap
        assert scores[side].shape == (2, 3, rows, cols)
        for b, a, r, c in [(0, 0, 0, 0), (0, 1, rows - 1, cols - 1), (1, 2, rows // 2, 0), (1, 1, 0, cols - 1)]:
            window = blocks[b, :, r:r + (side - 1) * gap + 1:gap, c:c + (side - 1) * gap + 1:gap].permute(1, 2, 0)
            inked = t[a].norm(dim=2) > 0 if inked_only else torch.ones(side, side, dtype=torch.bool)
            expected = (window * t[a]).sum() / (window[inked].norm() * t[a].norm() + 1e-6)
            assert float(scores[side][b, a, r, c]) == pytest.approx(float(expected), abs=1e-5)
        assert float(scores[side][1, :, 0, 0].abs().max()) == 0  # blank windows score 0 (the corner)
    with pytest.raises(ValueError, match="do not fit"):  # a set too large is refused, not scored from the padding
        edge_cells.cosine_maps(blocks[:, :, :5], templates, COARSE, step, inked_only)
