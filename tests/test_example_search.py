"""Query by example, hit ids and relevance feedback on a real raster (worker.example_query,
worker.hit_ids, worker.feedback through worker.query_search)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from shapely.geometry import Polygon

from conftest import write_raster
from worker.errors import ForbiddenError, InputError
from worker.example_query import Example, OwnPlace, prepare_example
from worker.feedback import Feedback
from worker.hit_ids import hit_id, parse_hit_id, raster_key
from worker.query_search import own_places, search_query
from worker.ranking import RankingConfig
from worker.raster_access import RasterAccess

WINDOW = (200, 100, 330, 230)  # col0, row0, col1, row1 of rmnp: a ridge and valleys, off the tile grid


@pytest.fixture(scope="module")
def rmnp_index(tmp_path_factory, assets, model):
    from worker.store import IndexWriter, TileIndex
    from worker.tiling import TileSettings

    out = tmp_path_factory.mktemp("rmnp") / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1, 2))).build([assets["rmnp_rgb"]])
    return TileIndex.open(out)


def window_bbox(path, window=WINDOW, crs: str | None = None) -> list[float]:
    with rasterio.open(path) as src:
        c0, r0, c1, r1 = window
        x0, y1 = src.transform * (c0, r0)
        x1, y0 = src.transform * (c1, r1)
        if crs:
            return list(transform_bounds(src.crs, CRS.from_user_input(crs), x0, y0, x1, y1))
        return [x0, y0, x1, y1]


def own_overlap(hits, query) -> list[tuple[float, float]]:
    """Each hit's IoU with the square drawn around the example, and its share inside the box."""
    from worker.geo import reproject_rings

    polygons = reproject_rings([h.placement for h in hits], CRS.from_wkt(query.raster.crs_wkt))
    square, box = query.own_place.square, query.own_place.box
    return [(p.intersection(square).area / p.union(square).area, p.intersection(box).area / p.area) for p in polygons]


@pytest.mark.parametrize("window", [WINDOW, (180, 100, 360, 160), (40, 40, 340, 340)], ids=["square", "3 to 1", "large"])
def test_an_example_finds_its_own_place_and_leaves_it_out(rmnp_index, model, assets, window):
    """Its own place is the square drawn around the box, which the search finds: a long
    rectangle's own square overlaps the rectangle by IoU 1/3 only. A place inside a large
    example, its IoU with it small, is its own place too (by IoU, one came back at rank 1)."""
    rasters = list(rmnp_index.rasters.values())
    query = prepare_example(Example(str(assets["rmnp_rgb"]), tuple(window_bbox(assets["rmnp_rgb"], window)), "EPSG:4326"),
                            rasters, model.img_size)
    assert query.window == pytest.approx(window, abs=0.01)
    assert query.raster == rasters[0], "an indexed raster is drawn with the index's bands and stretch"
    plain = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=5).hits
    assert max(own_overlap(plain, query)[0]) > 0.5, "the worker's drawing of a place finds that place first"
    hits = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=5, own_place=query.own_place).hits
    assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert max(max(overlaps) for overlaps in own_overlap(hits, query)) <= 0.5


@pytest.mark.parametrize("window", [(100, 0, 485, 373), (0, 50, 485, 300)], ids=["east 4/5", "middle 2/3"])
def test_a_large_example_still_gets_as_many_hits_as_there_are_places_outside_it(rmnp_index, model, assets, window):
    """A box over most of a raster makes most of the best places its own: the search was asked
    for `top` + 5 places and then left its own out, so --top 2 gave 1 hit where a larger top
    showed 3 (and --top 1 could give none, with a warning to raise --shortlist, which did not
    help: the example probe). Its own places still keep places overlapping them out, and the
    verification goes to the places shown (the review)."""
    rasters = list(rmnp_index.rasters.values())
    query = prepare_example(Example(str(assets["rmnp_rgb"]), tuple(window_bbox(assets["rmnp_rgb"], window)),
                                    "EPSG:4326"), rasters, model.img_size)
    every = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=100, own_place=query.own_place).hits
    assert len(every) >= 3
    for top in (2, 3, 5):
        hits = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=top, own_place=query.own_place).hits
        assert [h.placement for h in hits] == [h.placement for h in every[:top]], top
        # verified, with a score: the verification went to its own places, and hits were shown unscored
        # (below the places verified, ranking.verify of them, a hit is unscored, as in any search)
        assert top > 3 or all(h.score is not None for h in hits), [h.score for h in hits]
    assert max(max(overlaps) for overlaps in own_overlap(every, query)) <= 0.5


