"""The index on disk: resumable after a hard kill, incremental, never mixed, visible in QGIS."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest

from conftest import REPO, as_a_terminal_starts_it
from worker.errors import IndexMismatchError, InputError
from worker.store import IndexWriter, TileIndex
from worker.tiling import TileSettings

SMALL = ["--tile", "112", "--scales", "1", "--chunk-tiles", "4", "--batch-size", "4", "--quiet"]


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, **kw)


def shard_arrays(index_dir: Path) -> dict[str, np.ndarray]:
    index = TileIndex.open(index_dir)
    rows = np.arange(len(index))
    if not index.has_tokens:
        return {"records": index.records, "cells": index.cells_of(rows)}
    tokens, positions = index.tokens_of(rows)
    return {"records": index.records, "global": np.asarray(index.global_tokens), "tokens": tokens,
            "positions": positions, "cells": index.cells_of(rows)}


def test_killed_indexing_resumes_to_the_same_index(tmp_path, assets):
    """A run commits every COMMIT_EVERY_S: the scene's 133 chunks take several seconds, so the
    kill lands between commits, with chunks computed and not committed."""
    raster = assets["s2_rgb"]
    reference = tmp_path / "reference"
    assert run_cli("index", "--out", reference, *SMALL, raster).returncode == 0

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "worker", "index", "--out", str(resumed), *SMALL, str(raster)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        manifest = resumed / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads((resumed / "manifest.json").read_text())
    total = json.loads((reference / "manifest.json").read_text())
    assert 2 <= len(partial["shards"]) < len(total["shards"]), "the kill should land mid-run"
    (resumed / "maps").mkdir(exist_ok=True)  # what a kill while a level map is written leaves
    (resumed / "maps" / ".r00000-s1.npy.99999.tmp").write_bytes(bytes(4096))
    (resumed / ".manifest.json.99999.tmp").write_bytes(bytes(4096))  # a kill mid-commit (4 MB at 10M tiles)
    (resumed / ".ann.new.99999").mkdir()  # and a `build-ann` killed midway (GBs at continental scale)
    (resumed / ".ann.new.99999" / "index.faiss").write_bytes(bytes(4096))

    assert run_cli("index", "--out", resumed, *SMALL, raster).returncode == 0
    a, b = shard_arrays(reference), shard_arrays(resumed)
    assert a.keys() == b.keys() == {"records", "cells"}  # the default index: no tokens
    assert np.array_equal(a["records"], b["records"])
    assert np.array_equal(a["cells"], b["cells"])
    assert not [p for p in (resumed / "shards").iterdir() if p.name.startswith(".tmp")]
    assert not list((resumed / "maps").glob("*.tmp")) and not list(resumed.glob(".ann.new.*"))
    assert not list(resumed.glob(".manifest.json.*.tmp"))


def test_progress_is_written_once_per_step(tmp_path, rmnp_copy):
    """Each progress step was written twice (tqdm's set_postfix refreshes the bar, and so did
    the CLI after it): a log of the run, stderr not a terminal, held every line twice."""
    result = run_cli("index", "--out", tmp_path / "index", *[a for a in SMALL if a != "--quiet"], rmnp_copy)
    assert result.returncode == 0, result.stderr
    steps = re.findall(r"\| (\d+)/(\d+) \[[^]]*skipped=(\d+)\]", result.stderr)  # a step: tiles done, skipped
    unfinished = [(done, skipped) for done, total, skipped in steps if done != total]
    assert unfinished and len(unfinished) == len(set(unfinished)), result.stderr


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_run_commits_what_it_computed_and_says_so(tmp_path, assets, sent):
    """SIGTERM (a batch scheduler's time limit, a container stopping) ended a run with no word,
    losing what it had computed since its last commit: it now stops as Ctrl-C does, commits, and
    exits 128 + the signal saying how to resume. So does SIGHUP (its terminal closed), which
    killed the run outright (a probe's)."""
    out = tmp_path / "index"
    proc = subprocess.Popen([sys.executable, "-m", "worker", "index", "--out", str(out), *SMALL, str(assets["s2_rgb"])],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_a_terminal_starts_it)  # SIGHUP not ignored, under nohup too
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "manifest.json").exists()
                                           and json.loads((out / "manifest.json").read_text())["shards"]):
        time.sleep(0.05)
    time.sleep(0.5)  # chunks of 4 tiles computed since that commit (a run commits every 2 s or so)
    before = json.loads((out / "manifest.json").read_text())["tile_count"]
    proc.send_signal(sent)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sent and "terminated: committed work is kept" in err, err
    assert json.loads((out / "manifest.json").read_text())["tile_count"] > before, "what it computed, committed"
    assert run_cli("index", "--out", out, *SMALL, assets["s2_rgb"]).returncode == 0


def test_a_run_whose_terminal_closes_commits_and_exits_as_at_sighup(tmp_path, assets):
    """A real hangup, not a signal alone: writes to the closed terminal then fail (EIO), and the
    run exited 1 after its commit, the line saying so having raised (a review's). It exits 129."""
    import pty
    import select

    out = tmp_path / "index"
    pid, terminal = pty.fork()
    if pid == 0:  # the run, on a terminal of its own, as a terminal starts it (a test under nohup ignores SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "worker", "index", "--out", str(out), *map(str, SMALL),
                                  str(assets["s2_rgb"])])
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "manifest.json").exists()
                                           and json.loads((out / "manifest.json").read_text())["shards"]):
        if select.select([terminal], [], [], 0.05)[0]:
            os.read(terminal, 4096)  # its progress bar, read as a terminal would
    os.close(terminal)  # the terminal closes
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP
    assert json.loads((out / "manifest.json").read_text())["tile_count"] > 0


def test_a_run_reports_its_size_and_what_earlier_runs_did_before_its_first_tile(tmp_path, model, rmnp_copy):
    """A run's first progress report came with its first computed batch: on a cluster, whose
    first chunk (256 tiles) takes a minute or so, the bar and a service's job showed no size
    until then, and a resumed run's first report counted one batch more than it had found."""
    out, settings = tmp_path / "index", TileSettings(tile=112, scales=(1,))
    seen = []
    IndexWriter(out, model, settings, chunk_tiles=4).build([rmnp_copy], progress=seen.append,
                                                           should_stop=lambda: len(seen) >= 3)
    kept = len(TileIndex.open(out))
    assert seen[0].tiles_done == 0 and 0 < kept < seen[0].tiles_total
    again = []
    IndexWriter(out, model, settings).build([rmnp_copy], progress=again.append, should_stop=lambda: True)
    assert [(p.tiles_done, p.tiles_total) for p in again] == [(kept, seen[0].tiles_total)]
    assert len(TileIndex.open(out)) == kept  # stopped before its first tile


