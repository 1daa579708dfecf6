"""Issue #15: what a client (or a careless operator) can make a real `python -m worker serve`
do over real sockets, one test per finding. After each, the worker answers a ping and the
committed index is unchanged on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import rasterio
import rasterio.shutil
import zmq
from rasterio.windows import Window

from conftest import damaged_near_its_end
from lab.worker_process import WorkerProcess, memory_mb, wait_job
from test_service import sketch_png
from wire import errors as codes
from wire import job_states as states
from wire.errors import WorkerError
from wire.protocol import MAX_STROKE_POINTS, encode_request
from worker.tiling import TileSettings

LIMITS = ["--max-jobs", "1", "--max-queued-jobs", "2"]
FLOOD_LIMITS = ["--search-timeout", "0.1",  # below a search of the test index (0.16-0.2 s warm on this CPU, measured)
                "--search-threads", "2", "--max-queued-searches", "4",
                "--max-header-bytes", "100000"]
TILE = {"tile": 112, "scales": [1]}


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory, assets) -> Path:
    """rasters/ (the served raster root: a 240 px crop and the whole RMNP scene), outside/ (a
    raster beside the root) and indexes/."""
    base = tmp_path_factory.mktemp("hardening")
    for name in ("rasters", "outside", "indexes"):
        (base / name).mkdir()
    with rasterio.open(assets["rmnp_rgb"]) as src:
        window = Window(0, 0, 240, 240)
        profile = {**src.profile, "width": 240, "height": 240, "transform": src.window_transform(window)}
        data = src.read(window=window)
    for path in (base / "rasters" / "tiny.tif", base / "outside" / "secret.tif"):
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    shutil.copy(assets["rmnp_rgb"], base / "rasters" / "rmnp.tif")
    return base


@pytest.fixture(scope="module")
def served(tree):
    """One worker for the module, with its index `base` built."""
    proc = WorkerProcess(tree / "indexes", tree / "rasters", extra=LIMITS).start()
    with proc.client() as c:
        job = wait_job(c, c.start_index("base", [str(tree / "rasters" / "tiny.tif")], **TILE)["id"])
    assert job["state"] == states.DONE, job
    proc.base_files = _fingerprint(tree / "indexes" / "base")
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def still_serving(request):
    """After each test: the module's worker answers a ping within a second and its committed
    index is byte for byte what it was."""
    yield
    if "served" not in request.fixturenames:
        return
    proc = request.getfixturevalue("served")
    started = time.perf_counter()
    with proc.client(timeout=5, retries=0) as c:
        assert c.ping()["ok"]
        assert time.perf_counter() - started < 1.0
        listed = {i["name"]: i for i in c.list_indexes()}
    assert listed["base"]["complete"] and listed["base"]["compatible"] and listed["base"]["error"] is None
    assert _fingerprint(proc.index_root / "base") == proc.base_files


def _fingerprint(index_dir: Path) -> dict[str, str]:
    """The committed files of an index by their hash (the manifest and the shards)."""
    files = [index_dir / "manifest.json", *sorted((index_dir / "shards").rglob("*.npy"))]
    return {str(f.relative_to(index_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _code(call) -> WorkerError:
    with pytest.raises(WorkerError) as err:
        call()
    return err.value


def _raw(endpoint: str, frames: list[bytes], timeout: float = 10) -> dict:
    """One request as raw frames on a DEALER socket; its reply's header."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(int(timeout * 1000)), "no reply"
        return json.loads(sock.recv_multipart()[0])
    finally:
        sock.close()


def _copy_index(served, name: str) -> Path:
    dest = served.index_root / name
    shutil.copytree(served.index_root / "base", dest)
    return dest


# -- 1. a CRS a client chooses: no PROJ strings, no files ------------------------------------
def test_1_a_crs_naming_a_fifo_is_refused_at_once(served, tmp_path):
    fifo = tmp_path / "grid.fifo"
    os.mkfifo(fifo)
    crss = [f"+proj=longlat +datum=WGS84 +nadgrids={fifo}", f"+proj=longlat +geoidgrids={fifo} +type=crs",
            f"+init={fifo}:1", f'GEOGCRS["x",DATUM["d",ELLIPSOID["e",6378137,298.257]],PARAMETERFILE["g","{fifo}"]]',
            json.dumps({"type": "GeographicCRS", "name": "x", "parameters": [{"name": "g", "value": str(fifo)}]})]
    strokes = [[[-105.6, 40.3], [-105.55, 40.35]]]
    try:
        with served.client(timeout=5, retries=0) as c:
            for crs in crss:
                started = time.perf_counter()
                errors = [_code(lambda: c.search("base", sketch_png=sketch_png(), crs=crs)),
                          _code(lambda: c.search("base", sketch_png=sketch_png(), bbox=[0, 0, 1, 1], bbox_crs=crs)),
                          _code(lambda: c.search("base", strokes=strokes, strokes_crs=crs))]
                assert time.perf_counter() - started < 3.0, "refused without touching the file"
                assert {e.code for e in errors} == {codes.BAD_INPUT}, errors
                assert "authority code" in errors[0].message or "names" in errors[0].message
            assert c.ping()["ok"]
    finally:
        try:  # a reader blocked on the FIFO (the bug) gets its end of file
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


# -- 2. rasters outside the raster roots: links, VRT sources, network ------------------------
def _vrt(path: Path, source: str, relative: bool = False, tag: str = "SourceFilename", root: str = "",
         relative_name: str = "relativeToVRT", as_attribute: bool = False) -> Path:
    """A VRT reading `source`: in a `tag` element, or as an attribute of its source (GDAL reads both)."""
    named = "" if as_attribute else f'<{tag} {relative_name}="{int(relative)}">{source}</{tag}>'
    path.write_text(f"""<VRTDataset rasterXSize="240" rasterYSize="240"{root}>
  <SRS>EPSG:4326</SRS><GeoTransform>-105.6, 0.0001, 0, 40.4, 0, -0.0001</GeoTransform>
  <VRTRasterBand dataType="Byte" band="1"><SimpleSource{f' {tag}="{source}"' if as_attribute else ""}>
    {named}<SourceBand>1</SourceBand>
  </SimpleSource></VRTRasterBand>
</VRTDataset>""")
    return path


def test_2_links_vrt_sources_and_network_paths_outside_the_roots_are_forbidden(served, tree):
    rasters, secret = tree / "rasters", tree / "outside" / "secret.tif"
    linked = rasters / "linked"
    linked.mkdir()
    (linked / "innocent.tif").symlink_to(secret)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    vrts = rasters / "vrts"
    vrts.mkdir()
    cases = {"a folder holding a link out": [str(linked)], "the link itself": [str(linked / "innocent.tif")],
             "a VRT with an outside source": [str(_vrt(vrts / "abs.vrt", str(secret)))],
             "a VRT with a relative source out": [str(_vrt(vrts / "rel.vrt", "../../outside/secret.tif", True))],
             "a VRT with a /vsicurl/ source": [str(_vrt(vrts / "net.vrt", f"/vsicurl/http://127.0.0.1:{port}/a.tif"))],
             # GDAL reads a VRT's names in any case and whatever their namespace
             "a VRT's source in lower case": [str(_vrt(vrts / "lower.vrt", str(secret), tag="sourcefilename"))],
             "a VRT in a namespace": [str(_vrt(vrts / "ns.vrt", str(secret), root=' xmlns="urn:x"'))],
             "a VRT's URL source in upper case": [str(_vrt(vrts / "upper.vrt", f"/vsicurl/http://127.0.0.1:{port}/b.tif",
                                                         tag="SOURCEFILENAME"))],
             "a VRT's source as an attribute": [str(_vrt(vrts / "attr.vrt", str(secret), as_attribute=True))],
             "a VRT's relative source out, its flag in lower case":
                 [str(_vrt(vrts / "rel2.vrt", "../../outside/secret.tif", True, relative_name="relativetovrt"))],
             "a /vsicurl/ path": [f"/vsicurl/http://127.0.0.1:{port}/a.tif"],
             "a driver prefix": [f"GTIFF_DIR:1:{secret}"]}
    try:
        with served.client(timeout=20) as c:
            refused = {what: _code(lambda: c.start_index("leak", paths, **TILE)) for what, paths in cases.items()}
            indexes = {i["name"] for i in c.list_indexes()}
        assert {what: e.code for what, e in refused.items()} == dict.fromkeys(cases, codes.FORBIDDEN), refused
        assert "outside the raster roots" in refused["a VRT with an outside source"].message
        with pytest.raises(socket.timeout):
            listener.accept()  # the worker sent no request anywhere
        assert "leak" not in indexes and not (served.index_root / "leak").exists()
    finally:
        listener.close()
        shutil.rmtree(linked)
        shutil.rmtree(vrts)