def test_the_own_place_is_the_examples_square_or_what_lies_mostly_inside_its_box(rmnp_index):
    """A long box (300 x 100 px) and the square drawn around it: the square itself, a place half
    its size inside the box, and a smaller one at the box's edge are the example's own place; a
    place in the square's blank margin, outside the box, is another, as is a place four times
    the box's size containing it (by the smaller's share, both were left out)."""
    from worker.placement import Placement

    raster = next(iter(rmnp_index.rasters.values()))
    c0, r0, c1, r1 = 100.0, 150.0, 400.0, 250.0
    corners = [raster.affine * corner for corner in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))]
    square = Placement(raster, 250, 200, 300)
    own = OwnPlace(Polygon(square.ring()), Polygon(corners), CRS.from_wkt(raster.crs_wkt))
    places = {"the square": (square, True), "inside the box": (Placement(raster, 200, 200, 100), True),
              "mostly inside, at its edge": (Placement(raster, 380, 200, 60), True),
              "in the square's margin": (Placement(raster, 250, 90, 90), False),
              "four times its size, around it": (Placement(raster, 250, 200, 1200), False)}
    got = own_places([p for p, _ in places.values()], own)
    assert dict(zip(places, got)) == {name: is_own for name, (_, is_own) in places.items()}


@pytest.mark.parametrize("west, twin_west", [(179.99, -180.01), (190.0, -170.0), (-190.0, 170.0)])
def test_the_same_ground_in_another_longitude_frame_is_the_same_place(tmp_path, west, twin_west):
    """Two lon/lat rasters of the same ground, one written across or past 180 degrees (179.99 to
    180.01, or 0 to 360 as Pacific data often is), or past -180, and one in -180..180: an example
    on one came back as a hit from the other, and a place marked bad on one came back from the
    other at #1 (found by a probe), while each worked the other way round. Each is now the other's
    place."""
    from rasterio.transform import from_origin

    from worker.errors import InputError
    from worker.geo import reproject_rings
    from worker.placement import Placement
    from worker.query_search import marked_bad, refuse_one_place_good_and_bad
    from worker.tiling import open_raster

    pixels = np.full((3, 200, 200), 90, np.uint8)
    rasters = [open_raster(write_raster(tmp_path / f"{name}.tif", pixels, crs=CRS.from_epsg(4326),
                                        transform=from_origin(x, -17.0, 1e-4, 1e-4)), None)
               for name, x in (("one", west), ("twin", twin_west))]
    for own_raster, other_raster in (rasters, rasters[::-1]):
        place, twin = Placement(own_raster, 100, 100, 80.0), Placement(other_raster, 100, 100, 80.0)
        own = OwnPlace(Polygon(place.ring()), Polygon(place.ring()), CRS.from_epsg(4326))
        assert own_places([twin], own) == [True], own_raster.path
        assert marked_bad([twin], reproject_rings([place], CRS.from_epsg(4326)), 0.3) == [True], own_raster.path
        marks = Feedback(positive=(hit_id(place),), negative=(hit_id(twin),))
        with pytest.raises(InputError, match="one place both good and bad"):
            refuse_one_place_good_and_bad(marks, [place], [twin])


def test_an_example_beside_a_raster_its_crs_cannot_place_finds_the_same_ground_there(tmp_path, model, assets):
    """An example on a UTM raster in central Africa (zone 33N) and the same pixels in Ecuador (UTM
    17S, 93 degrees west of that zone's meridian, where transverse Mercator cannot place a
    point): the places found in Ecuador are compared with the example in its own CRS, and PROJ
    refused them, so the search failed with a traceback (the georeferencing probe's). They are
    other places: the copy is found at the top."""
    from rasterio.transform import from_origin

    from worker.store import IndexWriter, TileIndex
    from worker.tiling import TileSettings

    with rasterio.open(assets["rmnp_rgb"]) as src:
        pixels = src.read()
    congo = write_raster(tmp_path / "congo.tif", pixels, crs=CRS.from_epsg(32633),
                         transform=from_origin(700_000, 10_000, 10, 10))
    ecuador = write_raster(tmp_path / "ecuador.tif", pixels, crs=CRS.from_epsg(32717),
                           transform=from_origin(800_000, 9_990_000, 10, 10))
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1, 2))).build([congo, ecuador])
    index = TileIndex.open(out)
    query = prepare_example(Example(str(congo), tuple(window_bbox(congo)), "EPSG:32633"),
                            list(index.rasters.values()), model.img_size)
    hits = search_query(index, model, query.sketch, RankingConfig(), top=3, own_place=query.own_place).hits
    c0, r0, c1, r1 = WINDOW
    there = Polygon([(c0, r0), (c1, r0), (c1, r1), (c0, r1)])
    best = hits[0]
    assert best.placement.raster.path == str(ecuador) and \
        best.footprint_pixels().intersection(there).area / best.footprint_pixels().union(there).area > 0.5