def test_shards_a_crash_left_uncommitted_are_removed_by_the_next_run(tmp_path, model, rmnp_copy):
    """A shard is written, then committed in one manifest write (no journal before it): what a
    crash leaves between the two, a shard or its temporary, is removed when the run resumes, and
    nothing else in the folder is touched."""
    from worker.store.format import SHARDS

    out, settings = tmp_path / "index", TileSettings(tile=112, scales=(1,))
    committed = []
    IndexWriter(out, model, settings, chunk_tiles=4).build([rmnp_copy], progress=committed.append,
                                                           should_stop=lambda: len(committed) >= 2)  # the plan, a chunk
    shards = out / SHARDS
    [first] = [p for p in shards.iterdir()]
    for stray in ("r00000-c000007", ".tmp-r00000-c000008"):  # as a crash leaves them
        shutil.copytree(first, shards / stray)
    (shards / "notes.txt").write_text("mine")
    IndexWriter(out, model, settings, chunk_tiles=4).build([rmnp_copy])
    names = {s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    assert {p.name for p in shards.iterdir()} == names | {"notes.txt"}
    assert "r00000-c000007" in names  # computed again, its stray copy replaced
    reference = tmp_path / "reference"
    IndexWriter(reference, model, settings, chunk_tiles=4).build([rmnp_copy])
    for key, values in shard_arrays(reference).items():
        assert np.array_equal(values, shard_arrays(out)[key]), key


def test_adding_a_raster_does_not_recompute_the_others(tmp_path, model, rmnp_copy, assets, monkeypatch):
    """Nor reads their pixels for a stretch: every run opens every raster it is given, and an
    8-bit one's look at its range took 0.05-0.15 s (a folder of 10,000 sheets: minutes a run)."""
    import worker.tiling

    settings = TileSettings(tile=112, scales=(1,))
    out = tmp_path / "index"
    IndexWriter(out, model, settings).build([rmnp_copy])
    first = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    looked_at, stretch = [], worker.tiling.robust_stretch
    monkeypatch.setattr(worker.tiling, "robust_stretch", lambda src, bands: looked_at.append(Path(src.name).name)
                        or stretch(src, bands))
    IndexWriter(out, model, settings).build([rmnp_copy, assets["osbs_rgb"]])
    assert looked_at == ["OSBS_029.tif"]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert all(after[name] == mtime for name, mtime in first.items())
    info = TileIndex.open(out).info()
    assert [Path(r["path"]).name for r in info["rasters"]] == ["rmnp-rgb.tif", "OSBS_029.tif"]
    assert info["complete"] and info["tile_count"] > len(first)


def test_a_raster_another_run_removed_meanwhile_is_not_given_its_old_record_back(tmp_path, model, rmnp_copy):
    """The records a run reuses a stretch from are read before it takes the index's lock: a raster
    another run removed meanwhile came back as a new entry with the removed record's stretch (an
    older version's, as here, or a damaged one's) (a review's)."""
    from worker.store.format import read_manifest, write_json_atomic
    from worker.store.removal import remove_rasters

    settings, out = TileSettings(tile=112, scales=(1,)), tmp_path / "index"
    IndexWriter(out, model, settings).build([rmnp_copy])
    manifest = read_manifest(out)
    [fresh] = [entry["stretch"] for entry in manifest["rasters"]]
    manifest["rasters"][0]["stretch"] = [[1.0, 2.0]] * 3  # as an older version might have recorded it
    write_json_atomic(out / "manifest.json", manifest)
    writer = IndexWriter(out, model, settings)  # reads the records
    remove_rasters(out, [str(rmnp_copy)])  # another run, before this one takes the lock
    writer.build([rmnp_copy])
    assert [entry["stretch"] for entry in read_manifest(out)["rasters"]] == [fresh]


def test_a_raster_changed_on_disk_is_indexed_again(tmp_path, model, rmnp_copy, caplog):
    """New pixels (here the scene upside down) give new cells, in place of the old ones, and the
    run says it indexes the raster again (it said nothing: a run of hours looked like a new one)."""
    import rasterio

    settings = TileSettings(tile=112, scales=(1,))
    out = tmp_path / "index"
    IndexWriter(out, model, settings).build([rmnp_copy])
    before = shard_arrays(out)
    with rasterio.open(rmnp_copy, "r+") as dst:
        dst.write(dst.read()[:, ::-1])
    with caplog.at_level(logging.WARNING, logger="worker"):
        IndexWriter(out, model, settings).build([rmnp_copy])
    assert f"{rmnp_copy}: changed on disk since it was indexed: indexing it again" in caplog.text
    after = shard_arrays(out)
    assert len(after["records"]) == len(before["records"])  # replaced, not duplicated
    assert (after["cells"] != before["cells"]).mean() > 0.1  # drawn from the new pixels


def test_a_mosaic_whose_source_changed_is_indexed_again(tmp_path, model, rmnp_copy):
    """A VRT mosaic does not change when a file it reads does (a sheet replaced by a newer
    flight): the change is seen all the same, and the mosaic indexed again."""
    from dataclasses import replace

    import rasterio

    from worker.tiling import disk_state

    with rasterio.open(rmnp_copy) as src:
        width, height, crs, geotransform = src.width, src.height, src.crs.to_wkt(), src.transform.to_gdal()
    with rasterio.open(rmnp_copy) as src:  # a second source, its blue band, uncompressed: rewritten, it keeps its size
        profile, pixels = {**src.profile, "compress": None}, src.read()
    with rasterio.open(blue := rmnp_copy.with_name("blue.tif"), "w", **profile) as dst:
        dst.write(pixels)
    os.utime(blue, ns=(10**18, 10**18))  # 2001: older than the first
    bands = "".join(f"""<VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{name}</ColorInterp><SimpleSource>
        <SourceFilename relativeToVRT="1">{source.name}</SourceFilename><SourceBand>{b}</SourceBand>
        </SimpleSource></VRTRasterBand>""" for b, name, source in ((1, "Red", rmnp_copy), (2, "Green", rmnp_copy),
                                                                   (3, "Blue", blue)))
    mosaic = rmnp_copy.with_name("mosaic.vrt")
    mosaic.write_text(f"""<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{escape(crs)}</SRS>
        <GeoTransform>{", ".join(map(str, geotransform))}</GeoTransform>{bands}</VRTDataset>""")
    settings = TileSettings(tile=112, scales=(1,))
    out = tmp_path / "index"
    IndexWriter(out, model, settings).build([mosaic])
    before = shard_arrays(out)
    vrt_stamp = mosaic.stat().st_mtime_ns
    with rasterio.open(rmnp_copy, "r+") as dst:
        dst.write(dst.read()[:, ::-1])
    assert mosaic.stat().st_mtime_ns == vrt_stamp
    IndexWriter(out, model, settings).build([mosaic])
    after = shard_arrays(out)
    assert len(after["records"]) == len(before["records"]) and (after["cells"] != before["cells"]).mean() > 0.1

    # a source replaced by a file of its size holding other pixels, with a time older than the other
    # source's (copied back from a backup with cp -p or rsync -t): the sources' total size and newest
    # time were all the stamp held, and the mosaic was "unchanged"
    [raster] = TileIndex.open(out).rasters.values()
    old_format = replace(raster, sources=raster.sources[:2])  # an index recorded before the digest
    assert not raster.changed_on_disk() and not old_format.changed_on_disk()
    size = blue.stat().st_size
    with rasterio.open(blue, "r+") as dst:
        dst.write(dst.read()[:, :, ::-1])
    os.utime(blue, ns=(9 * 10**17, 9 * 10**17))  # 1998
    assert blue.stat().st_size == size
    assert raster.changed_on_disk() and not old_format.changed_on_disk()
    IndexWriter(out, model, settings).build([mosaic])
    assert (shard_arrays(out)["cells"] != after["cells"]).mean() > 0.1, "indexed again"
    [raster] = TileIndex.open(out).rasters.values()
    rmnp_copy.unlink()  # a source gone: the mosaic cannot be read (it was said "changed")
    assert disk_state(raster) == "unreadable"


def test_a_mosaic_rewritten_at_its_size_and_time_is_changed(tmp_path, assets):
    """A mosaic's .vrt edited in place (its grid moved: a GeoTransform of the same length) and
    given back its time (rsync -t, touch -r, or an edit within a network disk's time
    resolution): its size and time say unchanged, and what GDAL read of it, kept for the
    minute's looks, must not (they are kept by its inode and change time too)."""
    from two_sheets import write_two_sheets

    from worker.tiling import open_raster

    mosaic, _ = write_two_sheets(assets["rmnp_rgb"], tmp_path)
    raster = open_raster(mosaic, None)
    assert not raster.changed_beside()
    before = mosaic.stat()
    text = mosaic.read_text()
    origin = text[text.index("<GeoTransform>") + len("<GeoTransform>"):].split(",")[0]
    moved = origin[:-1] + ("1" if origin[-1] != "1" else "2")  # the same length
    mosaic.write_text(text.replace(f"<GeoTransform>{origin},", f"<GeoTransform>{moved},"))
    os.utime(mosaic, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not raster.file_changed()
    assert raster.changed_beside() and raster.changed_on_disk()


def test_a_raster_georeferenced_again_beside_its_file_is_changed_and_indexed_again(tmp_path, model, rmnp_copy):
    """A PNG placed by a worldfile (and its CRS in an .aux.xml), moved 100 pixels east by editing
    the worldfile, as after georeferencing it again: its bytes did not change, so `info` said it was
    unchanged, indexing it again did nothing, and its hits were drawn where it no longer lies. Its
    grid is now compared too: it is changed, and indexing it again places it anew. An .aux.xml
    rewritten with statistics (as QGIS does when it shows a raster) changes nothing."""
    import rasterio

    from worker.tiling import _checked_beside, disk_state

    with rasterio.open(rmnp_copy) as src:
        pixels, crs, transform = src.read(), src.crs, src.transform
    png = tmp_path / "scan.png"
    with rasterio.open(png, "w", driver="PNG", width=pixels.shape[2], height=pixels.shape[1], count=3, dtype="uint8",
                       crs=crs, transform=transform, WORLDFILE="YES") as dst:
        dst.write(pixels)
    worldfile = png.with_suffix(".wld")
    assert worldfile.is_file() and png.with_name("scan.png.aux.xml").is_file()  # the grid, the CRS
    out, settings = tmp_path / "index", TileSettings(tile=112, scales=(1,))
    IndexWriter(out, model, settings).build([png])
    [raster] = TileIndex.open(out).rasters.values()
    with rasterio.open(png) as src:  # statistics written beside it, as QGIS writes them
        src.stats()
    assert disk_state(raster) == "unchanged" and not raster.changed_on_disk()
    lines = worldfile.read_text().splitlines()
    lines[4] = repr(float(lines[4]) + 100 * transform.a)  # the upper left pixel's x
    worldfile.write_text("\n".join(lines) + "\n")
    _checked_beside.clear()  # what a search learnt in the last minute
    assert disk_state(raster) == "changed" and raster.changed_on_disk()
    IndexWriter(out, model, settings).build([png])
    [again] = TileIndex.open(out).rasters.values()
    assert again.transform[2] == pytest.approx(raster.transform[2] + 100 * transform.a)
    assert not again.changed_on_disk()
    assert disk_state(again) == "unchanged", "not the old grid's answer, kept for a minute"


def test_an_empty_sheet_in_a_folder_adds_no_tiles_and_does_not_stop_the_run(tmp_path, model, rmnp_copy):
    """A tiled delivery's empty edge sheet (16-bit, every pixel nodata) in the folder indexed:
    its stretch could not be computed, and the whole run stopped ("band 1 has no valid
    pixels"), no index made. An 8-bit one was indexed with no tiles, as it now is too. A search
    of an index holding no tile says why it finds nothing."""
    import rasterio

    from test_service import sketch_png
    from worker.app import SearchRequest, run_search

    from conftest import write_raster
    from worker.tiling import find_rasters

    with rasterio.open(rmnp_copy) as src:
        profile = {"crs": src.crs, "transform": src.transform}
    folder = rmnp_copy.parent
    write_raster(folder / "z_empty.tif", np.zeros((3, 300, 300), np.uint16), nodata=0, **profile)
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build(find_rasters([folder]))
    index = TileIndex.open(out)
    tiles = {Path(index.rasters[r].path).name: n for r, n in index.tiles_per_raster.items()}
    assert tiles == {rmnp_copy.name: len(index)} and len(index) > 0
    assert [Path(r["path"]).name for r in index.manifest["rasters"] if r["complete"]] == sorted(
        [rmnp_copy.name, "z_empty.tif"])
    alone = tmp_path / "alone"  # an index of the empty sheet alone: its searches answered no hits, saying nothing
    IndexWriter(alone, model, TileSettings(tile=112, scales=(1,))).build([folder / "z_empty.tif"])
    with pytest.raises(InputError, match="alone holds no tiles: .* --min-valid"):
        run_search(SearchRequest(sketch_png(), top=5), model, TileIndex.open(alone))


def test_a_folder_of_sheets_with_their_mosaic_is_indexed_through_the_mosaic_alone(tmp_path, model, rmnp_copy):
    """A delivery folder: four map sheets and the VRT built over them. Indexed as found, every
    place came back twice (sheet and mosaic), and one across a sheet's edge, which no sheet
    holds whole, was found only through the mosaic. The sheets the VRT reads are now indexed
    through it alone; a sheet it does not read is indexed on its own."""
    import rasterio
    from rasterio.windows import Window

    from worker.tiling import find_rasters

    delivery = tmp_path / "delivery"
    delivery.mkdir()
    with rasterio.open(rmnp_copy) as src:
        width, height, crs, geotransform = src.width, src.height, src.crs.to_wkt(), src.transform.to_gdal()
        half_w, half_h, sheets = width // 2, height // 2, []
        for col, row in ((0, 0), (1, 0), (0, 1), (1, 1)):
            window = Window(col * half_w, row * half_h, half_w if col == 0 else width - half_w,
                            half_h if row == 0 else height - half_h)
            profile = {**src.profile, "width": window.width, "height": window.height,
                       "transform": src.window_transform(window)}
            with rasterio.open(sheet := delivery / f"sheet_{col}{row}.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
            sheets.append((sheet, window))
    bands = "".join(f"""<VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{name}</ColorInterp>""" + "".join(
        f"""<SimpleSource><SourceFilename relativeToVRT="1">{sheet.name}</SourceFilename><SourceBand>{b}</SourceBand>
        <DstRect xOff="{w.col_off}" yOff="{w.row_off}" xSize="{w.width}" ySize="{w.height}"/></SimpleSource>"""
        for sheet, w in sheets) + "</VRTRasterBand>" for b, name in ((1, "Red"), (2, "Green"), (3, "Blue")))
    (delivery / "mosaic.vrt").write_text(f"""<VRTDataset rasterXSize="{width}" rasterYSize="{height}">
        <SRS>{escape(crs)}</SRS><GeoTransform>{", ".join(map(str, geotransform))}</GeoTransform>{bands}</VRTDataset>""")
    extra = Path(shutil.copy(rmnp_copy, delivery / "z_other.tif"))  # not in the mosaic
    clip = delivery / "z_other_clip.vrt"  # a VRT of one file (a clip): not all of it, which stays
    clip.write_text(f"""<VRTDataset rasterXSize="100" rasterYSize="100"><SRS>{escape(crs)}</SRS>
        <GeoTransform>{", ".join(map(str, geotransform))}</GeoTransform><VRTRasterBand dataType="Byte" band="1">
        <SimpleSource><SourceFilename relativeToVRT="1">z_other.tif</SourceFilename><SourceBand>1</SourceBand>
        <SrcRect xOff="0" yOff="0" xSize="100" ySize="100"/></SimpleSource></VRTRasterBand></VRTDataset>""")
    assert find_rasters([delivery]) == [(delivery / "mosaic.vrt").resolve(), extra.resolve(), clip.resolve()]
    clip.unlink()
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build(find_rasters([delivery]))
    assert sorted(Path(r.path).name for r in TileIndex.open(out).rasters.values()) == ["mosaic.vrt", "z_other.tif"]


def test_a_mosaic_added_over_sheets_held_or_a_sheet_added_under_a_mosaic_held_is_said(tmp_path, model, assets,
                                                                                       caplog):
    """A run adds a mosaic whose sheets an earlier run indexed on their own, or a sheet of a
    mosaic the index holds: every place there came back twice, unsaid (a probe's: 168 tiles
    became 345). Within one run this is caught as rasters are found; across runs it is said."""
    from two_sheets import write_two_sheets

    mosaic, _ = write_two_sheets(assets["rmnp_rgb"], tmp_path)
    west, east = tmp_path / "west.tif", tmp_path / "east.tif"
    settings = TileSettings(tile=112, scales=(1,))
    IndexWriter(tmp_path / "sheets", model, settings).build([west, east])
    caplog.clear()
    IndexWriter(tmp_path / "sheets", model, settings).build([mosaic])
    assert f"{mosaic} reads 2 raster(s) the index already holds on their own ({east}, {west}): every place there " \
           "will come back twice" in caplog.text, caplog.text
    IndexWriter(tmp_path / "mosaic", model, settings).build([mosaic])
    caplog.clear()
    IndexWriter(tmp_path / "mosaic", model, settings).build([mosaic])  # again: nothing added, nothing said
    assert "twice" not in caplog.text
    IndexWriter(tmp_path / "mosaic", model, settings).build([east])
    assert f"{east} is read by {mosaic}, which the index already holds: every place there will come back twice" \
        in caplog.text, caplog.text
    # a mosaic of each sheet's own VRT (as gdalwarp -of VRT makes them, to mix CRSs), over sheets held; a zone's
    # mosaic added under a country's VRT held
    text = mosaic.read_text()
    for sheet in ("west", "east"):
        (tmp_path / f"{sheet}_alone.vrt").write_text(text.replace("west.tif", f"{sheet}.tif"))
    of_vrts = tmp_path / "of_vrts.vrt"
    of_vrts.write_text(text.replace("west.tif", "west_alone.vrt").replace("east.tif", "east_alone.vrt"))
    (tmp_path / "zone2.vrt").write_text(text)
    country = tmp_path / "country.vrt"
    country.write_text(text.replace("west.tif", "mosaic.vrt").replace("east.tif", "zone2.vrt"))
    caplog.clear()
    IndexWriter(tmp_path / "sheets", model, settings).build([of_vrts])
    assert f"{of_vrts} reads 2 raster(s) the index already holds on their own ({east}, {west})" in caplog.text
    IndexWriter(tmp_path / "country", model, settings).build([country])
    caplog.clear()
    IndexWriter(tmp_path / "country", model, settings).build([mosaic])
    assert f"{mosaic} is read by {country}, which the index already holds" in caplog.text, caplog.text


def test_an_index_of_a_mosaic_of_vrts_stamped_before_is_kept_and_watched_from_then_on(tmp_path, model, assets,
                                                                                       caplog):
    """A mosaic of VRTs was stamped by its own files alone (the inner .vrt files, not what they
    read). Indexed again, such an index was not told to index it again, nor was its stamp
    brought up to date: a sheet written over under it stayed unseen for the index's life."""
    import json

    import rasterio
    from two_sheets import write_two_sheets

    mosaic, _ = write_two_sheets(assets["rmnp_rgb"], tmp_path)
    text = mosaic.read_text()
    country = tmp_path / "country.vrt"
    country.write_text(text.replace("west.tif", "mosaic.vrt").replace("east.tif", "mosaic.vrt"))
    out, settings = tmp_path / "index", TileSettings(tile=112, scales=(1,))
    IndexWriter(out, model, settings).build([country])
    manifest = json.loads((out / "manifest.json").read_text())
    [entry] = manifest["rasters"]
    assert len(entry["sources"]) == 4
    entry["sources"] = entry["sources"][:3]  # as an index written before kept it
    (out / "manifest.json").write_text(json.dumps(manifest))
    tiles = len(TileIndex.open(out))
    caplog.clear()
    IndexWriter(out, model, settings).build([country])
    assert "changed on disk" not in caplog.text and len(TileIndex.open(out)) == tiles
    assert len(json.loads((out / "manifest.json").read_text())["rasters"][0]["sources"]) == 4
    with rasterio.open(tmp_path / "east.tif", "r+") as sheet:
        sheet.write(255 - sheet.read())
    IndexWriter(out, model, settings).build([country])
    assert f"{country}: changed on disk since it was indexed: indexing it again, whole" in caplog.text


def test_a_raster_gone_for_good_is_taken_out_of_the_index(tmp_path, model, rmnp_copy):
    """A raster deleted for good was left out of every search, said unreadable with advice to
    index it again, which failed ("raster not found"); indexing its folder again kept it, and
    nothing took it out. `remove` does: its entry, tiles, maps and tiles-layer rows go, the other
    raster's stay, and searches no longer name it."""
    import sqlite3

    from lab.pseudo_sketch import pseudo_sketch
    from worker.search import search
    from worker.sketch import prepare_sketch
    from worker.store.format import SHARDS, TILES_LAYER
    from worker.tiling import TileReader

    second = Path(shutil.copy(rmnp_copy, rmnp_copy.with_name("second.tif")))
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([rmnp_copy, second])
    before = TileIndex.open(out)
    kept_id = next(i for i, r in before.rasters.items() if r.path == str(rmnp_copy.resolve()))
    kept_tiles = before.tiles_per_raster[kept_id]
    with TileReader(before.tile(0).raster, 224) as reader:
        sketch = prepare_sketch(pseudo_sketch(reader.read(before.tile(0))[0], "canny"), 224)
    assert list((out / "maps").glob(f"r{1 - kept_id:05d}-*")), "its level maps, before"
    second.unlink()
    assert list(search(before, model, sketch, top=3).unreadable) == [str(second.resolve())]
    remove = lambda *paths: subprocess.run([sys.executable, "-m", "worker", "remove", str(out), *map(str, paths)],
                                           cwd=REPO, capture_output=True, text=True)
    refused = remove(second, tmp_path / "never-indexed.tif")
    assert refused.returncode == 2 and "holds no raster" in refused.stderr and "never-indexed.tif" in refused.stderr
    assert len(TileIndex.open(out)) == len(before), "nothing taken out when one raster is not in it"
    result = remove(second)
    assert result.returncode == 0, result.stderr
    said = json.loads(result.stdout)
    assert said["removed"] == [str(second.resolve())] and said["tile_count"] == kept_tiles
    after = TileIndex.open(out)
    assert [r.path for r in after.rasters.values()] == [str(rmnp_copy.resolve())] and len(after) == kept_tiles
    assert search(after, model, sketch, top=3).unreadable == {}
    assert {s["raster_id"] for s in after.manifest["shards"]} == {kept_id}
    assert len(os.listdir(out / SHARDS)) == len(after.manifest["shards"]), "its shards removed"
    assert not list((out / "maps").glob(f"r{1 - kept_id:05d}-*")), "its level maps removed"
    with sqlite3.connect(out / TILES_LAYER) as db:
        [table] = [r[0] for r in db.execute("SELECT table_name FROM gpkg_contents")]
        assert db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] == kept_tiles


def test_a_folder_of_rasters_is_taken_out_as_it_was_indexed(tmp_path, model, rmnp_copy):
    """A year of imagery indexed as a folder had to be taken out a file at a time: `remove` of
    the folder said the index held no such raster. Now it takes every raster the index holds
    below it, there or deleted, or linked from it, and only those; folders that would take every
    raster (`.`, an unset shell variable's "") are refused, and the index is left whole."""
    from worker.tiling import find_rasters

    year = tmp_path / "2019"
    year.mkdir()
    sheets = [Path(shutil.copy(rmnp_copy, year / name)) for name in ("a.tif", "b.tif")]
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build(find_rasters([rmnp_copy, year]))
    before = TileIndex.open(out)
    kept_tiles = next(n for i, n in before.tiles_per_raster.items() if before.rasters[i].path == str(rmnp_copy))
    remove = lambda *paths: subprocess.run([sys.executable, "-m", "worker", "remove", str(out), *map(str, paths)],
                                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                                           capture_output=True, text=True)
    refused = remove(tmp_path / "2020")
    assert refused.returncode == 2 and "holds no raster" in refused.stderr and "any below it" in refused.stderr
    for everything in (".", ""):
        refused = remove(everything)
        assert refused.returncode == 2 and "holds every raster" in refused.stderr, refused.stderr
    assert len(TileIndex.open(out).rasters) == 3, "nothing taken out"
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "first.tif").symlink_to(sheets[0])  # indexed as its target, as `index links` finds it
    result = remove(tmp_path / "links")
    assert result.returncode == 0 and json.loads(result.stdout)["removed"] == [str(sheets[0])], result.stderr
    shutil.rmtree(year)  # deleted for good
    result = remove(year)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"removed": [str(sheets[1])], "tile_count": kept_tiles}
    assert [r.path for r in TileIndex.open(out).rasters.values()] == [str(rmnp_copy)]


