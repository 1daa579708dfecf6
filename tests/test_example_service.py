"""Query by example and feedback through the real service (real sockets, a real worker process)
and the command line, on a real raster; bad input answered with what to do."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
import shapely.geometry

from wire import errors as codes
from wire.errors import WorkerError
from lab.worker_process import REPO, WorkerProcess

WINDOW = (200, 100, 330, 230)  # col0, row0, col1, row1 of rmnp, off the tile grid


@pytest.fixture(scope="module")
def rasters(tmp_path_factory, assets) -> Path:
    root = tmp_path_factory.mktemp("rasters")
    shutil.copy(assets["rmnp_rgb"], root / "rmnp-rgb.tif")
    return root


@pytest.fixture(scope="module")
def worker(tmp_path_factory, rasters):
    root = tmp_path_factory.mktemp("example-service") / "indexes"
    root.mkdir()
    proc = WorkerProcess(root, rasters).start()
    proc.index("rmnp", [rasters / "rmnp-rgb.tif"], tile=112, scales=[1, 2])
    yield proc
    proc.stop()


def bbox_of(path: Path, window=WINDOW) -> list[float]:
    with rasterio.open(path) as src:
        c0, r0, c1, r1 = window
        x0, y1 = src.transform * (c0, r0)
        x1, y0 = src.transform * (c1, r1)
    return [x0, y0, x1, y1]


def own_iou(feature: dict, path: Path) -> float:
    from shapely.geometry import box, shape

    hit, own = shape(feature["geometry"]), box(*bbox_of(path))
    inter = hit.intersection(own).area
    return inter / (hit.area + own.area - inter)


def example(rasters: Path, **changes) -> dict:
    return {"raster": str(rasters / "rmnp-rgb.tif"), "bbox": bbox_of(rasters / "rmnp-rgb.tif"), "crs": "EPSG:4326",
            **changes}


def test_search_by_example_and_refine_over_sockets(worker, rasters):
    with worker.client() as c:
        reply = c.request("search", index="rmnp", example=example(rasters), top=6, timeout=120)
        hits = reply["hits"]["features"]
        assert [h["properties"]["rank"] for h in hits] == [1, 2, 3, 4, 5, 6]
        assert all(own_iou(h, rasters / "rmnp-rgb.tif") <= 0.5 for h in hits), "the example's own place is left out"
        ids = [h["properties"]["id"] for h in hits]
        assert len(set(ids)) == 6
        refined = c.request("search", index="rmnp", example=example(rasters), top=6, timeout=180,
                            feedback={"positive": [ids[3]], "negative": [ids[0]]})["hits"]["features"]
        new_ids = [h["properties"]["id"] for h in refined]
        assert ids[0] not in new_ids and ids[3] in new_ids[:2]
        # ids are stateless: a restarted worker reads them too (the id names the place, not a row of a table)
        again = c.request("search", index="rmnp", example=example(rasters), top=6, timeout=180,
                          feedback={"positive": [ids[3]], "negative": [ids[0]]})["hits"]["features"]
        assert [h["properties"]["id"] for h in again] == new_ids
        assert reply["own_place_only"] == []


def test_an_example_box_over_most_of_the_only_raster_finds_nothing_and_says_why(worker, rasters):
    """Every place of the index lies in the box dragged, or overlaps its own place: the search
    found nothing and said nothing, as a failed search would."""
    with worker.client() as c:
        reply = c.request("search", index="rmnp", example=example(rasters, bbox=bbox_of(rasters / "rmnp-rgb.tif",
                                                                                      (10, 10, 475, 363))),
                          top=3, timeout=120)
    assert reply["hits"]["features"] == []
    [said] = reply["own_place_only"]
    assert said["raster"] == str(rasters / "rmnp-rgb.tif")
    assert said["reason"].startswith("every place found is the example's own place"), said["reason"]
    assert said["reason"].endswith(": choose a smaller box, round what to look for only, or search an index holding "
                                   "more rasters"), said["reason"]


@pytest.mark.parametrize("fields, code, message", [
    ({"example": {"bbox": [10.0, 10.0, 11.0, 11.0]}}, codes.BAD_INPUT, "lies outside"),
    ({"example": {"bbox": [-105.5, 40.3, -105.6, 40.4]}}, codes.BAD_INPUT, "is empty"),
    # PROJ took ever longer placing it, holding the GIL: the worker answered no one, nor SIGTERM
    ({"example": {"bbox": [-1e20, -1e20, 1e20, 1e20], "crs": "EPSG:3857"}}, codes.BAD_INPUT, "within +-1e+12"),
    ({"example": {"raster": "/etc/passwd"}}, codes.FORBIDDEN, "outside the raster roots"),
    ({"example": {"crs": "EPSG:999999"}}, codes.BAD_INPUT, "CRS"),
    ({"feedback": {"positive": [], "negative": []}}, codes.BAD_INPUT, "no marks"),
    ({"feedback": {"negative": ["0123456789@10.00,10.00,50.00,0.00"]}}, codes.BAD_INPUT, "not in this index"),
    ({"feedback": {"negative": ["rank 1"]}}, codes.BAD_INPUT, "not a hit id"),
    ({"feedback": ["x"]}, codes.BAD_REQUEST, "feedback"),
    ({"feedback": {"positive": 5}}, codes.BAD_INPUT, "must be a list of hit ids"),
    ({"feedback": {"positive": 0, "negative": ["0123456789@10.00,10.00,50.00,0.00"]}}, codes.BAD_INPUT,
     "must be a list of hit ids"),
    ({"feedback": {"negative": "0123456789@10.00,10.00,50.00,0.00"}}, codes.BAD_INPUT, "must be a list of hit ids"),
    ({"feedback": {"positive": [5]}}, codes.BAD_INPUT, "feedback positive [5] must be a list"),  # was "(5,)"
    ({"example": "here"}, codes.BAD_REQUEST, "example"),
    # was read in EPSG:4326 without a word of the key, and refused as a box that cannot be placed
    ({"example": {"bbox_crs": "EPSG:32617"}}, codes.BAD_REQUEST, "example has no field 'bbox_crs'"),
])
def test_bad_examples_and_marks_get_clear_errors(worker, rasters, fields, code, message):
    if "example" in fields and isinstance(fields["example"], dict):
        fields = {**fields, "example": example(rasters, **fields["example"])}
    elif "feedback" in fields:
        fields = {**fields, "example": example(rasters)}
    with worker.client() as c, pytest.raises(WorkerError) as err:
        c.request("search", index="rmnp", top=3, timeout=60, **fields)
    assert err.value.code == code and message in err.value.message, err.value.message


def test_the_command_line_searches_by_example(worker, rasters, tmp_path):
    index = worker.index_root / "rmnp"
    out = tmp_path / "hits.geojson"
    bbox = ",".join(str(v) for v in bbox_of(rasters / "rmnp-rgb.tif"))
    assert bbox.startswith("-")  # west of Greenwich: written as README writes it, not as --bbox=...
    run = lambda *args: subprocess.run([sys.executable, "-m", "worker", "search", str(index), *args], cwd=REPO,
                                       capture_output=True, text=True)
    result = run("--example", str(rasters / "rmnp-rgb.tif"), "--bbox", bbox, "--bbox-crs", "EPSG:4326", "--top", "4",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    hits = json.loads(out.read_text())["features"]
    assert len(hits) == 4 and all(own_iou(h, rasters / "rmnp-rgb.tif") <= 0.5 for h in hits)
    assert "a side" not in result.stderr and json.loads(out.read_text())["out_of_scale"] == []
    small = ",".join(str(v) for v in bbox_of(rasters / "rmnp-rgb.tif", (200, 100, 240, 140)))
    result = run("--example", str(rasters / "rmnp-rgb.tif"), f"--bbox={small}", "--top", "1", "--out",
                 str(tmp_path / "small.geojson"))  # 40 px: under the 57 px of this index's smallest places
    assert result.returncode == 0 and re.search(r"^warning: \S*rmnp-rgb.tif: the example is about 40 px of this raster "
                                                r"a side, smaller than the index finds .*: choose a box round more "
                                                r"of its surroundings, or search an index built with tiles of \d+ px$",
                                                result.stderr, re.M), result.stderr
    assert json.loads((tmp_path / "small.geojson").read_text())["out_of_scale"][0]["side_px"] == pytest.approx(40)
    ids = [h["properties"]["id"] for h in hits]
    result = run("--example", str(rasters / "rmnp-rgb.tif"), f"--bbox={bbox}", "--top", "4", "--bad", ids[0],
                 "--good", ids[2], "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert ids[0] not in [h["properties"]["id"] for h in json.loads(out.read_text())["features"]]
    with rasterio.open(rasters / "rmnp-rgb.tif") as src:  # in EPSG:4326
        west, south, east, north = src.bounds
    half = f"{west},{south},{(west + east) / 2},{north}"  # the raster's western half
    result = run("--example", str(rasters / "rmnp-rgb.tif"), "--bbox", bbox, "--area", half, "--top", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    within = shapely.geometry.box(*[float(v) for v in half.split(",")])
    assert all(shapely.geometry.shape(h["geometry"]).intersects(within) for h in json.loads(out.read_text())["features"])
    anywhere = [shapely.geometry.shape(h["geometry"]) for h in hits]  # the first search's, without an area
    assert not all(h.intersects(within) for h in anywhere), "the area changed what was found"
    own = [float(v) for v in bbox.split(",")]
    centre = ((own[0] + own[2]) / 2, (own[1] + own[3]) / 2)
    inside = ",".join(str(v) for v in (centre[0] - 0.005, centre[1] - 0.005, centre[0] + 0.005, centre[1] + 0.005))
    result = run("--example", str(rasters / "rmnp-rgb.tif"), "--bbox", bbox, "--area", inside, "--max-overlap", "0",
                 "--out", str(out))
    # an area within the example holds only places overlapping its own, kept out with --max-overlap 0: it was
    # told to check the area's CRS
    assert result.returncode == 0 and json.loads(out.read_text())["features"] == [], result.stderr
    assert re.search(r"^warning: \S*rmnp-rgb.tif: every place found in the search's area is the example's own place "
                     r".* by more than max_overlap 0: choose a smaller box, round what to look for only, widen the area "
                     r"or search without it, ", result.stderr, re.M), result.stderr
    assert "its CRS" not in result.stderr, result.stderr
    result = run("--sketch", str(out), "--area", half, "--out", str(tmp_path / "other.geojson"))
    assert result.returncode == 2 and "a sketch search's is --bbox" in result.stderr
    # an example search's area that cannot be, named as given (--area), not as the example's --bbox
    result = run("--example", str(rasters / "rmnp-rgb.tif"), "--bbox", bbox, "--area", "100,100,200,200",
                 "--out", str(tmp_path / "other.geojson"))
    assert result.returncode == 2 and "error: --area [100.0, 100.0, 200.0, 200.0] lies wholly past a pole" in \
        result.stderr and "(--area-crs)" in result.stderr, result.stderr
    result = run("--example", str(rasters / "rmnp-rgb.tif"), "--bbox", "10,10,11,11", "--out", str(out))
    assert result.returncode == 2 and "lies outside" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run("--example", str(rasters / "rmnp-rgb.tif"), "--out", str(out))
    assert result.returncode == 2 and "--bbox" in result.stderr
    with rasterio.open(rasters / "rmnp-rgb.tif") as src:  # an example cut from a raster without a CRS
        profile = {k: v for k, v in src.profile.items() if k != "crs"}
        with rasterio.open(tmp_path / "no-crs.tif", "w", **profile) as dst:
            dst.write(src.read())
    result = run("--example", str(tmp_path / "no-crs.tif"), "--bbox", "10,10,100,100", "--out", str(out))
    assert result.returncode == 2 and "has no CRS" in result.stderr and "gdal_edit.py" in result.stderr
    assert "index" not in result.stderr, "told to index it again, which an example search does not"
    for alone in (["--example", str(rasters / "rmnp-rgb.tif"), "--bbox", bbox, "--area-crs", "EPSG:32613"],
                  ["--sketch", str(out), "--bbox-crs", "EPSG:32613"]):  # a CRS without its box was ignored unsaid
        result = run(*alone, "--out", str(tmp_path / "other.geojson"))
        assert result.returncode == 2 and "-crs is the CRS of --" in result.stderr, result.stderr


def test_feedback_on_a_search_that_finds_no_place_answers_no_hits(worker, rasters):
    """A search with marks whose area meets no raster failed as `internal` (a size mismatch in
    the re-rank), where the same search without marks answers no hits."""
    with worker.client() as c:
        ids = [h["properties"]["id"] for h in
               c.request("search", index="rmnp", example=example(rasters), top=3, timeout=120)["hits"]["features"]]
        for marks in ({"negative": [ids[0]]}, {"positive": [ids[1]]}):
            reply = c.request("search", index="rmnp", example=example(rasters), top=3, timeout=120,
                              bbox=[10.0, 10.0, 11.0, 11.0], feedback=marks)
            assert reply["hits"]["features"] == [], marks


def big_sparse_raster(path: Path, side: int, overviews: tuple[int, ...] = ()) -> Path:
    """A GeoTIFF of `side` px a side, all blank but a bright cross of 256 px bands (few blocks
    written: quick to make, small on disk, each pixel read as if it were there)."""
    import numpy as np
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", tiled=True,
                       compress="deflate", sparse_ok=True, crs="EPSG:32613",
                       transform=from_origin(400000, 4500000, 1, 1)) as dst:
        middle = side // 2 - 128
        dst.write(np.full((3, 256, side), 250, np.uint8), window=Window(0, middle, side, 256))
        dst.write(np.full((3, side, 256), 250, np.uint8), window=Window(middle, 0, 256, side))
    if overviews:
        with rasterio.open(path, "r+") as dst:
            dst.build_overviews(list(overviews), Resampling.average)
    return path


def test_an_example_too_large_to_read_is_refused_at_once_saying_how_to_search_it(worker, rasters, tmp_path):
    """A large example on a raster without overviews was averaged from every pixel it covers, in a
    read nothing interrupts: one of 194,000 px a side read for 105 s, long past its time limit, and
    the searches sent behind it timed out. Now refused before it is read; from overviews, read."""
    from worker.example_query import Example, prepare_example
    from worker.hit_ids import raster_key

    big = big_sparse_raster(rasters / "big.tif", 12_000)
    whole = [400000.0, 4500000.0 - 12_000, 400000.0 + 12_000, 4500000.0]
    with worker.client() as c:
        with pytest.raises(WorkerError) as err:
            c.request("search", index="rmnp", top=3, timeout=60,
                      example={"raster": str(big), "bbox": whole, "crs": "EPSG:32613"})
        assert err.value.code == codes.BAD_INPUT, err.value.message
        assert "12,000 x 12,000 px" in err.value.message and "no overviews" in err.value.message, err.value.message
        assert "gdaladdo" in err.value.message
        assert c.request("search", index="rmnp", example=example(rasters), top=3, timeout=120)["hits"]["features"]
        worker.index("big", [big], tile=112, scales=[64])  # marks may name places up to twice its side
        whole_raster = f"{raster_key(str(big.resolve()))}@6000.00,6000.00,12000.00,0.00"
        with pytest.raises(WorkerError) as err:
            c.request("search", index="big", example=example(rasters), top=3, timeout=60,
                      feedback={"negative": [whole_raster]})
        assert err.value.code == codes.BAD_INPUT and f"the mark '{whole_raster}' covers" in err.value.message, \
            err.value.message
        # the largest place this index's searches return (256 level px of 32 px), turned as they turn: read
        # by a search's verification already, so a mark on such a hit is never refused
        largest_hit = f"{raster_key(str(big.resolve()))}@6000.00,6000.00,8192.00,10.00"
        answered = c.request("search", index="big", example=example(rasters), top=3, timeout=120,
                             feedback={"negative": [largest_hit]})
        assert answered["hits"]["type"] == "FeatureCollection"

    with_overviews = big_sparse_raster(tmp_path / "big-with-overviews.tif", 12_000, overviews=(2, 4, 8, 16, 32))
    drawn = prepare_example(Example(str(with_overviews), tuple(whole), "EPSG:32613"), [], 224).drawing
    ink = drawn < 128
    assert ink[100:124].any(axis=0).mean() > 0.9 and ink[:, 100:124].any(axis=1).mean() > 0.9, \
        "read from the overviews, and drawn: the cross's edges run across the drawing"