def test_an_example_box_in_another_crs_is_the_same_window(rmnp_index, model, assets):
    rasters = list(rmnp_index.rasters.values())
    box = window_bbox(assets["rmnp_rgb"], crs="EPSG:3857")
    query = prepare_example(Example(str(assets["rmnp_rgb"]), tuple(box), "EPSG:3857"), rasters, model.img_size)
    assert query.window == pytest.approx(WINDOW, abs=1.5)  # a box in web mercator, around the raster's window


def test_bad_examples_are_refused_with_what_to_do(rmnp_index, model, assets, tmp_path):
    rasters = list(rmnp_index.rasters.values())
    path = str(assets["rmnp_rgb"])
    with pytest.raises(InputError, match="lies outside") as outside:
        prepare_example(Example(path, (10.0, 10.0, 11.0, 11.0), "EPSG:4326"), rasters, model.img_size)
    assert "latitude first" not in str(outside.value)
    minx, miny, maxx, maxy = window_bbox(path)
    with pytest.raises(InputError, match=r"lies outside .*read as latitude first, it lies on it: give longitude first"):
        prepare_example(Example(path, (miny, minx, maxy, maxx), "EPSG:4326"), rasters, model.img_size)
    with pytest.raises(InputError, match="is empty"):
        Example(path, (-105.5, 40.3, -105.6, 40.4), "EPSG:4326")
    with pytest.raises(InputError, match="its east past 180"):  # a box across 180 written west to east
        Example(path, (179.5, -18.0, -179.5, -16.0), "EPSG:4326")
    with pytest.raises(InputError, match="at least 8 px"):
        prepare_example(Example(path, tuple(window_bbox(path, (200, 100, 203, 200))), "EPSG:4326"), rasters,
                        model.img_size)
    with pytest.raises(InputError, match=r"covers 7\.9x100\.0 pixels .*: at least 8 px"):  # was "covers 8x100"
        prepare_example(Example(path, tuple(window_bbox(path, (200, 100, 207.96, 200))), "EPSG:4326"), rasters,
                        model.img_size)
    with pytest.raises(InputError, match="lies outside"):  # ending on its north edge: was "covers 100x0 pixels"
        prepare_example(Example(path, tuple(window_bbox(path, (100, -40, 200, 0), "EPSG:3857")), "EPSG:3857"),
                        rasters, model.img_size)
    with pytest.raises(InputError, match="unknown CRS|not an authority code"):
        prepare_example(Example(path, tuple(window_bbox(path)), "EPSG:999999"), rasters, model.img_size)
    flat = write_raster(tmp_path / "flat.tif", np.full((3, 200, 200), 90, np.uint8), crs="EPSG:32617",
                        transform=rasterio.Affine(1, 0, 500000, 0, -1, 4000000))
    with pytest.raises(InputError, match="nothing to draw .open water") as flat_refused:
        prepare_example(Example(str(flat), (500010.0, 3999810.0, 500150.0, 3999990.0), "EPSG:32617"), rasters,
                        model.img_size)
    assert "no data" not in str(flat_refused.value) and "too few" not in str(flat_refused.value)
    with pytest.raises(InputError, match=r"nothing to draw \(20\.0x20\.0 px of the raster are too few to draw its lines"):
        prepare_example(Example(str(flat), (500010.0, 3999970.0, 500030.0, 3999990.0), "EPSG:32617"), rasters,
                        model.img_size)  # was blamed on open water, whatever the ground
    utm = (449000.0, 4440000.0, 451000.0, 4442000.0)  # the raster's place in UTM 13N metres, given as lon/lat
    with pytest.raises(InputError, match=r"past a pole .*are these projected coordinates\? Name their CRS"):
        prepare_example(Example(path, utm, "EPSG:4326"), rasters, model.img_size)  # was "lies outside"
    with pytest.raises(InputError, match=r"past a pole .*are these projected coordinates\?"):  # was PROJ's words
        prepare_example(Example(str(flat), (500010.0, 3999810.0, 500150.0, 3999990.0), "EPSG:4326"), rasters,
                        model.img_size)
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 200, 200), np.uint8), crs="EPSG:32617", nodata=0,
                         transform=rasterio.Affine(1, 0, 500000, 0, -1, 4000000))  # was blamed on open water
    with pytest.raises(InputError, match=r"nothing to draw \(it holds no data: nodata or transparent"):
        prepare_example(Example(str(empty), (500010.0, 3999810.0, 500150.0, 3999990.0), "EPSG:32617"), rasters,
                        model.img_size)
    cut_short = tmp_path / "cut-short.tif"  # was `internal`: "Read failed. See previous exception for details."
    cut_short.write_bytes(assets["rmnp_rgb"].read_bytes()[:60_000])
    with pytest.raises(InputError, match=r"cut-short.tif: cannot read its pixels there \(.*got \d+ bytes"):
        prepare_example(Example(str(cut_short), tuple(window_bbox(path, (100, 250, 300, 370))), "EPSG:4326"), rasters,
                        model.img_size)
    latin1 = os.fsdecode(bytes(tmp_path) + b"/K\xfcste.tif")  # was `internal`: a UnicodeEncodeError in rasterio
    shutil.copy(path, latin1)
    with pytest.raises(InputError, match=r"K\\xfcste.tif: its name is not UTF-8, which GDAL reads names as: rename"):
        prepare_example(Example(latin1, tuple(window_bbox(path)), "EPSG:4326"), rasters, model.img_size)
    confined = RasterAccess((tmp_path,))
    with pytest.raises(ForbiddenError, match="outside the raster roots"):
        prepare_example(Example(path, tuple(window_bbox(path)), "EPSG:4326"), rasters, model.img_size, access=confined)