def test_a_raster_whose_shard_is_damaged_is_taken_out(tmp_path, model, rmnp_copy):
    """A damaged shard makes the index refuse to open until indexed again; `remove` refused too,
    though taking that raster out (a sheet withdrawn, a file lost with the disk that damaged its
    shard) is what the user asked, and mends the index."""
    from worker.errors import CorruptIndexError
    from worker.store.format import SHARDS

    second = Path(shutil.copy(rmnp_copy, rmnp_copy.with_name("second.tif")))
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([rmnp_copy, second])
    index = TileIndex.open(out)
    second_id = next(i for i, r in index.rasters.items() if r.path == str(second.resolve()))
    shard = next(s["name"] for s in index.manifest["shards"] if s["raster_id"] == second_id)
    damaged = sorted((out / SHARDS / shard).glob("*.npy"))[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(CorruptIndexError):
        TileIndex.open(out)
    result = subprocess.run([sys.executable, "-m", "worker", "remove", str(out), str(second)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [r.path for r in TileIndex.open(out).rasters.values()] == [str(rmnp_copy.resolve())]


def test_a_search_of_an_index_changed_under_it_answers_the_index_as_it_is_now(tmp_path, model, rmnp_copy, assets):
    """Found by the lifecycle probe: a command-line search opens the index, then loads the model
    (seconds). A raster removed meanwhile failed it as damaged, "index its rasters again" of the
    raster just removed; one removed and another indexed in its place (its id and shard names
    reused) answered the new raster's features under the removed one's name, unsaid. The search
    answers the index as it is now."""
    import rasterio

    from test_service import sketch_png
    from worker.app import SearchRequest, open_index, run_search, search_as_it_is
    from worker.errors import CorruptIndexError
    from worker.store.removal import remove_rasters

    keep = Path(shutil.copy(assets["osbs_rgb"], tmp_path / "keep.tif"))
    new = tmp_path / "new.tif"
    with rasterio.open(rmnp_copy) as src:
        with rasterio.open(new, "w", **src.profile) as dst:
            dst.write(src.read()[:, ::-1, ::-1])  # the same grid, other pixels
    request, settings = SearchRequest(sketch_png(), top=5), TileSettings(tile=112, scales=(1,))

    def as_it_is_now(outdated: TileIndex) -> TileIndex:
        return open_index(outdated.dir, earlier=outdated)

    for case in ("removed", "removed, another indexed in its place"):
        out = tmp_path / case.replace(" ", "_").replace(",", "")
        IndexWriter(out, model, settings).build([keep, rmnp_copy])
        opened = open_index(out)
        remove_rasters(out, [str(rmnp_copy)])
        if case == "removed":
            with pytest.raises(CorruptIndexError):
                run_search(request, model, opened)  # what the view alone answers
        else:
            IndexWriter(out, model, settings).build([new])
            assert {r.path: i for i, r in open_index(out).rasters.items()}[str(new)] == \
                {r.path: i for i, r in opened.rasters.items()}[str(rmnp_copy.resolve())], "the id is reused"
        now = [(h.raster_path, h.placement.cx, h.placement.cy) for h in run_search(request, model, open_index(out)).ranked]
        answered = search_as_it_is(request, model, opened, as_it_is_now, "the index").ranked
        assert [(h.raster_path, h.placement.cx, h.placement.cy) for h in answered] == now, case
        assert str(rmnp_copy.resolve()) not in {path for path, _, _ in now}, case

    out = tmp_path / "extended"  # an indexing run's commits only add: the view is still what the index holds
    IndexWriter(out, model, settings).build([keep])
    opened = open_index(out)
    IndexWriter(out, model, settings).build([new])
    assert not opened.outdated()

    def never(_: TileIndex) -> TileIndex:
        raise AssertionError("searched again")

    assert search_as_it_is(request, model, opened, never, "the index").ranked
    remove_rasters(out, [str(new)])
    assert not opened.outdated(), "a raster it never read removed"
    remove_rasters(out, [str(keep)])
    assert opened.outdated()


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_an_index_folder_removed_while_it_is_built_stays_removed(tmp_path, model, rmnp_copy, order):
    """Found by the lifecycle probe: `rm -rf` of an index while a service job wrote it; the job
    made the folder again (its next shard's parents) and committed a manifest naming the shards
    removed with it, an index come back damaged. Removed as rm does, beside the run (each folder
    read, its entries removed one by one, then the folder, which fails if the run wrote into it
    meanwhile), in either order: the run stops saying why, and no index is left."""
    import threading

    out = tmp_path / "index"
    refused = []

    def rm_rf(folder: Path) -> None:
        entries = sorted(os.listdir(folder))
        for entry in entries if order == "sorted" else entries[::-1]:
            path = folder / entry
            if path.is_dir():
                rm_rf(path)
            else:
                path.unlink(missing_ok=True)
            time.sleep(0.02)
        try:
            folder.rmdir()
        except OSError as exc:
            refused.append(exc)

    removing, started = threading.Thread(target=rm_rf, args=(out,)), []

    def remove_once_started(progress) -> None:
        if progress.tiles_done and not started:
            started.append(progress.tiles_done)
            removing.start()

    writer = IndexWriter(out, model, TileSettings(tile=112, scales=(1,)), chunk_tiles=8, commit_every_s=0)
    with pytest.raises(InputError, match="was removed while this run wrote it"):
        writer.build([rmnp_copy], progress=remove_once_started)
    removing.join()
    assert not (out / "manifest.json").exists(), "no index came back"


@pytest.mark.parametrize("removed", ["the folder", "the shard being written"])
def test_an_index_folder_removed_under_a_shards_write_is_said_removed(tmp_path, model, rmnp_copy, monkeypatch,
                                                                     removed):
    """The folder removed between the run's check that it is in place and the shard's write, or
    rm -rf reaching the shard the run is writing before the folders it checks (CI runs of the
    test above met both): the write's "No such file or directory" was the run's error, a storage
    error telling to run the job again, not that the index was removed."""
    import worker.store.format as format_module
    import worker.store.writer as writer_module
    from worker.store.format import TMP_PREFIX

    out, written = tmp_path / "index", []
    write_shard, sync_folder = writer_module.write_shard, format_module.sync_folder

    def removed_first(index_dir, name, arrays):
        if written and removed == "the folder":  # the second shard: its folder gone just before
            shutil.rmtree(out)
        written.append(name)
        write_shard(index_dir, name, arrays)

    def shard_removed_first(folder):
        if len(written) == 2 and folder.name == f"{TMP_PREFIX}{written[1]}":  # its files written, its folder gone
            shutil.rmtree(folder)
        sync_folder(folder)

    monkeypatch.setattr(writer_module, "write_shard", removed_first)
    if removed == "the shard being written":
        monkeypatch.setattr(format_module, "sync_folder", shard_removed_first)
    writer = IndexWriter(out, model, TileSettings(tile=112, scales=(1,)), chunk_tiles=8, commit_every_s=0)
    with pytest.raises(InputError, match="was removed while this run wrote it"):
        writer.build([rmnp_copy])
    assert len(written) == 2


def test_maps_written_band_by_band_hold_the_cells_joined_whole(tmp_path, model, assets):
    """A raster's level maps are joined into their files a band of rows at a time (a continental
    mosaic's map and its tiles' cells do not fit in memory at once): the same cells as every tile
    joined at once, at any band height."""
    from worker.store.maps import join_map, map_file, write_joined_maps

    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1, 2))).build([assets["rmnp_rgb"]])
    index = TileIndex.open(out)
    whole = {key: join_map(index, key).level for key in index.map_keys}
    assert len(whole) == 2 and all(level.cells.any() for level in whole.values())
    for band in (None, 7, 64):  # the writer's own, then odd heights whose bands cut through tiles
        if band:
            write_joined_maps(index, band_cells=band)
        for key, level in whole.items():
            assert np.array_equal(np.load(map_file(out, *key)), level.cells), (band, key)