def _fan_out(folder: Path, source: str, times: int, levels: int) -> Path:
    """VRTs nested `levels` deep, each naming the one below `times`, each time filling another
    pixel (a mosaic of one sheet repeated), the deepest naming `source`."""
    below = source
    for level in range(levels, 0, -1):
        bands = "".join(f'<VRTRasterBand dataType="Byte" band="1"><SimpleSource><SourceFilename '
                        f'relativeToVRT="1">{below}</SourceFilename><SourceBand>1</SourceBand><DstRect xOff="{b}" '
                        f'yOff="0" xSize="1" ySize="1"/></SimpleSource></VRTRasterBand>' for b in range(times))
        (folder / f"v{level}.vrt").write_text(f'<VRTDataset rasterXSize="10" rasterYSize="10">{bands}</VRTDataset>')
        below = f"v{level}.vrt"
    return folder / "v1.vrt"


def test_2_nested_vrts_are_checked_once_each_and_still_all_of_them(tmp_path, monkeypatch):
    """A VRT naming the one below it 6 times, nested 7 deep, was parsed once for every path
    through the nesting (56,000 parses: 22 s of the service's loop, which answered no one
    meanwhile: the concurrency probe), and read as often for a search's look at its sheets. Each
    is parsed once; a source outside the roots at the bottom, and VRTs that read each other,
    are still refused."""
    import worker.raster_access as access_module
    from worker.errors import ForbiddenError, InputError
    from worker.raster_access import RasterAccess

    parsed = []
    parse = access_module.vrt_sources
    monkeypatch.setattr(access_module, "vrt_sources", lambda path: parsed.append(path) or parse(path))
    inside, outside = tmp_path / "rasters", tmp_path / "outside"
    inside.mkdir(), outside.mkdir()
    (inside / "a.tif").write_bytes(b"not read here")
    access = RasterAccess((inside,))
    assert access.check_file(_fan_out(inside, "a.tif", times=6, levels=7)) == inside / "v1.vrt"
    assert len(parsed) == 7, len(parsed)
    with pytest.raises(ForbiddenError, match="outside the raster roots"):
        access.check_file(_fan_out(inside, str(outside / "secret.tif"), times=6, levels=7))
    from worker.vrt_sheets import _read_sheets  # what a search reads to tell a mosaic's sheet gone

    read_for_sheets = _read_sheets(str(inside / "v1.vrt"))[1]
    assert sorted(read_for_sheets) == sorted(str(inside / f"v{level}.vrt") for level in range(1, 8))
    (inside / "a.vrt").write_text(_fan_out(inside, "b.vrt", 2, 1).read_text())
    (inside / "b.vrt").write_text(_fan_out(inside, "a.vrt", 2, 1).read_text())
    with pytest.raises(InputError, match="nest more than 8 deep"):
        access.check_file(inside / "a.vrt")


# -- 3. a folder that is not an index is never cleaned ---------------------------------------
def test_3_a_folder_with_foreign_content_is_refused_and_left_as_it_was(served, tree):
    root = served.index_root
    notes = root / "notes"
    (notes / "shards" / "mine").mkdir(parents=True)
    (notes / "notes.txt").write_text("not an index")
    (notes / "shards" / "mine" / "data.txt").write_text("a user's data")
    (root / "afile.txt").write_text("a file")
    before = sorted(str(p.relative_to(notes)) for p in notes.rglob("*"))
    tiny = str(tree / "rasters" / "tiny.tif")
    try:
        with served.client() as c:
            foreign = _code(lambda: c.start_index("notes", [tiny], **TILE))
            missing = _code(lambda: c.start_index("notes", [str(tree / "rasters" / "missing.tif")], **TILE))
            a_file = _code(lambda: c.start_index("afile.txt", [tiny], **TILE))
            inside = _code(lambda: c.start_index("base/inner", [tiny], **TILE))
            the_root = _code(lambda: c.start_index(".", [tiny], **TILE))
        assert (foreign.code, missing.code, a_file.code, inside.code) == (codes.BAD_INPUT,) * 4
        assert "holds other things" in foreign.message and "notes.txt" in foreign.message
        assert "is a file" in a_file.message and "inside the index" in inside.message
        assert the_root.code == codes.FORBIDDEN
        assert sorted(str(p.relative_to(notes)) for p in notes.rglob("*")) == before
        assert (notes / "shards" / "mine" / "data.txt").read_text() == "a user's data"
        assert not (root / ".lock").exists() and not (root / "shards").exists()
        assert not (root / "base" / "inner").exists()
    finally:
        shutil.rmtree(notes)
        (root / "afile.txt").unlink()


def test_3b_an_index_below_another_programs_manifest_is_listed_and_that_folder_is_no_index(served, tree):
    """A folder holding another program's manifest.json (a web app's) in the index root was taken
    for a damaged index: the indexes below it were never listed (nor their jobs resumed), and
    deleting it by name moved the web app's folder to the trash."""
    root = served.index_root
    webapp = root / "webapp"
    webapp.mkdir()
    theirs = '{"name": "a web app", "icons": []}'
    (webapp / "manifest.json").write_text(theirs)
    try:
        with served.client(timeout=60) as c:
            job = wait_job(c, c.start_index("webapp/maps", [str(tree / "rasters" / "tiny.tif")], **TILE)["id"])
            assert job["state"] == states.DONE, job
            listed = {i["name"]: i for i in c.list_indexes()}
            assert "webapp/maps" in listed and listed["webapp/maps"]["complete"] and "webapp" not in listed, listed
            assert c.search("webapp/maps", sketch_png=sketch_png(), top=2)["hits"]["features"]
            refused = _code(lambda: c.request("delete_index", index="webapp"))
            assert refused.code == codes.NOT_FOUND and "no index 'webapp'" in refused.message, refused
        assert (webapp / "manifest.json").read_text() == theirs and (webapp / "maps" / "manifest.json").is_file()
    finally:
        shutil.rmtree(webapp)