def test_an_example_from_a_raster_outside_the_index_is_drawn_from_its_own_red_green_and_blue(model, assets, tmp_path,
                                                                                             caplog):
    """An index of a sensor's 13-band scenes is built with --bands 4,3,2: an example cut from an
    RGB raster outside it was refused ("band(s) [4] asked for, but the raster has 3"), though
    the user asked nothing of that raster. Its own colour interpretation draws it now, as it
    draws the same pixels in an RGB raster; a raster of the sensor's (no colour
    interpretation) is read by the index's bands; with neither, the refusal says what to do,
    not to pass an option search does not have, as does the warning for three such bands."""
    with rasterio.open(assets["rmnp_rgb"]) as src:
        rgb, profile = src.read(), {"crs": src.crs, "transform": src.transform, "nodata": src.nodata}
    scene = write_raster(tmp_path / "scene.tif", np.stack([rgb[0], rgb[0], rgb[2], rgb[1], rgb[0]]), **profile)
    box = tuple(window_bbox(assets["rmnp_rgb"]))
    as_rgb = prepare_example(Example(str(assets["rmnp_rgb"]), box, "EPSG:4326"), [], model.img_size, bands=(4, 3, 2))
    as_scene = prepare_example(Example(str(scene), box, "EPSG:4326"), [], model.img_size, bands=(5, 4, 3))
    assert as_rgb.raster.bands == (1, 2, 3) and as_scene.raster.bands == (5, 4, 3)
    assert np.array_equal(as_rgb.drawing, as_scene.drawing), "the same place drawn from the same colours"
    with pytest.raises(InputError) as refused:
        prepare_example(Example(str(scene), box, "EPSG:4326"), [], model.img_size)
    assert "cannot tell which of its 5 bands" in str(refused.value) and "--bands" not in str(refused.value)
    assert "cut the example from a raster of the index" in str(refused.value)
    bgr = write_raster(tmp_path / "bgr.tif", rgb[::-1].copy(), photometric="MINISBLACK", **profile)  # names no colour
    as_bgr = prepare_example(Example(str(bgr), box, "EPSG:4326"), [], model.img_size, bands=(3, 2, 1))
    assert as_bgr.raster.bands == (3, 2, 1) and np.array_equal(as_bgr.drawing, as_rgb.drawing)
    with caplog.at_level(logging.WARNING, logger="worker.tiling"):
        assert prepare_example(Example(str(bgr), box, "EPSG:4326"), [], model.img_size).raster.bands == (1, 2, 3)
    assert "read as R,G,B = 1,2,3" in caplog.text and "pass --bands" not in caplog.text, caplog.text
    assert f"gdal_edit.py -colorinterp_1 red -colorinterp_2 green -colorinterp_3 blue {bgr}" in caplog.text


def test_an_example_from_a_copy_of_an_indexed_raster_is_searched_as_from_the_raster(rmnp_index, model, assets,
                                                                                      tmp_path):
    """The same pixels at another path (a copy, a sheet of an indexed mosaic) were drawn whole
    where the indexed raster's were cut to their central square, found other places, and said
    nothing of a box larger than the index finds (probe). Measured as the index sees that place,
    they are searched alike and said alike."""
    from worker.app import SearchRequest, run_search

    copy = Path(shutil.copy(assets["rmnp_rgb"], tmp_path / "copy.tif"))
    large = (10, 10, 400, 400)  # 390 px: larger than this index finds (about 57 to 362 px)
    replies = [run_search(SearchRequest(None, example=Example(str(p), tuple(window_bbox(p, large)), "EPSG:4326"),
                                        top=5), model, rmnp_index) for p in (assets["rmnp_rgb"], copy)]
    indexed, copied = ([(h.placement.cx, h.placement.cy, h.placement.side) for h in r.ranked] for r in replies)
    assert copied == indexed and len(copied) >= 3
    [said] = replies[1].out_of_scale
    assert said["raster"] == str(assets["rmnp_rgb"]) and said["side_px"] == pytest.approx(390, abs=0.5)
    assert "central 256 px were searched" in said["reason"]
    assert [s["reason"] for s in replies[0].out_of_scale] == [said["reason"]]