def test_maps_are_the_same_whatever_order_the_chunks_were_committed_in(tmp_path, model, assets):
    """A cluster commits chunks as they finish, and a resumed run after the chunks it kept: the
    maps took a cell two tiles' centres are equally near from the first tile in commit order, so
    a cluster's index searched differently from one process's (hits at ranks 5-7 moved). Now
    the first in the raster's tile order: the same maps, written or joined in memory, also when
    a join continues one made before the tiles committed earlier in tile order (which it takes
    over, not joining the map afresh)."""
    from worker.store.maps import join_map, map_file, write_joined_maps

    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1, 2)), chunk_tiles=4).build([assets["rmnp_rgb"]])
    index = TileIndex.open(out)
    shards = index.manifest["shards"]
    assert len(shards) >= 6
    finished_first = shards[len(shards) // 2:] + shards[:len(shards) // 2]  # the later chunks finished first
    as_committed = TileIndex(out, index.manifest, finished_first)
    before_the_rest = TileIndex(out, index.manifest, finished_first[:2])
    write_joined_maps(as_committed)
    for key in index.map_keys:
        want = join_map(index, key).level.cells
        assert np.array_equal(join_map(as_committed, key).level.cells, want), key
        assert np.array_equal(np.load(map_file(out, *key)), want), key
        if key in before_the_rest.map_keys:
            continued = join_map(as_committed, key, join_map(before_the_rest, key))
            assert continued.continued == len(before_the_rest.rows_of_map(*key)) > 0, key
            assert np.array_equal(continued.level.cells, want), key
            assert np.array_equal(continued.nearest, join_map(index, key).nearest), key  # for the next join


def test_info_says_which_rasters_changed_or_went_since_they_were_indexed(tmp_path, model, rmnp_copy, assets):
    """A raster changed on disk is searched by its old pixels' features until indexed again, and
    `info` said nothing of it (its shortlist "current" beside). Now each raster says how its file
    is: unchanged, changed, or unreadable (gone)."""
    import rasterio

    from worker.app import index_info

    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([rmnp_copy, assets["osbs_rgb"]])

    def states() -> list[str]:
        return [r["on_disk"] for r in index_info(TileIndex.open(out))["rasters"]]

    assert states() == ["unchanged", "unchanged"]
    with rasterio.open(rmnp_copy, "r+") as dst:
        dst.write(255 - dst.read())
    assert states() == ["changed", "unchanged"]
    rmnp_copy.unlink()
    assert states() == ["unreadable", "unchanged"]


@pytest.mark.parametrize("field", ["tiles_skipped", "crs_wkt", "complete"])
def test_a_manifest_whose_raster_entry_lacks_a_field_is_said_damaged_by_info_and_search(tmp_path, s2_index, field):
    """A raster's entry without a field (a hand edit, another tool's) failed `info` with a
    KeyError traceback: it is a damaged manifest, said with what to do, as one missing a shard's."""
    index = tmp_path / "index"
    shutil.copytree(s2_index, index)
    manifest = json.loads((index / "manifest.json").read_text())
    del manifest["rasters"][0][field]
    (index / "manifest.json").write_text(json.dumps(manifest))
    sketch = tmp_path / "sketch.png"
    from PIL import Image, ImageDraw

    drawing = Image.new("L", (224, 224), 255)
    ImageDraw.Draw(drawing).line([(20, 30), (200, 190)], fill=0, width=3)
    drawing.save(sketch)
    for result in (run_cli("info", index), run_cli("search", index, "--sketch", sketch, "--out", tmp_path / "h.geojson")):
        assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
        assert "manifest.json is damaged (rasters[0] missing or malformed): delete the index" in result.stderr


@pytest.mark.parametrize("change", [{"rasters": 5}, {"shards": 5}, {"raster": {"sources": "a.tif"}},
                                    {"raster": {"palette": "yes"}}, {"raster": {"stretch": 7}}])
def test_a_manifest_of_the_wrong_shape_is_damaged_not_a_traceback(s2_index, change):
    """A list field that is no list raised TypeError (int is not iterable); an entry's optional
    fields of another type failed later, reading its raster (the review)."""
    from worker.errors import CorruptIndexError
    from worker.store.format import check_manifest_shape

    manifest = json.loads((s2_index / "manifest.json").read_text())
    if "raster" in change:
        manifest["rasters"][0] = {**manifest["rasters"][0], **change["raster"]}
    else:
        manifest.update(change)
    with pytest.raises(CorruptIndexError, match="missing or malformed"):
        check_manifest_shape(manifest, s2_index / "manifest.json")


def test_a_refused_raster_leaves_no_index_folder(tmp_path):
    """The index command refused a file that is no raster, and left the new index's folder (with
    its lock) behind: the next run of another name found a stray folder."""
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00 not a TIFF after all")
    result = run_cli("index", "--out", tmp_path / "index", *SMALL, junk)
    assert result.returncode != 0 and "not a readable raster" in result.stderr
    assert not (tmp_path / "index").exists()


def test_an_index_is_built_below_another_programs_manifest_and_never_over_it(tmp_path, rmnp_copy):
    """Every folder holding a manifest.json was taken for an index's: an index below a web app's
    (or below the home folder, holding one) was refused as "inside the index". A folder holding
    another program's manifest.json is no index to extend: building there is refused, leaving it
    as it was; a folder below a real index still is refused."""
    project = tmp_path / "webapp"
    project.mkdir()
    theirs = '{"name": "a web app", "icons": []}'
    (project / "manifest.json").write_text(theirs)
    result = run_cli("index", "--out", project / "index", *SMALL, rmnp_copy)
    assert result.returncode == 0, result.stderr
    assert len(TileIndex.open(project / "index")) > 0
    over = run_cli("index", "--out", project, *SMALL, rmnp_copy)
    assert over.returncode == 2 and "holds other things" in over.stderr and "manifest.json" in over.stderr, over.stderr
    assert (project / "manifest.json").read_text() == theirs and sorted(p.name for p in project.iterdir()) == [
        "index", "manifest.json"]
    inner = run_cli("index", "--out", project / "index" / "inner", *SMALL, rmnp_copy)
    assert inner.returncode == 2 and f"inside the index {project / 'index'}" in inner.stderr, inner.stderr


def test_a_mosaic_missing_a_source_is_refused_naming_it_before_any_tile(tmp_path, rmnp_copy):
    """A VRT whose second sheet is gone: GDAL opens it, and indexing failed midway, at the first
    tile over the gap, with "Read failed" and no file named, leaving a partial index."""
    import rasterio

    with rasterio.open(rmnp_copy) as src:
        width, height, crs, geotransform = src.width, src.height, src.crs.to_wkt(), src.transform.to_gdal()
    sources = "".join(f"""<SimpleSource><SourceFilename relativeToVRT="1">{{name}}</SourceFilename>
        <SourceBand>{{b}}</SourceBand><DstRect xOff="{x}" yOff="0" xSize="{width // 2}" ySize="{height}"/>
        <SrcRect xOff="{x}" yOff="0" xSize="{width // 2}" ySize="{height}"/></SimpleSource>""".replace("{name}", name)
                      for x, name in ((0, rmnp_copy.name), (width // 2, "gone.tif")))
    bands = "".join(f"""<VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{name}</ColorInterp>
        {sources.replace("{b}", str(b))}</VRTRasterBand>""" for b, name in ((1, "Red"), (2, "Green"), (3, "Blue")))
    mosaic = tmp_path / "mosaic.vrt"
    mosaic.write_text(f"""<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{escape(crs)}</SRS>
        <GeoTransform>{", ".join(map(str, geotransform))}</GeoTransform>{bands}</VRTDataset>""")
    result = run_cli("index", "--out", tmp_path / "index", *SMALL, mosaic)
    assert result.returncode == 2 and "gone.tif is missing" in result.stderr and "gdalbuildvrt" in result.stderr
    assert not (tmp_path / "index").exists()
    from worker.tiling import open_raster

    by_driver = tmp_path / "by_driver.vrt"  # a source named by a GDAL driver prefix is no file name, and not missing
    by_driver.write_text(mosaic.read_text().replace('relativeToVRT="1">gone.tif',
                                                    f'relativeToVRT="0">GTIFF_DIR:1:{rmnp_copy}'))
    assert open_raster(by_driver, None).width == width


def test_a_file_written_through_a_memory_map_on_a_full_disk_is_an_error_not_a_crash(tmp_path):
    """Level maps and the shortlist's codes are written through memory maps. Into a sparse file
    on a full disk, a write raised SIGBUS: the process (a worker service, and every client's
    search with it) died with no message. Their blocks are now allocated first, so a full disk
    is an OSError, which the writers report as a storage error (a 1 MB tmpfs stands for it)."""
    import errno

    from worker.store.format import allocated_memmap

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here (needs root)")
    try:
        with pytest.raises(OSError) as raised:
            allocated_memmap(small / "map.npy", np.uint8, (4_000_000,))
        assert raised.value.errno == errno.ENOSPC
        fits = allocated_memmap(small / "fits.npy", np.uint8, (100_000,))
        fits[:] = 7
        del fits
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_raster_too_small_for_a_tile_says_so(tmp_path, model, rmnp_copy, caplog):
    """A raster smaller than a tile has no tile with enough data: it is complete, and a warning
    says how to index it (one all nodata, that it is nodata: it was told to take a smaller tile);
    a GDAL virtual path is refused with what to do."""
    import rasterio

    from conftest import write_raster
    from worker.tiling import find_rasters

    with rasterio.open(rmnp_copy) as src:
        small = write_raster(tmp_path / "small.tif", src.read(window=((0, 60), (0, 60))), crs=src.crs,
                             transform=src.transform)
        blank = write_raster(tmp_path / "blank.tif", np.zeros((3, 400, 400), np.uint8), crs=src.crs,
                             transform=src.transform, nodata=0)
    IndexWriter(tmp_path / "index", model, TileSettings(tile=224, scales=(1,))).build([small, blank])
    assert TileIndex.open(tmp_path / "index").info()["tile_count"] == 0
    assert any("small.tif" in r.message and "smaller --tile" in r.message for r in caplog.records)
    [said] = [r.message for r in caplog.records if "blank.tif" in r.message]  # large enough: its data is missing
    assert "it is nodata (or masked) where a tile falls" in said and "smaller --tile" not in said, said
    with rasterio.open(rmnp_copy) as src:
        whole = write_raster(tmp_path / "whole.tif", src.read(window=((0, 300), (0, 300))), crs=src.crs,
                             transform=src.transform)
    IndexWriter(tmp_path / "twice", model, TileSettings(tile=224, scales=(2,))).build([whole])
    [said] = [r.message for r in caplog.records if "whole.tif" in r.message]  # all data, smaller than 448 px
    assert "a window of 448 px" in said and "needs a smaller --tile (or --scales 1)" in said, said
    with pytest.raises(InputError, match="virtual paths.*copy or extract"):
        find_rasters([f"/vsizip/{tmp_path}/mosaic.zip/sheet.tif"])


def test_a_continental_rasters_tiles_are_planned_without_being_held(tmp_path, model):
    """A mosaic of 200,000 px a side is 1.86M tiles at scales 1, 2 and 4. Its tiles were planned
    as objects before the first was read: 342 MB of the driver's memory and 4.5 s, 1.8 GB at 10M
    tiles. Now a chunk holds its place in the plan, and the run still counts every tile."""
    import tracemalloc

    from worker.store.writer import LocalChunks

    side = 200_000
    mosaic = tmp_path / "continent.vrt"  # no sources: the plan is the point, no tile is read
    mosaic.write_text(f'<VRTDataset rasterXSize="{side}" rasterYSize="{side}"><SRS>EPSG:3857</SRS>'
                      '<GeoTransform>0, 10, 0, 0, 0, -10</GeoTransform><VRTRasterBand dataType="Byte" band="1"/>'
                      '</VRTDataset>')
    settings = TileSettings()
    tracemalloc.start()
    try:
        manifest = IndexWriter(tmp_path / "index", model, settings).build(
            [mosaic], should_stop=lambda: True, computer=LocalChunks(model, processes=0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    per_side = {s: -(-(side - 224 * s) // (168 * s)) + 1 for s in settings.scales}
    assert manifest["rasters"][0]["tiles_total"] == sum(n * n for n in per_side.values()) == 1_861_310
    assert peak < 40e6, f"planning held {peak / 1e6:.0f} MB"


def test_a_run_is_complete_when_its_own_rasters_are(tmp_path, model, rmnp_copy, assets):
    """One raster's run was stopped, another's finished: the second run is complete (its job is
    done, not `interrupted` and resumed at every worker start), and says why the shortlist it
    asked for waits."""
    from worker.app import IndexRequest, build_index
    from worker.tiling import find_rasters

    settings = TileSettings(tile=112, scales=(1,))
    out = tmp_path / "index"
    stopped = build_index(IndexRequest(out, tuple(find_rasters([rmnp_copy])), settings, ann=True), model,
                          should_stop=lambda: True)
    assert not stopped.complete
    done = build_index(IndexRequest(out, tuple(find_rasters([assets["osbs_rgb"]])), settings, ann=True), model)
    assert done.complete and done.ann["built"] is False and "rmnp-rgb.tif" in done.ann["why"]


def test_a_raster_being_indexed_is_searched_while_its_maps_fit_in_memory(tmp_path, model, rmnp_copy, assets):
    """A search while a raster is being indexed joins its committed tiles' maps in memory, whole:
    a state's 0.3 m imagery as one VRT would need tens of GB. Within the worker's budget the
    raster is searched, and the reply says it was searched in part (it said nothing, after a run
    that stopped too); over it, it is left out by either ranker (the other rasters are searched)
    and the reply says which and why; once indexed it is searched again, whole."""
    from dataclasses import replace

    from test_service import sketch_png
    from worker.app import SearchRequest, run_search
    from worker.service.indexes import OpenIndexes

    out, settings = tmp_path / "index", TileSettings(tile=112, scales=(1,))
    IndexWriter(out, model, settings, chunk_tiles=8, tokens=True).build([assets["osbs_rgb"]])
    committed = []
    IndexWriter(out, model, settings).build([rmnp_copy], progress=committed.append,
                                            should_stop=lambda: len(committed) >= 3)  # the plan, 2 steps
    assert [r["complete"] for r in TileIndex.open(out).manifest["rasters"]] == [True, False]
    request = SearchRequest(sketch_png(), top=50)

    def rasters_hit(budget: int | None, ranker: str = "layout") -> tuple[set, list]:
        asked = replace(request, ranker=ranker) if ranker != "layout" else request
        reply = run_search(asked, model, OpenIndexes(model, budget).searchable(out)).to_json()
        searched[budget, ranker] = reply["partly_indexed"]
        return {f["properties"]["raster"] for f in reply["hits"]["features"]}, reply["left_out"]

    searched: dict[tuple, list] = {}
    assert rasters_hit(None) == ({str(assets["osbs_rgb"]), str(rmnp_copy)}, []), "the default budget holds it"
    [partly] = searched[None, "layout"]
    entry = TileIndex.open(out).manifest["rasters"][1]
    assert partly["raster"] == str(rmnp_copy) and partly["tiles_total"] == entry["tiles_total"]
    assert 0 < partly["tiles_done"] < partly["tiles_total"] and "index the raster again" in partly["reason"]
    elsewhere = run_search(replace(request, bbox=(10.0, 10.0, 11.0, 11.0)), model, TileIndex.open(out)).to_json()
    assert elsewhere["partly_indexed"] == [], "a search in an area away from it does not name it"
    for ranker in ("layout", "tokens"):
        hit, left_out = rasters_hit(1000, ranker)
        assert hit == {str(assets["osbs_rgb"])}, ranker
        assert [r["raster"] for r in left_out] == [str(rmnp_copy)] and searched[1000, ranker] == []
        assert "being indexed" in left_out[0]["reason"] and "--max-partial-maps-mb" in left_out[0]["reason"]
    IndexWriter(out, model, settings).build([rmnp_copy])  # the run resumed to its end
    assert rasters_hit(1000) == ({str(assets["osbs_rgb"]), str(rmnp_copy)}, []) and searched[1000, "layout"] == []


def test_a_search_before_a_rasters_first_commit_says_it_is_being_indexed(tmp_path, model, rmnp_copy, assets):
    """A search of an index whose raster has no tile committed yet (a job just started) names
    it in `left_out`: it answered no hits and nothing else, as if the raster held no match."""
    from test_service import sketch_png
    from worker.app import SearchRequest, run_search

    out, settings = tmp_path / "index", TileSettings(tile=112, scales=(1,))
    IndexWriter(out, model, settings).build([assets["osbs_rgb"]])
    IndexWriter(out, model, settings).build([rmnp_copy], should_stop=lambda: True)
    reply = run_search(SearchRequest(sketch_png(), top=5), model, TileIndex.open(out)).to_json()
    assert {f["properties"]["raster"] for f in reply["hits"]["features"]} == {str(assets["osbs_rgb"])}
    assert [(r["raster"], r["kind"]) for r in reply["left_out"]] == [(str(rmnp_copy), "indexing")]
    assert "none of its tiles is committed" in reply["left_out"][0]["reason"]


def test_searches_while_a_raster_is_indexed_paint_only_each_commits_tiles_onto_the_last_join(tmp_path, model, assets):
    """The worker opens an index again after each commit of a raster being indexed: its maps
    continue the last view's join with the new tiles alone (joined afresh, a 30,000 px raster's
    took seconds after every commit), and hold the same cells as every committed tile joined
    at once, at both scales, where the new tiles overlap the old. Once the raster is complete,
    nothing joined is kept."""
    from worker.store import MANIFEST
    from worker.store.maps import join_map
    from worker.service.indexes import OpenIndexes

    out, indexes, views = tmp_path / "index", OpenIndexes(model), []

    def search_view(_) -> None:  # as a search between batches would: the index as now committed, its maps joined
        if (out / MANIFEST).is_file() and len(index := indexes.get(out)):
            index.maps
            if not views or views[-1] is not index:
                views.append(index)

    IndexWriter(out, model, TileSettings(tile=112, scales=(1, 2)), chunk_tiles=8,
                commit_every_s=0).build([assets["rmnp_rgb"]], progress=search_view)  # 0: a commit after every chunk
    assert len(views) >= 4, "the run should commit several times"
    continued = 0
    for earlier, view in zip(views, views[1:]):
        # the shards it opened are kept, and only those added since are opened
        assert all(a is b for a, b in zip(view._arrays["cells"], earlier._arrays["cells"]))
        assert len(view._arrays["cells"]) > len(earlier._arrays["cells"])
        assert np.array_equal(view.records, TileIndex(out, view.manifest, view.manifest["shards"]).records)
        for key, joined in view.joins_to_continue.items():
            assert np.array_equal(joined.level.cells, join_map(view, key).level.cells), key
            if key in earlier.joins_to_continue:
                assert joined.continued == len(earlier.rows_of_map(*key)) > 0, key
                continued += 1
    assert continued >= 3
    done = indexes.get(out)  # complete: its maps are read from their files, and the last joins are let go
    assert all(r["complete"] for r in done.manifest["rasters"]) and done.joins_to_continue == {}
    for path in (out / "maps").glob("*.npy"):  # as an index written before maps were kept: joined, nothing kept
        path.unlink()
    old_style = TileIndex.open(out)
    assert len(old_style.maps) == 2 and old_style.joins_to_continue == {}


def test_a_view_after_a_raster_was_indexed_again_opens_its_shards_afresh(tmp_path, model, rmnp_copy):
    """A raster changed on disk is dropped and indexed again, its shards under the same names:
    a view opened before must not lend the new view its old records and arrays."""
    import rasterio

    out = tmp_path / "index"
    settings = TileSettings(tile=112, scales=(1,))
    IndexWriter(out, model, settings).build([rmnp_copy])
    before = TileIndex.open(out)
    with rasterio.open(rmnp_copy, "r+") as dst:
        dst.write(255 - dst.read())
    IndexWriter(out, model, settings).build([rmnp_copy])
    after = TileIndex.open(out, earlier=before)
    assert [s["name"] for s in after._shards] == [s["name"] for s in before._shards]
    assert not any(a is b for a, b in zip(after._arrays["cells"], before._arrays["cells"]))
    assert np.array_equal(after.records, TileIndex.open(out).records)


def test_an_index_is_extended_with_its_own_settings_unless_others_are_given(tmp_path, model, rmnp_copy):
    """Extending an index built with --tile 112 --scales 1 --bands 1,2,3 by naming the new raster
    alone was refused as another index's settings (exit 3): every setting had to be given again."""
    out = tmp_path / "index"
    own = TileSettings(tile=112, scales=(1,), bands=(1, 2, 3))
    IndexWriter(out, model, own).build([rmnp_copy])
    added = shutil.copy(rmnp_copy, rmnp_copy.with_name("added.tif"))
    result = run_cli("index", "--out", out, added)
    assert result.returncode == 0, result.stderr
    index = TileIndex.open(out)
    assert len(index.rasters) == 2 and TileSettings.from_json(index.manifest["tiling"]) == own
    refused = run_cli("index", "--out", out, "--scales", "1,2", added)  # given otherwise: refused, as before
    assert refused.returncode == 3 and "tile settings" in refused.stderr


def test_a_run_adding_a_raster_names_those_an_earlier_run_left_unfinished(tmp_path, model, assets, rmnp_copy):
    """A raster an earlier run could not read whole stays unfinished; a run that added another
    ended 0 and said nothing of it, so the user took the index as complete."""
    from conftest import damaged_near_its_end
    from worker.store.writer import UnreadRasters

    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=128, scales=(1, 2)), 12).build([rmnp_copy])
    whole = run_cli("index", "--out", out, "--quiet", assets["osbs_rgb"])
    assert whole.returncode == 0 and not whole.stderr, whole.stderr
    assert json.loads(whole.stdout)["unfinished"] == []

    damaged, _ = damaged_near_its_end(tmp_path, assets)
    with pytest.raises(UnreadRasters):
        IndexWriter(out, model, TileSettings(tile=128, scales=(1, 2)), 12).build([damaged])
    added = shutil.copy(rmnp_copy, rmnp_copy.with_name("added.tif"))
    result = run_cli("index", "--out", out, "--quiet", added)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["unfinished"] == [str(damaged)]
    assert re.search(r"^warning: 1 other raster\(s\) of the index not fully indexed .*: name them in a run to finish "
                     rf"them: {re.escape(str(damaged))}$", result.stderr, re.MULTILINE), result.stderr


def test_other_settings_or_model_are_refused(tmp_path, model, rmnp_copy):
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([rmnp_copy])
    with pytest.raises(IndexMismatchError, match="tile settings"):
        IndexWriter(out, model, TileSettings(tile=224, scales=(1,)))
    result = run_cli("index", "--out", out, "--tile", "112", "--scales", "1", "--tile-view", "rgb", rmnp_copy)
    assert result.returncode == 3, "an index to build again: its own exit status (scripts/demo builds it again)"
    assert "built with another model (tile view (--tile-view) edges, this worker's rgb)" in result.stderr, result.stderr
    result = run_cli("index", "--out", out, "--tile", "112", "--scales", "1", "--img-size", "112", rmnp_copy)
    assert result.returncode == 3 and "input size (--img-size) 224, this worker's 112" in result.stderr, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))  # an index of an older version
    with pytest.raises(IndexMismatchError, match="build it again"):
        TileIndex.open(out)


def test_an_index_holds_tokens_only_when_asked_and_keeps_its_choice(tmp_path, model, rmnp_copy, assets):
    """A new index holds the tiles' ViT tokens only when built with `--tokens`; extending an index
    keeps its choice, and asking it for the other one is refused before any work. An index of
    format 4, from before the choice, holds them and stays usable."""
    plain, with_tokens = tmp_path / "plain", tmp_path / "tokens"
    assert run_cli("index", "--out", plain, *SMALL, rmnp_copy).returncode == 0
    assert run_cli("index", "--out", with_tokens, *SMALL, "--tokens", rmnp_copy).returncode == 0
    assert not list((plain / "shards").rglob("tokens.npy")) and list((with_tokens / "shards").rglob("tokens.npy"))

    refused = run_cli("index", "--out", plain, *SMALL, "--tokens", assets["osbs_rgb"])
    assert refused.returncode == 3 and "keeps that choice" in refused.stderr
    assert not (plain / "shards").joinpath("r00001-c000000").exists()  # nothing of the refused raster
    with pytest.raises(IndexMismatchError, match="keeps that choice"):
        IndexWriter(with_tokens, model, TileSettings(tile=112, scales=(1,)), 4, tokens=False)
    IndexWriter(with_tokens, model, TileSettings(tile=112, scales=(1,)), 4).build([rmnp_copy, assets["osbs_rgb"]])
    index = TileIndex.open(with_tokens)
    assert len(index.rasters) == 2 and index.tokens_of(np.arange(len(index)))[0].shape[0] == len(index)

    manifest = json.loads((with_tokens / "manifest.json").read_text())
    del manifest["tokens"]
    (with_tokens / "manifest.json").write_text(json.dumps({**manifest, "format": 4}))
    assert TileIndex.open(with_tokens).has_tokens


def test_tiles_gpkg_lists_every_indexed_tile(tmp_path, model, rmnp_copy):
    import pyogrio

    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1, 2))).build([rmnp_copy])
    info = pyogrio.read_info(out / "tiles.gpkg", layer="tiles")
    assert info["features"] == TileIndex.open(out).info()["tile_count"]
    assert info["crs"] == "EPSG:4326" and info["geometry_type"] == "Polygon"
    assert {"raster", "col_off", "row_off", "width", "height", "scale"} <= set(info["fields"])


def test_tiles_gpkg_is_written_again_only_where_the_index_changed_and_info_says_whether_it_is_current(
        tmp_path, model, rmnp_copy, assets, monkeypatch):
    """A run that changed nothing wrote the whole layer again, and one that added a raster wrote
    every tile's footprint again too (minutes at 10M tiles); an index stopped before writing it
    looked complete in `info`, its layer behind. Now an unchanged layer is left, an added
    raster's tiles are appended, and the layer is the one a fresh write makes."""
    import pyogrio.raw

    from worker.app import index_info, open_index
    from worker.store import gpkg

    def layer_state() -> str:
        return index_info(open_index(out))["tiles_layer"]

    def rows_and_footprints() -> tuple[list, list]:
        meta, _, geometry, values = pyogrio.raw.read(layer, layer="tiles")
        return [list(v) for v in values], list(geometry)

    drawn = []  # the rows whose footprints a write computed
    footprints = TileIndex.footprints_wgs84
    monkeypatch.setattr(TileIndex, "footprints_wgs84", lambda index, rows: drawn.extend(rows) or footprints(index, rows))
    out, layer = tmp_path / "index", tmp_path / "index" / "tiles.gpkg"
    settings = TileSettings(tile=112, scales=(1,))
    IndexWriter(out, model, settings, chunk_tiles=16).build([rmnp_copy])
    first_tiles, written = len(TileIndex.open(out)), layer.stat()
    assert layer_state() == "current" and sorted(drawn) == list(range(first_tiles))
    drawn.clear()
    IndexWriter(out, model, settings).build([rmnp_copy])
    assert (layer.stat().st_ino, layer.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns), "left as it was"
    assert drawn == []
    second = Path(shutil.copy(assets["osbs_rgb"], tmp_path / "second.tif"))
    polls = iter(range(3))
    IndexWriter(out, model, settings).build([second], should_stop=lambda: next(polls, None) is None)
    assert first_tiles < len(TileIndex.open(out)), "the stopped run committed a chunk of the second raster"
    assert layer_state() == "out of date" and drawn == []
    IndexWriter(out, model, settings).build([second])
    assert layer_state() == "current"
    assert drawn and min(drawn) == first_tiles, "the first raster's tiles kept, the second's appended"
    appended = rows_and_footprints()
    layer.unlink()
    assert layer_state() == "missing"
    IndexWriter(out, model, settings).build([rmnp_copy])
    assert layer_state() == "current" and rows_and_footprints() == appended, "as a fresh write makes it"
    assert len(appended[1]) == len(TileIndex.open(out))


def test_tiles_gpkg_written_in_batches_holds_each_tile_once_in_its_place(tmp_path, model, rmnp_copy, monkeypatch):
    """The layer is written a batch at a time (a continental index's at once did not fit in
    memory): batches of 7 tiles give every tile once, with its own footprint and window."""
    import pyogrio
    import shapely

    from worker.store import gpkg

    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1, 2))).build([rmnp_copy])
    monkeypatch.setattr(gpkg, "BATCH_TILES", 7)
    gpkg.write_tiles_gpkg(out)
    layer = pyogrio.raw.read(out / "tiles.gpkg", layer="tiles")
    index = TileIndex.open(out)
    meta, _, geometry, values = layer
    columns = dict(zip(meta["fields"], values))
    assert len(index) > 3 * 7 and list(columns["tile_id"]) == list(range(len(index)))
    for name in ("col_off", "row_off", "width", "height", "scale"):
        assert (columns[name] == index.records[name]).all(), name
    expected = index.footprints_wgs84(np.arange(len(index)))
    assert all(shapely.from_wkb(g).equals_exact(e, 1e-9) for g, e in zip(geometry, expected))