# -- 4. a shard or a map truncated under a running worker ------------------------------------
def test_4_a_truncated_shard_or_map_of_a_loaded_index_is_a_corrupt_index_error(served):
    """Found by the search that reads it, and by the list (a truncated level map was listed as
    sound while every search of it failed); mended by an index request for its rasters, as the
    error says (it was refused with the same corrupt_index: found by the lifecycle probe)."""
    copies = {"truncated": _copy_index(served, "truncated"), "truncated-map": _copy_index(served, "truncated-map")}
    try:
        with served.client(timeout=60) as c:
            for name in copies:  # loaded and cached
                assert c.search(name, sketch_png=sketch_png(), top=2)["hits"]["features"]
            for path in [shard / "cells.npy" for shard in sorted((copies["truncated"] / "shards").iterdir())] + \
                    sorted((copies["truncated-map"] / "maps").glob("*.npy")):
                os.truncate(path, path.stat().st_size // 2)
            errors = {name: _code(lambda: c.search(name, sketch_png=sketch_png(), top=2)) for name in copies}
            listed = {i["name"]: i for i in c.list_indexes()}
        for name in copies:
            assert errors[name].code == codes.CORRUPT_INDEX and "build it again" in errors[name].message
            assert "truncated" in errors[name].message
            assert (listed[name]["error"] or {}).get("code") == codes.CORRUPT_INDEX, (name, listed[name])
        with served.client(timeout=60) as c:  # the error's advice, through the service: it was refused with that error
            for name, copy in copies.items():
                rasters = [r["path"] for r in json.loads((copy / "manifest.json").read_text())["rasters"]]
                job = wait_job(c, c.start_index(name, rasters, **TILE)["id"])
                assert job["state"] == states.DONE, job
                assert c.search(name, sketch_png=sketch_png(), top=2)["hits"]["features"]
    finally:
        for copy in copies.values():
            shutil.rmtree(copy)


# -- 5. jobs that cannot be resumed do not stop the worker from starting ---------------------
def test_5_a_moved_raster_and_a_torn_job_file_fail_their_jobs_and_the_worker_serves(served, tree, tmp_path):
    root = tmp_path / "indexes"
    root.mkdir()
    rasters = tree / "rasters"
    moving, unplugged = rasters / "moving.tif", rasters / "unplugged.vrt"
    shutil.copy(rasters / "tiny.tif", moving)
    rasterio.shutil.copy(moving, unplugged, driver="VRT")  # a mosaic of a sheet on the drive unplugged below
    spec = {"settings": TileSettings(tile=112, scales=(1,)).to_json(), "chunk_tiles": 64}
    jobs = {"moved": {"index": "moved", "rasters": [str(moving)], **spec},
            # GDAL opens a mosaic whose sheet is not there: its resumed job failed, and was dropped for good
            "unplugged": {"index": "unplugged", "rasters": [str(unplugged)], **spec},
            "outside": {"index": "outside", "rasters": [str(tree / "outside" / "secret.tif")], **spec},
            # a field of the wrong type: a TypeError failed every start of the worker
            "mistyped": {"index": "mistyped", "rasters": [str(rasters / "tiny.tif")], **spec, "chunk_tiles": "abc"},
            "torn": None}
    for name, job in jobs.items():
        shutil.copytree(served.index_root / "base", root / name)
        if job is None:  # a job file cut in half, as a full disk or a crash mid-write leaves it
            text = json.dumps({"index": name, "rasters": [str(rasters / "tiny.tif")], **spec})
            (root / name / "job.json").write_text(text[:len(text) // 2])
        else:
            (root / name / "job.json").write_text(json.dumps(job))
    moving.rename(tmp_path / "moved-away.tif")
    manifests = {name: (root / name / "manifest.json").read_bytes() for name in jobs}
    proc = WorkerProcess(root, rasters).start()
    try:
        with proc.client() as c:
            assert c.ping()["ok"]
            deadline = time.time() + 120
            while True:  # the mosaic's job is resumed, and fails once its sheets are opened
                listed = {i["name"]: i for i in c.list_indexes()}
                if listed["unplugged"]["job"] is None or time.time() > deadline:
                    break
                time.sleep(0.2)
            fresh = wait_job(c, c.start_index("fresh", [str(unplugged)], **TILE)["id"])  # asked now: nothing kept
    finally:
        assert proc.kill(15) == 0
    assert fresh["state"] == states.FAILED and "its source" in fresh["error"]["message"], fresh
    assert "kept" not in fresh["error"]["message"] and not (root / "fresh").exists()
    for name in jobs:
        job = listed[name]["last_job"]
        assert job["state"] == states.FAILED and listed[name]["job"] is None, (name, job)
        assert listed[name]["complete"] and (root / name / "manifest.json").read_bytes() == manifests[name]
        # a job of rasters not there now (a drive not plugged in, a root not given) was dropped for good
        kept = name in ("moved", "unplugged", "outside")
        assert (root / name / "job.json").exists() == kept, name
        assert ("the job is kept, and the worker's next start tries it again" in job["error"]["message"]) == kept
    assert listed["moved"]["last_job"]["error"]["code"] == codes.BAD_INPUT
    assert "not found" in listed["moved"]["last_job"]["error"]["message"]
    assert listed["unplugged"]["last_job"]["error"]["code"] == codes.BAD_INPUT
    assert "its source" in listed["unplugged"]["last_job"]["error"]["message"]
    assert listed["outside"]["last_job"]["error"]["code"] == codes.FORBIDDEN
    assert "damaged" in listed["torn"]["last_job"]["error"]["message"]
    assert "damaged" in listed["mistyped"]["last_job"]["error"]["message"]

    (tmp_path / "moved-away.tif").rename(moving)  # the drive plugged in again: the next start goes on with it
    proc = WorkerProcess(root, rasters).start()
    try:
        with proc.client() as c:
            deadline = time.time() + 120
            while time.time() < deadline and any((root / n / "job.json").exists() for n in ("moved", "unplugged")):
                time.sleep(0.2)
            listed = {i["name"]: i for i in c.list_indexes()}
    finally:
        assert proc.kill(15) == 0
        moving.unlink()
        unplugged.unlink()
    assert listed["moved"]["complete"] and str(moving) in listed["moved"]["rasters"], listed["moved"]
    assert listed["unplugged"]["complete"] and str(unplugged) in listed["unplugged"]["rasters"], listed["unplugged"]
    assert (root / "outside" / "job.json").exists(), "still outside the roots: kept again"


def test_5g_a_job_kept_for_rasters_not_there_is_dropped_when_they_are_removed(tree, tmp_path, model):
    """A job kept because its raster was not there (a drive not plugged in) was resumed once it
    was back, and indexed again the raster the user had removed meanwhile."""
    from worker.store import IndexWriter

    root, away = tmp_path / "indexes", tmp_path / "unplugged.tif"
    sheet = tree / "rasters" / "sheet.tif"
    shutil.copy(tree / "rasters" / "tiny.tif", sheet)
    IndexWriter(root / "sheets", model, TileSettings(**TILE)).build([sheet])
    job = {"index": "sheets", "rasters": [str(sheet)], "settings": TileSettings(**TILE).to_json()}
    (root / "sheets" / "job.json").write_text(json.dumps(job))  # a run of it again, the worker killed
    sheet.rename(away)
    proc = WorkerProcess(root, tree / "rasters").start()
    try:
        with proc.client() as c:
            [listed] = c.list_indexes()
            assert "the job is kept" in listed["last_job"]["error"]["message"], listed["last_job"]
            removal = wait_job(c, c.request("remove_rasters", index="sheets", rasters=[str(sheet)])["job"]["id"])
            assert removal["state"] == states.DONE, removal
    finally:
        assert proc.kill(15) == 0
        away.rename(sheet)
    assert not (root / "sheets" / "job.json").exists(), "resumed, it would index the raster removed again"
    try:
        proc = WorkerProcess(root, tree / "rasters").start()  # the drive back
        with proc.client() as c:
            [listed] = c.list_indexes()
        assert listed["rasters"] == [] and listed["job"] is None, listed
    finally:
        proc.stop()
        sheet.unlink()


def test_5g_a_job_cancelled_while_queued_says_what_its_index_holds(served, tree):
    """A job ended before it ran (cancelled in the queue) said its index held 0 tiles: the dock and
    Processing said so of an index of hundreds."""
    copy = _copy_index(served, "held")
    try:
        with served.client() as c:
            slow = c.start_index("slow-held", [str(tree / "rasters" / "rmnp.tif")], **TILE)
            queued = c.start_index("held", [str(tree / "rasters" / "rmnp.tif")], **TILE)
            assert queued["state"] == states.QUEUED, queued
            c.request("cancel", job=queued["id"])
            ended = wait_job(c, queued["id"])
            c.request("cancel", job=slow["id"])
            wait_job(c, slow["id"])
            [held] = [i for i in c.list_indexes() if i["name"] == "held"]
        assert (ended["state"], ended["tile_count"]) == (states.CANCELLED, held["tile_count"]) and held["tile_count"]
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(served.index_root / "slow-held", ignore_errors=True)


def test_5f_job_files_of_no_index_are_neither_resumed_nor_removed(served, tree, tmp_path):
    """Every job.json under the index root was taken for a job: another program's file was
    removed as a damaged job, and an index being deleted (its trash folder, kept by a crash) had
    its job resumed there, unlisted. The trash is removed, as a delete would have (it was left
    until the next delete)."""
    root = tmp_path / "indexes"
    (root / "other-program" / "deep").mkdir(parents=True)
    foreign = {root / "other-program" / "job.json": '{"name": "precious"}',
               root / "other-program" / "deep" / "job.json": "[1, 2]"}
    for path, text in foreign.items():
        path.write_text(text)
    trash = root / ".deleted-3f2a"
    shutil.copytree(served.index_root / "base", trash)
    job = {"index": "base", "rasters": [str(tree / "rasters" / "rmnp.tif")], "settings": TileSettings(**TILE).to_json()}
    (trash / "job.json").write_text(json.dumps(job))
    proc = WorkerProcess(root, tree / "rasters").start()
    try:
        with proc.client() as c:
            assert c.list_indexes() == []
            time.sleep(1)  # a job resumed in the trash would have begun by now
            deadline = time.monotonic() + 30
            while trash.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not trash.exists() and c.list_indexes() == [], "the trash is removed, its job never resumed"
    finally:
        assert proc.kill(15) == 0
    assert all(path.read_text() == text for path, text in foreign.items())
    said = proc.log.read_text()  # its log says what it does, and the foreign job files are none of it
    assert not any(word in said for word in ("resum", "job.json", "index job")), said



def test_5c_a_job_file_another_writer_holds_or_a_read_only_root_keeps_and_the_worker_serves(served, tree, tmp_path):
    """Two workers may share an index root: one starting while the other builds an index took
    up its job, which failed on the lock, and removed its job file. On a read-only root (indexes
    served to searchers), a job file left there stopped the worker from starting: removing it
    raised. Now the job another process holds is left to it, and a job that cannot be resumed
    on a read-only root is listed failed, its file left, and the indexes are searched."""
    import fcntl
    import subprocess

    rasters = tree / "rasters"
    spec = {"rasters": [str(rasters / "tiny.tif")], "settings": TileSettings(tile=112, scales=(1,)).to_json(),
            "chunk_tiles": 64}
    root, read_only = tmp_path / "indexes", tmp_path / "read-only"
    shutil.copytree(served.index_root / "base", root / "held")
    (root / "held" / "job.json").write_text(json.dumps({"index": "held", **spec}))
    with open(root / "held" / ".lock", "w") as other_writer:  # as another worker building it holds it
        fcntl.flock(other_writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = WorkerProcess(root, rasters).start()
        try:
            with proc.client() as c:
                held = {i["name"]: i for i in c.list_indexes()}["held"]
        finally:
            assert proc.kill(15) == 0
    assert held["last_job"] is None and held["job"] is None and (root / "held" / "job.json").is_file()

    read_only.mkdir()
    shutil.copytree(served.index_root / "base", root / "left")
    (root / "left" / "job.json").write_text(json.dumps({"index": "left", **spec}))
    if subprocess.run(["mount", "--bind", str(root), str(read_only)], capture_output=True).returncode:
        pytest.skip("cannot mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only)], check=True)
        proc = WorkerProcess(read_only, rasters).start()
        try:
            with proc.client() as c:
                left = {i["name"]: i for i in c.list_indexes()}["left"]
                found = c.search("left", sketch_png=sketch_png(), top=2)
                with pytest.raises(WorkerError) as new_index:  # its folder cannot be made: said so, not `internal`
                    c.start_index("new", [str(rasters / "tiny.tif")], **TILE)
        finally:
            assert proc.kill(15) == 0
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    assert left["last_job"]["state"] == states.FAILED and left["last_job"]["error"]["code"] == codes.STORAGE
    assert "read-only" in left["last_job"]["error"]["message"] and (root / "left" / "job.json").is_file()
    assert found["hits"]["features"]
    assert new_index.value.code == codes.STORAGE and "read-only" in new_index.value.message, new_index.value


def test_5d_a_job_queued_in_one_worker_is_neither_taken_nor_lost_by_another_sharing_the_root(served, tree):
    """A queued job holds no index lock yet: another worker sharing the index root started the
    same index over its job file (and one starting up resumed it), and when the queued job then
    failed on the lock it removed the other's job file, which a killed worker never resumed. Now
    a worker's job, queued or running, is its own until it ends."""
    import signal

    rasters = tree / "rasters"
    with served.client() as a:
        slow = a.start_index("slow", [str(rasters / "rmnp.tif")], **TILE)
        queued = a.start_index("shared", [str(rasters / "tiny.tif")], **TILE)
        assert queued["state"] == states.QUEUED, queued
    other = WorkerProcess(served.index_root, rasters, extra=LIMITS)
    try:
        served.proc.send_signal(signal.SIGSTOP)  # both jobs held as they are: nothing here waits on time
        try:
            other.start()
            with other.client() as b:
                shared = {i["name"]: i for i in b.list_indexes()}.get("shared")
                assert shared is None or shared["job"] is None, "not resumed by the worker starting beside it"
                refused = _code(lambda: b.start_index("shared", [str(rasters / "tiny.tif")], **TILE))
                assert refused.code == codes.BUSY and "another worker" in refused.message, refused
                refused = _code(lambda: b.request("delete_index", index="shared"))
                assert refused.code == codes.BUSY and "another worker" in refused.message, refused
        finally:
            served.proc.send_signal(signal.SIGCONT)
        with served.client() as a:
            a.request("cancel", job=slow["id"])
            assert wait_job(a, queued["id"])["state"] == states.DONE
        with other.client() as b:
            assert wait_job(b, b.start_index("shared", [str(rasters / "tiny.tif")], **TILE)["id"])["state"] == states.DONE
            listed = {i["name"]: i for i in b.list_indexes()}["shared"]
        assert listed["complete"] and not (served.index_root / "shared" / "job.json").exists()
    finally:
        other.stop()  # started or not: a worker left running holds the index root for the tests after
        for name in ("slow", "shared"):
            shutil.rmtree(served.index_root / name, ignore_errors=True)


def test_5b_a_job_that_fails_before_its_first_commit_leaves_no_folder(served, tree):
    """A raster that is no raster, found once the job opens it: the job failed and its empty
    folder stayed in the index root, a name taken by something that is not an index."""
    junk = tree / "rasters" / "junk.tif"
    junk.write_bytes(b"II*\x00 not a TIFF after all")
    try:
        with served.client() as c:
            job = wait_job(c, c.start_index("junk", [str(junk)], **TILE)["id"])
        assert job["state"] == states.FAILED and job["error"]["code"] == codes.BAD_INPUT, job
        assert not (served.index_root / "junk").exists()
    finally:
        junk.unlink()
        shutil.rmtree(served.index_root / "junk", ignore_errors=True)


def test_5e_a_damaged_file_of_a_mosaic_fails_its_job_naming_it_and_the_rest_is_searched(served, tree, assets):
    """A file with a damaged block failed its job at the first tile over it, the files after it
    not indexed, and the message said nothing of what was kept. Now the job indexes all it can
    and fails naming the file and GDAL's reason; a search of the index finds the other file's
    places and says the damaged one was not searched whole."""
    damaged, _ = damaged_near_its_end(tree / "rasters", assets)
    try:
        with served.client() as c:
            job = wait_job(c, c.start_index("damaged", [str(damaged), str(tree / "rasters" / "tiny.tif")],
                                            chunk_tiles=8, **TILE)["id"])
            assert job["state"] == states.FAILED and job["error"]["code"] == codes.BAD_INPUT, job
            message = job["error"]["message"]
            assert re.match(r"1 of the run's 2 rasters could not be read whole: \S*damaged.tif: cannot read window .*"
                            r"\(\d+ of \d+ chunks left out\)\. What could be read is indexed and searchable", message)
            reply = c.search("damaged", sketch_png(), top=20)
        # in the worker's log too, at its default level: one serving several users had no word of it
        assert f"index job {job['id']} of {served.index_root / 'damaged'}: failed: 1 of the run's 2 rasters" in \
            served.log.read_text()
        listed = {h["properties"]["raster"] for h in reply["hits"]["features"]}
        assert str(tree / "rasters" / "tiny.tif") in listed
        # searched in part, or left out once a hit's verification met the damaged block: said either way
        said = [p["raster"] for p in reply["partly_indexed"]] + [r["raster"] for r in reply["left_out"]]
        assert said == [str(damaged)], json.dumps({k: v for k, v in reply.items() if k != "hits"})
    finally:
        damaged.unlink()
        shutil.rmtree(served.index_root / "damaged", ignore_errors=True)


# -- 6 and 7. a flood: bounded queue and memory, timeouts that free their thread -------------
def test_6_7_a_flood_is_bounded_and_a_timed_out_search_frees_its_thread(served, tree):
    root = tree / "flood-indexes"
    root.mkdir()
    shutil.copytree(served.index_root / "base", root / "base")
    proc = WorkerProcess(root, tree / "rasters", extra=FLOOD_LIMITS).start()
    pid = proc.proc.pid
    try:
        with proc.client(timeout=10) as c:  # the index loaded once: what the flood adds is what counts
            try:
                c.search("base", sketch_png=sketch_png())
            except WorkerError:  # over 0.1 s: timeout
                pass
            # a timeout names what made the search slower than it could be, once the search knows it: here
            # a shortlist asked of an index without one (at 10M tiles an exact scan runs past any limit);
            # a search may be answered before it gets that far, but not five in a row
            slow = [_code(lambda: c.search("base", sketch_png=sketch_png(), ann="on")) for _ in range(5)]
            plain = _code(lambda: c.search("base", sketch_png=sketch_png()))
        assert {e.code for e in slow + [plain]} == {codes.TIMEOUT}
        assert any("It was slower than it could be: the index has no ANN shortlist; scanning exactly" in e.message
                   for e in slow), [e.message for e in slow]
        assert "slower than it could be" not in plain.message, plain.message
        time.sleep(1.0)
        before = memory_mb(pid)

        latencies, flooding = [], threading.Event()

        def ping_while_flooding() -> None:
            with proc.client(timeout=10, retries=0) as c:
                while not flooding.is_set():
                    started = time.perf_counter()
                    c.ping()
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.05)

        pinger = threading.Thread(target=ping_while_flooding)
        pinger.start()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(proc.bind)
        sent, extra, sketch = 300, b"\0" * 1_000_000, sketch_png()
        for i in range(sent):
            header = json.dumps({"v": 1, "id": f"f{i}", "op": "search", "index": "base", "sketch_frame": 1}).encode()
            sock.send_multipart([header, sketch, extra])
        replies: dict[str, str] = {}
        deadline = time.time() + 60
        while len(replies) < sent and time.time() < deadline:
            if sock.poll(1000):
                reply = json.loads(sock.recv_multipart()[0])
                replies[reply["id"]] = "ok" if reply["ok"] else reply["error"]["code"]
        after = memory_mb(pid)
        flooding.set()
        pinger.join()
        time.sleep(1.0)  # the flood's last searches stop

        too_large = _raw(proc.bind, encode_request("ping", pad="x" * 200_000))
        started = time.perf_counter()
        sock.send_multipart(encode_request("search", request_id="slow1", index="base", sketch_frame=1,
                                           frames=(sketch_png(),)))
        sock.send_multipart(encode_request("search", request_id="slow2", index="base", sketch_frame=1,
                                           frames=(sketch_png(),)))
        timed_out = {}
        while len(timed_out) < 2 and time.perf_counter() - started < 10:
            if sock.poll(1000):
                reply = json.loads(sock.recv_multipart()[0])
                timed_out[reply["id"]] = (reply["error"]["code"], time.perf_counter() - started)
        answered_at = max(t for _, t in timed_out.values())
        with proc.client(timeout=5, retries=0) as c:  # a search that needs a free thread within 0.1 s
            while True:
                err = _code(lambda: c.search("absent", sketch_png=sketch_png()))
                if err.code != codes.TIMEOUT or time.perf_counter() - started > 10:
                    break
                time.sleep(0.1)
        freed_after = time.perf_counter() - started - answered_at
        sock.close()
        time.sleep(0.5)
        log = proc.log.read_text()
    finally:
        proc.stop()
    counts = {code: list(replies.values()).count(code) for code in set(replies.values())}
    print(f"\nflood of {sent} searches with a 1 MB extra frame: replies {counts}; RSS {before['VmRSS']:.0f} -> "
          f"{after['VmRSS']:.0f} MB (peak {before['VmHWM']:.0f} -> {after['VmHWM']:.0f} MB); ping during the flood: "
          f"{len(latencies)} pings, max {max(latencies) * 1e3:.0f} ms, median "
          f"{sorted(latencies)[len(latencies) // 2] * 1e3:.0f} ms; timeouts answered after "
          f"{[round(t, 2) for _, t in timed_out.values()]} s, a thread free {freed_after:.2f} s later")
    assert len(replies) == sent, "every request of the flood is answered"
    assert set(counts) <= {"ok", codes.BUSY, codes.TIMEOUT} and counts.get(codes.BUSY, 0) >= sent - 50
    assert after["VmHWM"] - before["VmHWM"] < 150 and after["VmRSS"] - before["VmRSS"] < 150, \
        "the flood's 300 MB of payloads are not kept"
    assert latencies and max(latencies) < 1.5, "ping answers during the flood"
    assert too_large["error"]["code"] == codes.TOO_LARGE and "--max-header-bytes" in too_large["error"]["message"]
    assert {code for code, _ in timed_out.values()} == {codes.TIMEOUT}
    assert answered_at < 1.5, "timeout counts from arrival and is answered at the deadline"
    assert err.code == codes.NOT_FOUND and freed_after < 3.0, "a later search gets a thread"
    assert "answered `timeout` ended: it stopped before" in log, "the timed-out search stopped at a stage, it did not run to its end"


# -- 8. index jobs: a bounded queue; scales bounded ------------------------------------------
def test_8_jobs_beyond_the_limit_wait_or_are_busy_and_scales_are_bounded(served, tree):
    rmnp = str(tree / "rasters" / "rmnp.tif")
    names = ["job-a", "job-b", "job-c", "job-d"]
    started = []
    try:
        with served.client() as c:
            started.append(c.start_index("job-a", [rmnp], tile=64, scales=[1, 2], chunk_tiles=4))
            deadline = time.time() + 60
            while c.job(started[0]["id"])["state"] == states.QUEUED and time.time() < deadline:
                time.sleep(0.05)
            # the same request again is the same job; other work for that index, or one inside it, is refused
            resent = c.start_index("job-a", [rmnp], tile=64, scales=[1, 2], chunk_tiles=4)
            other_work = [_code(lambda: c.start_index("job-a", [rmnp], tile=128, scales=[1, 2])),
                          _code(lambda: c.start_index("job-a", [str(tree / "rasters" / "tiny.tif")], tile=64,
                                                      scales=[1, 2]))]
            nested = _code(lambda: c.start_index("job-a/inner", [rmnp], tile=64, scales=[1]))
            started += [c.start_index(name, [rmnp], tile=64, scales=[1], chunk_tiles=4) for name in names[1:3]]
            busy = _code(lambda: c.start_index("job-d", [rmnp], tile=64, scales=[1]))
            states_now = [c.job(j["id"])["state"] for j in started]
            scale_errors = [_code(lambda: c.start_index("scales", [rmnp], scales=scales))
                            for scales in ([1] * 200, list(range(1, 201)), [1000], [0])]
            tile_error = _code(lambda: c.start_index("scales", [rmnp], tile=100_000))
            for job in started:
                c.cancel(job["id"])
            try:  # Build again at once after Cancel: not the job being cancelled (it ended cancelled, unsaid)
                after_cancel = c.start_index("job-a", [rmnp], tile=64, scales=[1, 2], chunk_tiles=4)
                c.cancel(after_cancel["id"])
                started.append(after_cancel)
            except WorkerError as exc:
                after_cancel = exc
            ended = [wait_job(c, j["id"], timeout=120)["state"] for j in started]
        assert resent["id"] == started[0]["id"]
        if isinstance(after_cancel, WorkerError):
            assert after_cancel.code == codes.BUSY and "being cancelled" in after_cancel.message
        else:  # the cancelled job had already stopped: a new one
            assert after_cancel["id"] != started[0]["id"]
        assert [e.code for e in other_work] == [codes.BUSY] * 2 and "other rasters or settings" in other_work[0].message
        # inside the index being built: refused by the job (before its first commit) or as inside an index (after)
        assert nested.code == codes.BAD_INPUT and "inside" in nested.message
        assert not (served.index_root / "job-a" / "inner").exists()
        assert states_now == [states.RUNNING, states.QUEUED, states.QUEUED]
        assert busy.code == codes.BUSY and "waiting" in busy.message
        assert [e.code for e in scale_errors] == [codes.BAD_INPUT] * 4 and "different" in scale_errors[0].message
        assert tile_error.code == codes.BAD_INPUT
        assert set(ended) <= {states.CANCELLED, states.DONE}
        assert not (served.index_root / "job-d").exists() and not (served.index_root / "scales").exists()
    finally:
        for name in names:
            shutil.rmtree(served.index_root / name, ignore_errors=True)


# -- 9. one broken manifest ------------------------------------------------------------------
def test_9_a_corrupt_manifest_is_flagged_and_the_others_listed(served):
    broken, torn = _copy_index(served, "broken"), _copy_index(served, "torn")
    (broken / "manifest.json").write_text("{not json")
    manifest = json.loads((torn / "manifest.json").read_text())
    (torn / "manifest.json").write_text(json.dumps({**manifest, "shards": "x", "rasters": [{}]}))
    try:
        with served.client() as c:
            listed = {i["name"]: i for i in c.list_indexes()}
            errors = [_code(lambda: c.search(name, sketch_png=sketch_png())) for name in ("broken", "torn")]
        assert listed["base"]["error"] is None and listed["base"]["tile_count"] > 0
        for name in ("broken", "torn"):
            assert listed[name]["error"]["code"] == codes.CORRUPT_INDEX and not listed[name]["compatible"]
            assert "build it again" in listed[name]["reason"]
        assert [e.code for e in errors] == [codes.CORRUPT_INDEX] * 2
    finally:
        shutil.rmtree(broken)
        shutil.rmtree(torn)


# -- 9b. a raster gone since it was indexed --------------------------------------------------
def test_9b_a_raster_moved_away_is_left_out_and_said_so_and_searched_again_once_back(served, tree):
    """An unplugged drive or a reorganised folder: every search of the index failed `internal`,
    its other rasters too. Now the others are searched, the reply's `left_out` names the raster
    and why, and once its file is back it is searched again."""
    import io

    from lab.pseudo_sketch import pseudo_sketch
    from worker.placement import Placement
    from worker.tiling import open_raster

    gone = tree / "rasters" / "gone.tif"
    shutil.copy(tree / "rasters" / "rmnp.tif", gone)
    image, valid = Placement(open_raster(gone, None), cx=370.0, cy=260.0, side=112.0).read(224)  # outside tiny.tif
    buf = io.BytesIO()
    pseudo_sketch(image, "simple", valid=valid).save(buf, "PNG")
    away = tree / "gone.tif.away"
    try:
        with served.client(timeout=60) as c:
            job = wait_job(c, c.start_index("two", [str(tree / "rasters" / "tiny.tif"), str(gone)], **TILE)["id"])
            assert job["state"] == states.DONE, job
            present = c.search("two", sketch_png=buf.getvalue(), top=3)
            assert present["hits"]["features"][0]["properties"]["raster"] == str(gone) and not present["left_out"]
            gone.rename(away)
            missing = c.search("two", sketch_png=buf.getvalue(), top=3)
            again = c.search("two", sketch_png=buf.getvalue(), top=3)  # remembered: not read again
            away.rename(gone)
            back = c.search("two", sketch_png=buf.getvalue(), top=3)
        for reply in (missing, again):
            assert reply["hits"]["features"] and {f["properties"]["raster"] for f in reply["hits"]["features"]} == {
                str(tree / "rasters" / "tiny.tif")}
            assert [o["raster"] for o in reply["left_out"]] == [str(gone)] and "cannot be read" in reply["left_out"][0]["reason"]
        assert back["hits"]["features"][0]["properties"]["raster"] == str(gone) and not back["left_out"]
    finally:
        if away.exists():
            away.rename(gone)
        shutil.rmtree(served.index_root / "two", ignore_errors=True)
        gone.unlink(missing_ok=True)


def test_9b_a_hit_below_the_verified_ones_in_a_raster_gone_is_left_out_and_said_so(served, tree):
    """Only a search's best places are read (verified): a hit below them, in a raster deleted
    since it was indexed, was returned as if the raster were there, and the reply named no
    raster left out (a later search, reading one of its places, said so)."""
    import io

    from lab.pseudo_sketch import pseudo_sketch
    from worker.placement import Placement
    from worker.tiling import open_raster

    doomed = tree / "rasters" / "doomed.tif"  # tiny.tif's pixels a degree west: other places on the ground
    with rasterio.open(tree / "rasters" / "tiny.tif") as src:
        profile = {**src.profile, "transform": src.transform * rasterio.Affine.translation(-1 / src.transform.a, 0)}
        with rasterio.open(doomed, "w", **profile) as dst:
            dst.write(src.read())
    image, valid = Placement(open_raster(tree / "rasters" / "rmnp.tif", None), cx=370.0, cy=260.0, side=112.0).read(224)
    buf = io.BytesIO()
    pseudo_sketch(image, "simple", valid=valid).save(buf, "PNG")
    try:
        with served.client(timeout=60) as c:
            job = wait_job(c, c.start_index("below", [str(tree / "rasters" / "rmnp.tif"), str(doomed)], **TILE)["id"])
            assert job["state"] == states.DONE, job
            present = c.search("below", sketch_png=buf.getvalue(), top=10)["hits"]["features"]
            in_doomed = [f["properties"] for f in present if f["properties"]["raster"] == str(doomed)]
            assert in_doomed and all(h["score"] is None for h in in_doomed), "hits below the verified ones"
            doomed.unlink()
            reply = c.search("below", sketch_png=buf.getvalue(), top=10)
        assert reply["hits"]["features"], "the other raster is searched"
        assert {f["properties"]["raster"] for f in reply["hits"]["features"]} == {str(tree / "rasters" / "rmnp.tif")}
        assert [o["raster"] for o in reply["left_out"]] == [str(doomed)], reply["left_out"]
    finally:
        shutil.rmtree(served.index_root / "below", ignore_errors=True)
        doomed.unlink(missing_ok=True)


# -- 9c. a delete that cannot remove every file ----------------------------------------------
def test_9c_a_delete_that_cannot_remove_a_file_still_frees_the_name(served, tree):
    """A file of the index that cannot be removed (immutable here; on Windows, its tiles layer
    open in QGIS): the manifest went first and the removal failed `internal`, leaving a folder
    that was neither an index nor free, so no client could delete it or build that name again.
    The folder is moved away first now: the index is gone and its name free."""
    import subprocess

    long_name = _copy_index(served, "l" * 240)  # the trash's name must fit beside any index name
    with served.client() as c:
        assert c.request("delete_index", index="l" * 240)["deleted"] == "l" * 240
    assert not long_name.exists()
    doomed = _copy_index(served, "doomed")
    stuck = next((doomed / "shards").rglob("*.npy"))
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        shutil.rmtree(doomed)
        pytest.skip("chattr +i is not available here (needs root on ext4 or the like)")
    try:
        with served.client() as c:
            deleted = c.request("delete_index", index="doomed")
            listed = {i["name"] for i in c.list_indexes()}
            again = wait_job(c, c.start_index("doomed", [str(tree / "rasters" / "tiny.tif")], **TILE)["id"])
        assert deleted["deleted"] == "doomed" and "doomed" not in listed
        assert again["state"] == states.DONE, again
    finally:
        for leftover in [stuck, *served.index_root.glob(".deleted-*/shards/**/*.npy")]:
            subprocess.run(["chattr", "-i", str(leftover)], capture_output=True)
        for folder in [doomed, *served.index_root.glob(".deleted-*")]:
            shutil.rmtree(folder, ignore_errors=True)


# -- 9d. a raster changed since it was indexed -------------------------------------------------
def test_9d_a_raster_changed_since_it_was_indexed_is_named_with_its_hits_until_indexed_again(served, tree):
    """A raster exported again over its old file: its hits were found by the old pixels' features
    and nothing said so. The reply's `changed` names it, and indexing it again clears it."""
    changed = tree / "rasters" / "changed.tif"
    shutil.copy(tree / "rasters" / "tiny.tif", changed)
    try:
        with served.client(timeout=60) as c:
            assert wait_job(c, c.start_index("changing", [str(changed)], **TILE)["id"])["state"] == states.DONE
            before = c.search("changing", sketch_png=sketch_png(), top=3)
            with rasterio.open(changed, "r+") as dst:  # the same grid, other pixels
                dst.write(255 - dst.read())
            after = c.search("changing", sketch_png=sketch_png(), top=3)
            assert wait_job(c, c.start_index("changing", [str(changed)], **TILE)["id"])["state"] == states.DONE
            again = c.search("changing", sketch_png=sketch_png(), top=3)
        assert before["hits"]["features"] and before["changed"] == [] and again["changed"] == []
        assert after["hits"]["features"] and not after["left_out"]  # still searched, and said so
        assert [r["raster"] for r in after["changed"]] == [str(changed)] and "index it again" in after["changed"][0]["reason"]
    finally:
        shutil.rmtree(served.index_root / "changing", ignore_errors=True)
        changed.unlink(missing_ok=True)


def test_9d_a_mosaic_whose_source_file_changed_is_named_with_its_hits(served, tree):
    """A VRT mosaic does not change when a sheet it reads is exported again: its hits are named
    `changed` all the same (the VRT's sources are looked at, not only the .vrt), and indexing it
    again clears it."""
    source = tree / "rasters" / "sheet.tif"
    shutil.copy(tree / "rasters" / "tiny.tif", source)
    mosaic = _vrt(tree / "rasters" / "sheets.vrt", source.name, relative=True)
    try:
        with served.client(timeout=60) as c:
            assert wait_job(c, c.start_index("mosaic", [str(mosaic)], **TILE)["id"])["state"] == states.DONE
            vrt_stamp = mosaic.stat().st_mtime_ns
            with rasterio.open(source, "r+") as dst:  # the same grid, other pixels
                dst.write(255 - dst.read())
            assert mosaic.stat().st_mtime_ns == vrt_stamp
            after = c.search("mosaic", sketch_png=sketch_png(), top=3)
            assert wait_job(c, c.start_index("mosaic", [str(mosaic)], **TILE)["id"])["state"] == states.DONE
            again = c.search("mosaic", sketch_png=sketch_png(), top=3)
        assert after["hits"]["features"] and [r["raster"] for r in after["changed"]] == [str(mosaic)]
        assert again["hits"]["features"] and again["changed"] == []
    finally:
        shutil.rmtree(served.index_root / "mosaic", ignore_errors=True)
        mosaic.unlink(missing_ok=True)
        source.unlink(missing_ok=True)


# -- 9e. a search racing a delete ------------------------------------------------------------
def test_9e_a_search_of_an_index_deleted_meanwhile_is_told_it_was_deleted_not_damaged(served):
    """A delete while a search reads the index's files: the search answered `corrupt_index`,
    "delete the index and build it again", of an index the user had just deleted. Deleted at
    several moments of a search: each answers its hits, or `not_found`."""
    outcomes = []
    for delay in (0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3):
        _copy_index(served, "racing")
        answer = {}

        def search() -> None:
            with served.client(timeout=60) as c:
                try:
                    answer["reply"] = c.search("racing", sketch_png=sketch_png(), top=3)
                except WorkerError as exc:
                    answer["reply"] = exc

        searching = threading.Thread(target=search)
        searching.start()
        time.sleep(delay)
        with served.client() as c:
            c.request("delete_index", index="racing")
        searching.join(60)
        assert "reply" in answer, "the search was answered"
        outcomes.append(answer["reply"])
    assert any(isinstance(outcome, WorkerError) for outcome in outcomes), "a delete landed before a search ended"
    for outcome in outcomes:
        if isinstance(outcome, WorkerError):
            assert outcome.code == codes.NOT_FOUND, outcome.message
        else:
            assert outcome["hits"]["features"]

# -- 10. each bad input gets its code, never `internal` --------------------------------------
def test_10_each_bad_input_gets_its_own_code(served, tree):
    def header(**fields) -> bytes:
        return json.dumps({"v": 1, "id": "x", "op": "ping", **fields}).encode()

    raw_cases = {
        "JSON nested 100,000 deep": (header(a=[])[:-4] + b"[" * 100_000 + b"]" * 100_000 + b"}", codes.BAD_JSON),
        "a 5001-digit integer": (b'{"v": 1, "id": "x", "op": "search", "top": ' + b"9" * 5001 + b"}", codes.BAD_JSON),
        "a number past a float": (b'{"v": 1, "id": "x", "op": "search", "top": 1e400}', codes.BAD_JSON),
        "a 400-digit integer in a box": (b'{"v": 1, "id": "x", "op": "search", "index": "base", "strokes_crs": "pixel", '
                                         b'"strokes": [[[0, 0], [90, 60]]], "bbox": [0, 0, 1' + b"0" * 399 + b', 1]}',
                                         codes.BAD_JSON),  # overflowed a float: internal
        "NaN": (b'{"v": 1, "id": "x", "op": "search", "top": NaN}', codes.BAD_JSON),
        "version true": (header(v=True), codes.UNSUPPORTED_VERSION),
        "version 1.0": (header(v=1.0), codes.UNSUPPORTED_VERSION),
    }
    for what, (frame, code) in raw_cases.items():
        reply = _raw(served.bind, [frame])
        assert not reply["ok"] and reply["error"]["code"] == code, (what, reply)

    tiny = str(tree / "rasters" / "tiny.tif")
    (served.index_root / "afile").write_text("a file")
    huge_name = "n" * 100_000
    far, line = [[[1e308, 1e308], [-1e308, -1e308]]], [[[0, 0], [1, 1]]]
    try:
        with served.client() as c:
            cases = {
                "a NUL in an index name": (lambda: c.start_index("a\0b", [tiny], **TILE), codes.BAD_INPUT),
                "an over-long index name": (lambda: c.start_index(huge_name, [tiny], **TILE), codes.BAD_INPUT),
                "a folder name over 255 bytes": (lambda: c.start_index("d" * 300, [tiny], **TILE), codes.BAD_INPUT),
                "a name that is a file": (lambda: c.start_index("afile", [tiny], **TILE), codes.BAD_INPUT),
                # never listed, and removed with the worker's trash at the next delete, a job writing it or not
                "a name in the worker's trash": (lambda: c.start_index("a/.deleted-run", [tiny], **TILE),
                                                 codes.BAD_INPUT),
                # each entry was found on disk on the loop's thread: 50,000 held every client's answer 4-8 s
                "10,001 raster entries": (lambda: c.start_index("x", [tiny] * 10_001, **TILE), codes.BAD_INPUT),
                "a search of a file": (lambda: c.search("afile", sketch_png=sketch_png()), codes.NOT_FOUND),
                "~nosuchuser as an index": (lambda: c.start_index("~nosuchuser/x", [tiny], **TILE), codes.FORBIDDEN),
                "~nosuchuser as a raster": (lambda: c.start_index("x", ["~nosuchuser/a.tif"], **TILE), codes.FORBIDDEN),
                "a NUL in a raster path": (lambda: c.start_index("x", [tiny + "\0"], **TILE), codes.BAD_INPUT),
                "strokes at +-1e308": (lambda: c.search("base", strokes=far, strokes_crs="EPSG:3857"), codes.BAD_INPUT),
                "a strokes_crs that is none": (lambda: c.search("base", strokes=line, strokes_crs="EPSG:0"),
                                               codes.BAD_INPUT),
                "a PROJ string strokes_crs": (lambda: c.search("base", strokes=line, strokes_crs="+proj=merc"),
                                              codes.BAD_INPUT),
                "too many points": (lambda: c.search("base", strokes=[[[0, 0]] * (MAX_STROKE_POINTS + 1)],
                                                     strokes_crs="pixel"), codes.BAD_INPUT),
                "a huge output CRS": (lambda: c.search("base", sketch_png=sketch_png(), crs="EPSG:" + "9" * 50_000),
                                      codes.BAD_INPUT),
                # these were internal errors, or answered in meaningless coordinates (heights, Earth-centred XYZ)
                "an Earth-centred output CRS": (lambda: c.search("base", sketch_png=sketch_png(), crs="EPSG:4978"),
                                                codes.BAD_INPUT),
                "a box on Mars": (lambda: c.search("base", sketch_png=sketch_png(), bbox=[0, 0, 1, 1],
                                                   bbox_crs="IAU_2015:49900"), codes.BAD_INPUT),
                "a box wholly past its CRS": (lambda: c.search("base", sketch_png=sketch_png(), bbox=[1e11, 1e11, 2e11, 2e11],
                                                              bbox_crs="EPSG:32618"), codes.BAD_INPUT),
                # placed in 15 s at 1e15, the loop answering no one meanwhile
                "a box past +-1e12": (lambda: c.search("base", sketch_png=sketch_png(), bbox=[-1e13, -1e13, 1e13, 1e13],
                                                       bbox_crs="EPSG:3857"), codes.BAD_INPUT),
                # the weight was dropped without a word: the tokens ranker has no blend
                "a token weight for the tokens ranker": (lambda: c.search("base", sketch_png=sketch_png(), ranker="tokens",
                                                                          token_weight=0.5), codes.BAD_INPUT),
                # was called blank
                "strokes outside their frame": (lambda: c.search("base", strokes=[[[5000, 5000], [6000, 6500]]],
                                                                 strokes_crs="pixel", strokes_frame=[0, 0, 100, 100]),
                                                codes.BAD_INPUT),
                # was searched, and answered no hits without a word
                "a dot in a large frame": (lambda: c.search("base", strokes=[[[5000, 5000], [5003, 5003]]],
                                                            strokes_crs="pixel", strokes_frame=[0, 0, 10000, 10000]),
                                           codes.BAD_INPUT),
            }
            errors = {what: _code(call) for what, (call, _) in cases.items()}
        assert {w: e.code for w, e in errors.items()} == {w: code for w, (_, code) in cases.items()}
        assert all(len(e.message) < 600 for e in errors.values()), "a rejected value is quoted in part"
        assert "blank" not in errors["strokes at +-1e308"].message and "1e308" in errors["strokes at +-1e308"].message
        assert "at most 50000" in errors["too many points"].message
        assert "name their folders" in errors["10,001 raster entries"].message
        # strokes (the plugin's pad) were told of an image's command-line flag
        assert errors["a dot in a large frame"].message.endswith("too small to match anything: draw the place's lines "
                                                                 "across the frame")
        assert "one or the other" in errors["a token weight for the tokens ranker"].message
        assert "outside their frame" in errors["strokes outside their frame"].message
        assert not (served.index_root / "x").exists() and not (served.index_root / "~nosuchuser").exists()
    finally:
        (served.index_root / "afile").unlink()


def test_10_the_other_choice_of_tokens_is_refused_and_changes_nothing(served, tree):
    """`base` was built by the service's default, without ViT tokens (list_indexes says so).
    Extending it with `tokens: true` is index_mismatch before any work (the autouse check: its
    files are byte for byte as they were), and the tokens ranker on it is bad input that says how
    to build an index with them."""
    with served.client(timeout=60) as c:
        listed = {i["name"]: i for i in c.list_indexes()}
        extend = _code(lambda: c.start_index("base", [str(tree / "rasters" / "rmnp.tif")], tokens=True, **TILE))
        ranker = _code(lambda: c.search("base", sketch_png=sketch_png(), ranker="tokens", top=2))
    assert listed["base"]["tokens"] is False
    assert extend.code == codes.INDEX_MISMATCH and "keeps that choice" in extend.message
    assert ranker.code == codes.BAD_INPUT and "tokens: true" in ranker.message


def test_10_a_full_disk_is_a_storage_error_not_a_bug(tmp_path):
    """A full disk (here /dev/full) is reported as `storage` with where and what to do."""
    from worker.errors import error_object
    from worker.store.format import disk_write

    with pytest.raises(Exception) as err:
        with disk_write(tmp_path / "shard.npy"):
            with open("/dev/full", "wb") as f:
                f.write(b"\0" * 300_000)
                f.flush()
    reply = error_object(err.value)
    assert reply["code"] == codes.STORAGE and "free space" in reply["message"] and "MB left" in reply["message"]
    raw = OSError(28, "No space left on device", "/data/index/manifest.json")
    assert error_object(raw)["code"] == codes.STORAGE


FILE_SIZE_LIMIT = """
import json, resource, signal, sys
import numpy as np
from pathlib import Path
from worker.errors import error_object
from worker.store.format import disk_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    with disk_write(Path(sys.argv[1])):
        np.save(sys.argv[1], np.zeros(100_000, np.uint8))
except Exception as exc:
    print(json.dumps(error_object(exc)))
"""


def test_10_a_file_too_large_for_the_disk_says_so_not_to_free_space(tmp_path):
    """A write past the worker's file size limit is a storage error that names the limit: the
    message said only to free space, of a disk with gigabytes free (numpy's short write says
    no errno, so the limit is looked up)."""
    import subprocess
    import sys

    from lab.worker_process import REPO

    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path / "cells.npy")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    reply = json.loads(done.stdout)
    assert reply["code"] == codes.STORAGE and "cells.npy" in reply["message"], reply
    assert "file size limit is 20,000 bytes" in reply["message"], reply


SHARD_PAST_THE_LIMIT = """
import resource, signal, sys
import numpy as np
from pathlib import Path
from worker.store.format import SHARDS, write_shard
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
(Path(sys.argv[1]) / SHARDS).mkdir(parents=True)
write_shard(Path(sys.argv[1]), "r00000-c000000", {"records": np.zeros(100, np.uint8)})
try:
    write_shard(Path(sys.argv[1]), "r00000-c000001", {"records": np.zeros(100, np.uint8), "cells": np.zeros(100_000, np.uint8)})
except Exception as exc:
    print(type(exc).__name__)
"""


def test_10_a_shard_whose_write_fails_leaves_nothing_behind(tmp_path):
    """A shard's write that failed left its part under its temporary name: on a full disk its
    part filled the last bytes, the commit of the shards written before it failed too, and they
    were computed again; the part stayed until the next run (probe)."""
    import subprocess
    import sys

    from lab.worker_process import REPO

    done = subprocess.run([sys.executable, "-c", SHARD_PAST_THE_LIMIT, str(tmp_path / "index")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "StorageError", done.stdout + done.stderr
    assert sorted(os.listdir(tmp_path / "index" / "shards")) == ["r00000-c000000"]


FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
from worker.errors import error_object
from worker.store import gpkg
from worker.store.format import TILES_LAYER, disk_write
from worker.store.gpkg import write_tiles_gpkg
gpkg.shards_shown = lambda path, manifest: None  # written whole, through GDAL, as after a run that changed the index
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
index = Path(sys.argv[1])
try:
    with disk_write(index / TILES_LAYER):
        write_tiles_gpkg(index)
except Exception as exc:
    print(json.dumps(error_object(exc)))
"""


def test_10_tiles_gpkg_on_a_full_disk_is_a_storage_error_and_keeps_the_last_one(served, tmp_path):
    """The last step of an indexing job writes tiles.gpkg through GDAL, whose words for a full
    disk are SQLite's ("no such table"). A disk that refuses it (here a file size limit) is a
    storage error that says so, and the last tiles.gpkg stays as it was, with nothing beside it."""
    import subprocess
    import sys

    from lab.worker_process import REPO
    from worker.store import TileIndex
    from worker.store.format import TILES_LAYER

    index = tmp_path / "index"
    shutil.copytree(served.index_root / "base", index)
    before = (index / TILES_LAYER).read_bytes()
    assert len(before) > 20_000, "more than the limit lets a process write"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(index)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["code"] == codes.STORAGE, reply
    assert "tiles.gpkg" in reply["message"] and "free space" in reply["message"], reply
    assert (index / TILES_LAYER).read_bytes() == before
    assert sorted(p.name for p in index.iterdir()) == sorted(p.name for p in (served.index_root / "base").iterdir())
    assert len(TileIndex.open(index)) > 0


def test_the_documented_limits_are_the_workers():
    """docs/protocol.md's table of limits names every serve flag with its default."""
    from dataclasses import fields

    from lab.worker_process import REPO
    from worker.service.config import Limits

    doc = (REPO / "docs" / "protocol.md").read_text().split("## Limits and security")[1]
    for limit in fields(Limits):
        flag = f"`--{limit.name.replace('_', '-')}`"
        row = next((line for line in doc.splitlines() if line.startswith("|") and flag in line), None)
        assert row is not None, f"{flag} is documented"
        documented = row.split("|")[2].split()[0]
        assert float(documented) == limit.default, (flag, documented, limit.default)


def test_an_index_root_the_worker_may_not_write_in_is_a_storage_error_that_says_so(tree, tmp_path):
    """A new index whose folder cannot be made there (no write access) was `internal`, "a bug",
    with a bare PermissionError. An immutable folder refuses a new folder even to root."""
    import subprocess

    root = tmp_path / "indexes"
    (root / "made").mkdir(parents=True)  # an index folder made by hand, the job's file refused in it
    try:
        if any(subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode
               for folder in (root / "made", root)):
            pytest.skip("chattr +i is not available here")
        proc = WorkerProcess(root, tree / "rasters").start()
        try:
            with proc.client() as c:
                refused = [_code(lambda: c.start_index(name, [str(tree / "rasters" / "tiny.tif")], **TILE))
                           for name in ("new", "made")]
        finally:
            assert proc.kill(15) == 0
    finally:
        subprocess.run(["chattr", "-i", str(root), str(root / "made")], capture_output=True)
    for error in refused:  # it had said "then run the job again: committed chunks are kept" of its job's file
        assert error.code == codes.STORAGE and "write access" in error.message, error
        assert error.message.endswith("then ask again"), error