def test_an_example_box_reaching_past_its_raster_says_that_its_part_on_it_was_searched(rmnp_index, model, assets):
    """A box across a raster's edge (a sheet's seam) was searched by its part on the raster, and
    nothing said so (probe)."""
    from worker.app import SearchRequest, run_search

    path = assets["rmnp_rgb"]
    search = lambda window: run_search(SearchRequest(None, example=Example(str(path), tuple(window_bbox(path, window)),
                                                                           "EPSG:4326"), top=2), model, rmnp_index)
    [cut] = search((-100, 100, 100, 300)).example_cut
    assert cut["raster"] == str(path) and "only its part on it (50% of the box, 100.0x200.0 px)" in cut["reason"]
    assert "VRT" in cut["reason"]
    assert search((100, 100, 300, 300)).example_cut == [], "a box on the raster: nothing to say"
    assert search((-5, 100, 200, 300)).example_cut == [], "a box dragged a little past the edge: nothing to say"



def test_a_lon_lat_box_on_a_turned_grid_is_not_said_to_reach_past_its_raster(tmp_path):
    """A lon/lat box lies turned on a UTM grid far from its central meridian: its bounds there
    reach past the raster where the box does not (review)."""
    from rasterio.warp import transform as warp

    from worker.example_query import cut_to_raster, pixel_box
    from worker.tiling import open_raster

    utm = write_raster(tmp_path / "far-east.tif", np.full((3, 400, 400), 90, np.uint8), crs="EPSG:32617",
                       transform=rasterio.Affine(30, 0, 790000, 0, -30, 6700000))  # ~60 N, 6 degrees east of -81
    raster = open_raster(utm, None)
    # the lon/lat box round the raster's pixels 120 to 400 (its east edge), 60 to 340: turned on the
    # grid, its corners poke 3.5% of it past the edge, and its bounds 6.6% (said, before)
    (lon0, lon1), (lat0, lat1) = warp("EPSG:32617", "EPSG:4326", [790000 + 30 * 120, 790000 + 30 * 400],
                                      [6700000 - 30 * 340, 6700000 - 30 * 60])
    inside = Example(str(utm), (min(lon0, lon1), min(lat0, lat1), max(lon0, lon1), max(lat0, lat1)), "EPSG:4326")
    assert cut_to_raster(inside, raster, pixel_box(inside, raster)) is None
    w = (max(lon0, lon1) - min(lon0, lon1))
    reaching = Example(str(utm), (min(lon0, lon1) + 0.5 * w, min(lat0, lat1), max(lon0, lon1) + 0.5 * w,
                                  max(lat0, lat1)), "EPSG:4326")  # its eastern half past the raster
    assert "reaches past this raster" in cut_to_raster(reaching, raster, pixel_box(reaching, raster))


def test_hit_ids_name_places_and_are_checked_against_the_index(rmnp_index, model, assets):
    rasters = rmnp_index.rasters
    query = prepare_example(Example(str(assets["rmnp_rgb"]), tuple(window_bbox(assets["rmnp_rgb"])), "EPSG:4326"),
                            list(rasters.values()), model.img_size)
    hit = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=1).hits[0]
    text = hit_id(hit.placement)
    assert text.startswith(raster_key(hit.placement.raster) + "@")
    back = parse_hit_id(text, rasters)
    assert (back.raster, back.cx, back.cy, back.side, back.angle) == pytest.approx(
        (hit.placement.raster, hit.placement.cx, hit.placement.cy, hit.placement.side, hit.placement.angle), abs=0.01)
    shouted = parse_hit_id(text.upper(), rasters)  # as a spreadsheet's UPPER() or a field calculator leaves it
    assert (shouted.raster, shouted.cx, shouted.cy) == (back.raster, back.cx, back.cy)
    with pytest.raises(InputError, match="both good and bad"):  # one place, however its id is written
        Feedback((text,), (text.upper(),))
    with pytest.raises(InputError, match="not in this index"):
        parse_hit_id("0123456789@10.00,10.00,50.00,0.00", rasters)
    with pytest.raises(InputError, match="not a hit id"):
        parse_hit_id("rank 1", rasters)
    with pytest.raises(InputError, match="not a place in"):
        parse_hit_id(f"{raster_key(hit.placement.raster)}@9999.00,10.00,50.00,0.00", rasters)
    with pytest.raises(InputError, match="side be 1 px to twice"):  # a speck: no place to read
        parse_hit_id(f"{raster_key(hit.placement.raster)}@10.00,10.00,0.0001,0.00", rasters)
    with pytest.raises(InputError, match=r"turn within \+-180 degrees"):  # the message named only centre and side
        parse_hit_id(f"{raster_key(hit.placement.raster)}@10.00,10.00,50.00,200.00", rasters)