def test_a_second_writer_is_refused_while_one_runs(tmp_path, model, rmnp_copy):
    from worker.store.format import index_lock

    out = tmp_path / "index"
    with index_lock(out):
        with pytest.raises(InputError, match="being written by another"):
            IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([rmnp_copy])


def test_a_command_line_run_is_refused_while_a_service_job_is_queued_for_the_index(tmp_path, rmnp_copy):
    """Found by the lifecycle probe: a job queued in a worker service holds only the index's job
    lock until it runs, and a command-line run of other rasters was accepted; the queued job
    then added its own to what the run built (or failed, for other tile settings)."""
    from worker.store.format import held_job_lock

    out = tmp_path / "index"
    out.mkdir()
    queued = held_job_lock(out)  # as the service holds it for a queued job (worker.service.jobs)
    try:
        refused = run_cli("index", "--out", out, *SMALL, rmnp_copy)
    finally:
        queued.close()
    assert refused.returncode == 2 and "indexing job of a worker service queued" in refused.stderr, refused.stderr
    assert not (out / "manifest.json").exists()
    assert run_cli("index", "--out", out, *SMALL, rmnp_copy).returncode == 0, "once the job has ended"


def test_an_array_file_over_2_gib_is_read_whole(tmp_path):
    """One read gives at most 2 GiB on Linux: a wide level map read whole was taken for a
    truncated file. A sparse file of 2 GiB and 8 KiB, marked in its first and last rows."""
    from worker.store.shard_file import ShardArray

    rows, width = 2 ** 21 + 8, 1024
    path = tmp_path / "wide.npy"
    written = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, width))
    written[0], written[-1] = 3, 7
    written.flush()
    del written
    array = ShardArray(path, rows)
    whole = array.read_all()
    assert whole.shape == (rows, width) and (whole[0] == 3).all() and (whole[-1] == 7).all()
    assert not whole[1:-1:99_991].any()
    del whole
    tail = array.read_rows(np.arange(rows - 2, rows))
    assert (tail[0] == 0).all() and (tail[1] == 7).all()