def test_feedback_leaves_out_bad_places_and_brings_up_good_ones(rmnp_index, model, assets):
    rasters = rmnp_index.rasters
    query = prepare_example(Example(str(assets["rmnp_rgb"]), tuple(window_bbox(assets["rmnp_rgb"])), "EPSG:4326"),
                            list(rasters.values()), model.img_size)
    own = query.own_place
    first = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=8, own_place=own).hits
    good, bad = hit_id(first[4].placement), hit_id(first[0].placement)
    refined = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=8, own_place=own,
                           feedback=Feedback((good,), (bad,))).hits
    ids = [hit_id(h.placement) for h in refined]
    assert bad not in ids, "a place marked bad is not returned"
    assert good in ids[:2], f"a place marked good comes up: {ids.index(good) if good in ids else None}"
    assert [h.rank for h in refined] == list(range(1, len(refined) + 1))
    with pytest.raises(InputError, match="no marks"):
        Feedback((), ())
    with pytest.raises(InputError, match="both good and bad"):
        Feedback((good,), (good,))
    key, numbers = good.split("@")
    written_otherwise = f" {key}@" + ",".join(f"{float(v):.3f}" for v in numbers.split(","))
    with pytest.raises(InputError, match="both good and bad"):  # one place, its id written two ways
        Feedback((good,), (written_otherwise,))
    place = first[4].placement
    for other in (replace(place, angle=place.angle + 90), replace(place, cx=place.cx + 0.01)):  # one footprint
        with pytest.raises(InputError, match="one place both good and bad"):
            search_query(rmnp_index, model, query.sketch, RankingConfig(), top=8,
                         feedback=Feedback((good,), (hit_id(other),)))
    with pytest.raises(InputError, match="not in this index"):
        search_query(rmnp_index, model, query.sketch, RankingConfig(), top=8,
                     feedback=Feedback(("0123456789@10.00,10.00,50.00,0.00",)))
    with pytest.raises(InputError, match="must be an object"):
        Feedback.from_json(["a"])


def test_a_search_with_marks_returns_each_place_once_whatever_overlap_is_allowed(rmnp_index, model, assets):
    """The searches like a good place find the sketch's own places again: at a max_overlap of 1,
    the same hit came back twice, and four times with the good place marked thrice (probe)."""
    query = prepare_example(Example(str(assets["rmnp_rgb"]), tuple(window_bbox(assets["rmnp_rgb"])), "EPSG:4326"),
                            list(rmnp_index.rasters.values()), model.img_size)
    first = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=6, own_place=query.own_place,
                         max_overlap=1.0).hits
    good = hit_id(first[1].placement)
    assert Feedback((good, good, hit_id(first[2].placement))).positive == (good, hit_id(first[2].placement))
    for marks in (Feedback((good,)), Feedback((good, good, good))):
        result = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=6, own_place=query.own_place,
                              max_overlap=1.0, feedback=marks)
        ids = [hit_id(h.placement) for h in result.hits]
        assert len(ids) == 6 and len(set(ids)) == len(ids), ids
        assert 0 < result.timings_ms["feedback_ms"] <= result.timings_ms["total_ms"]


def test_a_place_marked_bad_keeps_the_places_overlapping_it_out(rmnp_index, model, assets):
    """A place marked bad was left out alone, and a neighbour lying 51-89% inside it, which it
    had kept out of the first search, came back in its stead: the same spot to the user (probe).
    A place lying more than max_overlap of its area inside one is kept out."""
    from worker.placement import Placement

    query = prepare_example(Example(str(assets["rmnp_rgb"]), tuple(window_bbox(assets["rmnp_rgb"])), "EPSG:4326"),
                            list(rmnp_index.rasters.values()), model.img_size)
    first = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=10, own_place=query.own_place).hits
    for bad in first[:3]:
        refined = search_query(rmnp_index, model, query.sketch, RankingConfig(), top=10, own_place=query.own_place,
                               feedback=Feedback((hit_id(first[4].placement),), (hit_id(bad.placement),))).hits
        shapes = Placement.pixel_polygons([bad.placement] + [h.placement for h in refined])
        marked = shapes[0]
        inside = [round(s.intersection(marked).area / s.area, 2) for s in shapes[1:]]
        assert len(refined) == 10 and max(inside) <= 0.3, inside