@pytest.mark.parametrize("ending", ["cancelled", "failed"])
def test_a_run_cancelled_or_failing_commits_every_chunk_it_computed(tmp_path, model, rmnp_copy, ending):
    """A run commits every COMMIT_EVERY_S, not every chunk (a commit rewrites the whole
    manifest); one cancelled, or failing (here between chunks), commits what it computed since
    its last commit: nothing is redone. No timed commit here: only the end's."""
    out, computed = tmp_path / "index", []

    def stop_after_four_chunks() -> bool:  # the plan's report, then a chunk's each
        if len(computed) >= 5 and ending == "failed":
            raise RuntimeError("the next chunk failed")
        return len(computed) >= 5

    writer = IndexWriter(out, model, TileSettings(tile=112, scales=(1,)), chunk_tiles=2, commit_every_s=3600)
    try:
        writer.build([rmnp_copy], progress=computed.append, should_stop=stop_after_four_chunks, batch_size=2)
    except RuntimeError:
        assert ending == "failed"
    else:
        assert ending == "cancelled"
    manifest = json.loads((out / "manifest.json").read_text())
    committed = sum(s["count"] + s["skipped"] for s in manifest["shards"])
    assert len(manifest["shards"]) >= 2 and committed == computed[-1].tiles_done


def test_tile_records_of_another_format_are_a_corrupt_index_error(tmp_path, s2_index):
    """A shard whose records lack a field this version reads (an older format, a damaged copy)
    is refused when the index is opened, saying to build it again, not read as garbage."""
    from numpy.lib import recfunctions

    from worker.errors import CorruptIndexError

    index_dir = shutil.copytree(s2_index, tmp_path / "index")
    [records_file] = (index_dir / "shards").glob("*/records.npy")
    records = np.load(records_file)
    np.save(records_file, recfunctions.drop_fields(records, "valid", usemask=False))
    with pytest.raises(CorruptIndexError, match="not of this format"):
        TileIndex.open(index_dir)