def test_a_re_rank_stops_between_batches_of_places(rmnp_index, model):
    """A re-rank read and described all its places at once, 3 x a top of 1,000 (the worker went
    from 1.6 to 3.4 GB), and ran on past the worker's time limit, the searches behind it waiting
    (probe): it looks at the search's stop check between batches."""
    from worker.cancellation import SearchStopped, stop_when
    from worker.query_search import DESCRIBED_AT_ONCE, Unread, describe_readable

    place = parse_hit_id(f"{raster_key(next(iter(rmnp_index.rasters.values())))}@200.00,200.00,112.00,0.00",
                         rmnp_index.rasters)
    places = [replace(place, cx=place.cx + n) for n in range(2 * DESCRIBED_AT_ONCE + 1)]
    looked = []
    with stop_when(lambda: looked.append(1) or len(looked) > 1), pytest.raises(SearchStopped):
        describe_readable(rmnp_index, places, model.img_size, None, Unread({}, {}))
    assert len(looked) == 2, "stopped at the second batch"
    kept, described = describe_readable(rmnp_index, places, model.img_size, None, Unread({}, {}))
    assert kept == list(range(len(places))) and len(described) == len(places)


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_marks_in_a_raster_that_cannot_be_read_now_are_left_out_with_it(tmp_path, model, assets, damage):
    """A mark, good or bad, in a raster moved, deleted or damaged since it was indexed failed the
    whole search with `not_found`; the search without marks leaves the raster out and says so.
    Now its marks are left out with it, and the reply says so once: the raster is unreadable,
    not changed (a file cut short is both)."""
    import shutil

    from worker.app import SearchRequest, run_search
    from worker.placement import Placement
    from worker.store import IndexWriter, TileIndex
    from worker.tiling import TileSettings

    searched, marked = (shutil.copy(assets[name], tmp_path / f"{name}.tif") for name in ("rmnp_rgb", "osbs_rgb"))
    IndexWriter(tmp_path / "index", model, TileSettings(tile=112, scales=(1,))).build([searched, marked])
    index = TileIndex.open(tmp_path / "index")
    there = next(r for r in index.rasters.values() if r.path == str(marked))
    marks = Feedback((hit_id(Placement(there, 100, 100, 112)),), (hit_id(Placement(there, 200, 200, 112)),))
    if damage == "deleted":
        marked.unlink()
    else:
        marked.write_bytes(marked.read_bytes()[:20_000])
    request = SearchRequest(None, example=Example(str(searched), tuple(window_bbox(searched)), "EPSG:4326"), top=5,
                            feedback=marks)
    reply = run_search(request, model, index).to_json()
    assert [f["properties"]["rank"] for f in reply["hits"]["features"]] == [1, 2, 3, 4, 5]
    assert all(f["properties"]["raster"] == str(searched) for f in reply["hits"]["features"])
    assert [(o["raster"], o["kind"]) for o in reply["left_out"]] == [(str(marked), "unreadable")]
    assert reply["changed"] == []


def test_an_example_over_most_of_its_raster_beside_a_raster_gone_says_to_search_again_once_it_is_back(tmp_path, model,
                                                                                                      assets):
    """Every place found is the example's own, and the index's other raster cannot be read
    now: what to do is to search once it is back, not to search an index of more rasters."""
    import shutil

    from worker.app import SearchRequest, run_search
    from worker.store import IndexWriter, TileIndex
    from worker.tiling import TileSettings

    searched, other = (shutil.copy(assets[name], tmp_path / f"{name}.tif") for name in ("rmnp_rgb", "osbs_rgb"))
    IndexWriter(tmp_path / "index", model, TileSettings(tile=112, scales=(1,))).build([searched, other])
    index = TileIndex.open(tmp_path / "index")
    example = Example(str(searched), tuple(window_bbox(searched, (10, 10, 475, 363))), "EPSG:4326")
    assert run_search(SearchRequest(None, example=example, top=3), model, index).own_place_only == []
    other.unlink()
    reply = run_search(SearchRequest(None, example=example, top=3), model, index).to_json()
    assert reply["hits"]["features"] == [] and [o["raster"] for o in reply["left_out"]] == [str(other)]
    [said] = reply["own_place_only"]
    assert said["reason"].endswith(", or search again once the rasters and places named as not searched can be")


def test_places_are_described_in_their_order_less_those_of_rasters_that_cannot_be_read(tmp_path, model, assets):
    """Described all at once, or, when one raster cannot be read, raster by raster: the marks'
    order is kept (the first good marks are the ones searched "more like"), each place with its
    own descriptor."""
    import shutil

    from worker.line_drawing import drawing_device
    from worker.placement import Placement
    from worker.query_search import Unread, describe_readable
    from worker.store import IndexWriter, TileIndex
    from worker.tiling import TileSettings
    from worker.verify import describe_places

    a, b = (shutil.copy(assets[name], tmp_path / f"{name}.tif") for name in ("rmnp_rgb", "osbs_rgb"))
    IndexWriter(tmp_path / "index", model, TileSettings(tile=112, scales=(1,))).build([a, b])
    index = TileIndex.open(tmp_path / "index")
    in_a, in_b = (next(r for r in index.rasters.values() if r.path == str(path)) for path in (a, b))
    places = [Placement(in_a, 100, 100, 112), Placement(in_b, 150, 150, 112), Placement(in_a, 250, 200, 90)]
    size, device = model.img_size, drawing_device(model.device)
    unread = Unread({}, {})
    kept, described = describe_readable(index, places, size, device, unread)
    assert kept == [0, 1, 2] and torch.equal(described, describe_places(places, size, device))
    b.unlink()
    kept, described = describe_readable(index, places, size, device, unread)
    assert kept == [0, 2] and torch.equal(described, describe_places([places[0], places[2]], size, device))
    assert list(unread.rasters) == [str(b)] and unread.places == {}

    # a raster that fails after a batch of its places was read: none of its places is kept
    from worker.cancellation import stop_when
    from worker.query_search import DESCRIBED_AT_ONCE

    shutil.copy(assets["osbs_rgb"], b)
    many = [replace(places[1], cx=100.0 + n) for n in range(DESCRIBED_AT_ONCE)] + [places[0], places[1]]
    batches = []

    def damage_after_the_first_batch() -> bool:
        batches.append(1)
        if len(batches) == 2:
            b.write_bytes(b"II*\0" + bytes(60))  # no raster any more
        return False

    unread = Unread({}, {})
    with stop_when(damage_after_the_first_batch):
        kept, described = describe_readable(index, many, size, device, unread)
    assert kept == [DESCRIBED_AT_ONCE] and list(unread.rasters) == [str(b)], (kept, unread.rasters)