@pytest.mark.parametrize("damaged", ["map", "shard"])
def test_an_index_run_makes_again_what_damage_to_the_index_lost(tmp_path, model, assets, s2_index, damaged):
    """A truncated level map or shard (a bad copy, a full disk) fails every search of it, saying
    to index the rasters again; that run joins the map again from the tiles, or computes the
    shard's tiles again, and the index is as it was. `info` names a damaged map (it said the
    index was sound, and `index` left the map as it was, so the index was lost)."""
    from worker.app import index_info, open_index
    from worker.errors import CorruptIndexError

    index_dir = shutil.copytree(s2_index, tmp_path / "index")
    maps = {path.name: path.read_bytes() for path in (index_dir / "maps").glob("*.npy")}
    before = shard_arrays(index_dir)
    target = (index_dir / "maps" / "r00000-s1.npy" if damaged == "map"
              else next((index_dir / "shards").glob("*/cells.npy")))
    os.truncate(target, target.stat().st_size - 1000)
    if damaged == "map":
        [said] = index_info(open_index(index_dir))["damaged"]
        assert str(target) in said and "index its rasters" in said
    else:  # the index cannot be opened: info failed with the damage alone, naming none of "its rasters"
        said = run_cli("info", index_dir)
        info = json.loads(said.stdout)
        assert said.returncode == 3 and str(target) in said.stderr, said.stderr
        assert [(r["path"], r["on_disk"]) for r in info["rasters"]] == [(str(assets["s2_rgb"]), "unchanged")]
        assert str(target) in info["damaged"][0] and info["tile_count"] == len(TileIndex.open(s2_index))
    with pytest.raises(CorruptIndexError, match="index its rasters into the index again"):
        index = TileIndex.open(index_dir)
        index.check_map_files()

    computed = []
    IndexWriter(index_dir, model, TileSettings(scales=(1, 2))).build(
        [assets["s2_rgb"]], progress=computed.append)
    assert {path.name: path.read_bytes() for path in (index_dir / "maps").glob("*.npy")} == maps
    for key, values in shard_arrays(index_dir).items():
        assert np.array_equal(values, before[key]), key
    assert index_info(open_index(index_dir))["damaged"] == []
    assert json.loads((index_dir / "manifest.json").read_text())["rasters"][0]["complete"]
    assert bool(computed) == (damaged == "shard")  # a map is joined from the tiles: nothing computed


def test_a_damaged_shard_of_a_raster_the_run_does_not_name_is_computed_again_too(tmp_path, model, assets, rmnp_copy):
    """An index run naming one raster of a mosaic meets a damaged shard of another: that raster's
    tiles are computed again all the same (left uncomputed, the raster was incomplete and its
    searches silently lacked the shard's tiles)."""
    def shard_files(index_dir: Path) -> dict[str, bytes]:
        return {str(path.relative_to(index_dir)): path.read_bytes() for path in (index_dir / "shards").rglob("*.npy")}

    out, settings = tmp_path / "index", TileSettings(tile=112, scales=(1,))
    IndexWriter(out, model, settings, chunk_tiles=16).build([assets["osbs_rgb"], rmnp_copy])
    before = shard_files(out)
    manifest = json.loads((out / "manifest.json").read_text())
    rmnp_id = next(r["id"] for r in manifest["rasters"] if r["path"] == str(rmnp_copy))
    shard = next(s["name"] for s in manifest["shards"] if s["raster_id"] == rmnp_id and s["count"])
    os.truncate(out / "shards" / shard / "cells.npy", 100)
    IndexWriter(out, model, settings, chunk_tiles=16).build([assets["osbs_rgb"]])
    assert shard_files(out) == before
    assert all(r["complete"] for r in json.loads((out / "manifest.json").read_text())["rasters"])


def test_a_run_meeting_another_writers_lock_is_busy_not_bad_input(tmp_path, model, rmnp_copy):
    """A service's job that meets a command-line run's lock after it started (the check before
    it starts can be overtaken) fails as `busy`: the client's request was fine."""
    import fcntl

    from wire import errors as codes
    from worker.errors import error_object
    from worker.store.format import IndexLocked

    out = tmp_path / "index"
    out.mkdir()
    with open(out / ".lock", "w") as other_writer:
        fcntl.flock(other_writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(IndexLocked) as met:
            IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([rmnp_copy])
    assert error_object(met.value)["code"] == codes.BUSY


def test_ctrl_c_while_the_command_starts_exits_130_without_a_traceback(tmp_path):
    """Ctrl-C while torch and the rest load printed their imports' traceback (24 lines), or
    torch's C++ "terminate called after throwing KeyboardInterrupt", and the process died by
    the signal, not with the exit status a shell's Ctrl-C gives."""
    run = subprocess.Popen([sys.executable, "-m", "worker", "info", str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE,
                           text=True, preexec_fn=as_a_terminal_starts_it)
    maps = Path(f"/proc/{run.pid}/maps")  # pressed while torch loads: a fixed 0.5 s, on a loaded machine, was
    deadline = time.time() + 30              # still Python's own start, which no code of ours can catch
    while time.time() < deadline and run.poll() is None and "torch" not in maps.read_text():
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGINT)
    said = run.communicate(timeout=60)[1]
    assert run.returncode == 128 + signal.SIGINT and said == "", said


def test_a_ctrl_c_that_came_during_a_callback_is_raised_again_not_printed_and_lost():
    """A local cluster run's Ctrl-C once arrived while Python ran a weakref callback: it was
    printed as "Exception ignored in ..." with its traceback, and lost. The command line's
    unraisable hook raises it again, for the main thread to handle as a Ctrl-C."""
    import weakref

    from worker.cli import stop_lost_in_a_callback

    class Held:
        pass

    def pressed_meanwhile(_):
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = stop_lost_in_a_callback
    try:
        held = Held()
        ref = weakref.ref(held, pressed_meanwhile)
        with pytest.raises(KeyboardInterrupt):
            del held  # the callback runs here, and its KeyboardInterrupt cannot leave it
            time.sleep(1.0)  # handled here, at the main thread's next step
        assert ref() is None
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, previous)


def test_a_librarys_warning_is_one_line_on_the_command_line(tmp_path):
    """A picture without georeferencing named as a raster: rasterio's NotGeoreferencedWarning
    came with the path and a line of rasterio's code, above the refusal that says what to do."""
    from PIL import Image

    picture = tmp_path / "plain.png"
    Image.new("RGB", (300, 300), (200, 100, 50)).save(picture)
    result = run_cli("index", "--out", tmp_path / "index", "--quiet", picture)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith(f"error: {picture}: has no CRS"), result.stderr
    assert lines[:-1] == ["warning: Dataset has no geotransform, gcps, or rpcs. The identity matrix will be returned."]


def test_the_workers_own_warnings_are_said_as_its_other_lines_on_the_command_line(tmp_path):
    """A folder of previews only: the warning that they are left out came with a time and a
    logger's name (`2026-12-06 20:04:22,287 WARNING worker.tiling: ...`) above `error: ...`.
    `-v` still gives the log's form, which says where a line came from."""
    from PIL import Image

    folder = tmp_path / "previews"
    folder.mkdir()
    Image.new("RGB", (30, 30)).save(folder / "preview.png")
    said = "1 picture(s) in the folders given hold no georeferencing"
    result = run_cli("index", "--out", tmp_path / "index", "--quiet", folder)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr
    assert lines[0].startswith(f"warning: {said}") and lines[1].startswith("error: no raster files in"), lines
    verbose = run_cli("-v", "index", "--out", tmp_path / "index", "--quiet", folder)
    assert re.search(rf"^\d{{4}}-\d\d-\d\d [\d:,]+ WARNING worker.tiling: {re.escape(said)}", verbose.stderr, re.M), \
        verbose.stderr


def test_a_copy_of_a_raster_given_or_held_is_said_and_another_version_of_it_is_not(tmp_path, model, assets, caplog):
    """A copy beside its original (a COG made from it, a second download) was indexed as asked,
    and every place there came back twice, unsaid (a probe's). Copies are told by their pixels
    on one grid: a false-colour version of the scene on the same grid is no copy."""
    import rasterio

    original, cog, false_colour = tmp_path / "scene.tif", tmp_path / "scene_cog.tif", tmp_path / "scene_false.tif"
    shutil.copy(assets["rmnp_rgb"], original)
    with rasterio.open(original) as src:
        pixels, profile = src.read(), src.profile
    with rasterio.open(cog, "w", **{**profile, "compress": "deflate", "tiled": True, "blockxsize": 256,
                                    "blockysize": 256}) as dst:  # other bytes
        dst.write(pixels)
    with rasterio.open(false_colour, "w", **profile) as dst:
        dst.write(pixels[::-1])
    settings = TileSettings(tile=112, scales=(1,))
    IndexWriter(tmp_path / "index", model, settings).build([original, false_colour])
    assert "same pixels" not in caplog.text
    caplog.clear()
    IndexWriter(tmp_path / "index", model, settings).build([cog])
    assert f"{cog} holds the same pixels as {original}, on the same grid (a copy?): every place there will come " \
           "back twice" in caplog.text, caplog.text
    caplog.clear()
    IndexWriter(tmp_path / "index", model, settings).build([original, cog, false_colour])  # nothing added
    assert "same pixels" not in caplog.text
    IndexWriter(tmp_path / "in_one_run", model, settings).build([original, cog])
    assert f"{cog} holds the same pixels as {original}" in caplog.text, caplog.text
    # mostly empty rasters of one grid, alike where they are empty: no copies (a review's)
    strips = []
    for n in (1, 2):
        empty = np.zeros_like(pixels)
        empty[:, :12] = pixels[:, 12 * n:12 * (n + 1)]  # a strip of data along the top, each another one
        with rasterio.open(strip := tmp_path / f"strip{n}.tif", "w", **{**profile, "nodata": 0}) as dst:
            dst.write(empty)
        strips.append(strip)
    caplog.clear()
    IndexWriter(tmp_path / "strips", model, settings).build(strips)
    assert "same pixels" not in caplog.text
    # a held raster written over with fewer bands: the warning's read failed, and with it the run (a review's)
    with rasterio.open(original, "w", **{**profile, "count": 1}) as dst:
        dst.write(pixels[:1])
    IndexWriter(tmp_path / "index", model, settings).build([tmp_path / "strip1.tif"])


def test_a_removal_killed_after_its_commit_leaves_no_footprints_of_its_rasters_nor_their_maps(tmp_path, model,
                                                                                              rmnp_copy, assets):
    """A removal killed right after its commit (the worker killed, the machine off) left the
    tiles layer showing the rasters taken out, in QGIS, and their level maps on disk for good,
    GBs of a large raster's (probe). The layer is gone from before the commit until a run writes
    it again; that run removes the maps of rasters no longer held."""
    import sqlite3
    import subprocess
    import sys

    from conftest import REPO
    from worker.store import TILES_LAYER

    def shown(layer: Path) -> set[str]:  # the rasters the tiles layer shows footprints of
        with sqlite3.connect(layer) as db:
            return {raster for (raster,) in db.execute("SELECT DISTINCT raster FROM tiles")}

    keep = Path(shutil.copy(assets["osbs_rgb"], tmp_path / "keep.tif"))
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([keep, rmnp_copy])
    removed_id = {r.path: i for i, r in TileIndex.open(out).rasters.items()}[str(rmnp_copy.resolve())]
    assert list((out / "maps").glob(f"r{removed_id:05d}-s*.npy"))
    killed_after_commit = ("import os, sys; from pathlib import Path; from worker.store import removal; "
                           "removal.remove_maps = lambda *a: os._exit(9); "  # the next thing it does
                           "removal.remove_rasters(Path(sys.argv[1]), [sys.argv[2]])")
    ran = subprocess.run([sys.executable, "-c", killed_after_commit, out, rmnp_copy], cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert ran.returncode == 9
    assert [r.path for r in TileIndex.open(out).rasters.values()] == [str(keep.resolve())], "committed"
    layer = out / TILES_LAYER
    assert not layer.exists() or str(rmnp_copy.resolve()) not in shown(layer)
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([keep])
    assert shown(layer) == {str(keep.resolve())}
    assert not list((out / "maps").glob(f"r{removed_id:05d}-s*.npy")), "its maps removed"
    assert list((out / "maps").glob("r*-s*.npy")), "the kept raster's maps stay"


def test_a_removal_interrupted_after_its_commit_says_its_rasters_were_taken_out(tmp_path, model, rmnp_copy, assets):
    """Ctrl-C while a committed removal removed its files said "interrupted" alone; run again, the
    removal said the index held no such raster (probe)."""
    import subprocess
    import sys

    from conftest import REPO

    keep = Path(shutil.copy(assets["osbs_rgb"], tmp_path / "keep.tif"))
    out = tmp_path / "index"
    IndexWriter(out, model, TileSettings(tile=112, scales=(1,))).build([keep, rmnp_copy])
    interrupted = ("import sys; from worker.store import removal; from worker.cli import main\n"
                   "def pressed(*args): raise KeyboardInterrupt\n"
                   "removal.remove_maps = pressed\n"  # the next thing it does after its commit
                   "sys.exit(main(['remove', sys.argv[1], sys.argv[2]]))")
    ran = subprocess.run([sys.executable, "-c", interrupted, out, rmnp_copy], cwd=REPO, timeout=120,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert ran.returncode == 130 and ran.stderr.strip().startswith("interrupted once 1 raster was taken out of the "
                                                                   "index"), ran.stderr
    assert [r.path for r in TileIndex.open(out).rasters.values()] == [str(keep.resolve())]