def test_a_raster_marked_in_and_changed_since_it_was_indexed_is_named(tmp_path, model, assets):
    """A mark names a place by the indexed pixels; read from a file changed since, it may be
    another place, or none (a probe's mark, on a raster shrunk since, lay off it), and the reply
    said nothing when no hit was there. Now `changed` names the marked raster."""
    import shutil

    from worker.app import SearchRequest, run_search
    from worker.placement import Placement
    from worker.store import IndexWriter, TileIndex
    from worker.tiling import TileSettings

    searched, marked = (shutil.copy(assets[name], tmp_path / f"{name}.tif") for name in ("rmnp_rgb", "osbs_rgb"))
    IndexWriter(tmp_path / "index", model, TileSettings(tile=112, scales=(1,))).build([searched, marked])
    index = TileIndex.open(tmp_path / "index")
    there = next(r for r in index.rasters.values() if r.path == str(marked))
    with rasterio.open(marked, "r+") as dst:
        dst.write(255 - dst.read())
    request = SearchRequest(None, example=Example(str(searched), tuple(window_bbox(searched)), "EPSG:4326"), top=3,
                            bbox=tuple(window_bbox(searched, (0, 0, 485, 373))),  # hits in the searched raster only
                            feedback=Feedback((), (hit_id(Placement(there, 100, 100, 112)),)))
    reply = run_search(request, model, index).to_json()
    assert reply["hits"]["features"] and all(f["properties"]["raster"] == str(searched) for f in reply["hits"]["features"])
    assert [c["raster"] for c in reply["changed"]] == [str(marked)] and "marked in it" in reply["changed"][0]["reason"]
    everywhere = run_search(replace(request, bbox=None, top=10), model, index).to_json()  # hits in the marked one too
    assert str(marked) in {f["properties"]["raster"] for f in everywhere["hits"]["features"]}
    said = {c["raster"]: c["reason"] for c in everywhere["changed"]}
    assert said.keys() == {str(marked)} and said[str(marked)].endswith("then search and mark again"), said


def test_an_example_on_a_raster_changed_since_it_was_indexed_is_read_where_it_is_now(tmp_path, model, assets):
    """A raster written again 400 px east after it was indexed: an example box where its old
    pixels lay was read from the file's new pixels by the index's old grid, 400 px from the place
    asked for, and said nothing. Now the file is read as it is (the old place lies outside it),
    and the reply names the raster as changed."""
    import os

    from worker.app import SearchRequest, run_search
    from worker.store import IndexWriter, TileIndex
    from worker.tiling import TileSettings

    with rasterio.open(assets["rmnp_rgb"]) as src:
        pixels, crs, transform = src.read(), src.crs, src.transform
    moving = write_raster(tmp_path / "moving.tif", pixels, crs=crs, transform=transform)
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([moving])
    old_place = tuple(window_bbox(moving))
    shifted = rasterio.Affine(transform.a, transform.b, transform.c + 400 * transform.a, transform.d, transform.e,
                              transform.f)  # 400 px east: the old place is past its west edge
    write_raster(moving, pixels, crs=crs, transform=shifted)
    os.utime(moving, ns=(1, 1))  # another time than the indexed file's, whatever the clock
    with pytest.raises(InputError, match="lies outside"):
        prepare_example(Example(str(moving), old_place, crs.to_string()), list(TileIndex.open(out).rasters.values()),
                        model.img_size)
    new_place = tuple(window_bbox(moving))
    reply = run_search(SearchRequest(None, example=Example(str(moving), new_place, crs.to_string()), top=3), model,
                       TileIndex.open(out)).to_json()
    assert [c["raster"] for c in reply["changed"]] == [str(moving)] and "example" in reply["changed"][0]["reason"]
