"""The approximate shortlist (worker.ann) finds what the exact scan finds, on real tiles, and is
never asked when it is older than the index."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import AS_A_USER
from lab.page_cache import PAGE, cached_share, evict
from lab.placements import iou, random_frame
from lab.pseudo_sketch import has_lines, pseudo_sketch
from lab.worker_process import REPO, memory_mb
from worker import ann, edge_cells, query_templates
from worker.cancellation import telling_why_slow
from worker.edge_cells import COARSE
from worker.placement_scan import (ANN_SPAN, COARSE_STEP, local_scores, ann_peaks, peak_radius,
                                    scanner_of)
from worker.store.maps import crowds
from worker.ranking import RankingConfig
from worker.search import Scan, ann_shortlist, search
from worker.sketch import prepare_sketch
from worker.store import IndexWriter, TileIndex
from worker.tiling import TileSettings


@pytest.fixture(scope="module")
def index_with_ann(s2_index, tmp_path_factory):
    copy = tmp_path_factory.mktemp("ann") / "index"
    shutil.copytree(s2_index, copy)
    info = ann.build(TileIndex.open(copy))
    return copy, info


def frames(index: TileIndex, n: int, seed: int = 5, raster_id: int = 0):
    rng = np.random.default_rng(seed)
    while n:
        frame = random_frame(index.rasters[raster_id], TileSettings(scales=(1, 2)), "free", rng)
        image, valid = frame.read(224)
        if has_lines(image, valid):
            n -= 1
            yield frame, prepare_sketch(pseudo_sketch(image, "simple", valid=valid), 224)


def test_the_ann_shortlist_finds_what_the_exact_scan_finds(index_with_ann, model):
    """8 sketches anywhere in the scene: the ANN shortlist's search finds the sketched place in
    its top 5 as often as the exact scan, within one query."""
    folder, info = index_with_ann
    index = TileIndex.open(folder)
    assert info.vectors > 200 and info.factory.startswith("IVF")
    found = {"off": 0, "on": 0}
    for frame, sketch in frames(index, 8):
        for mode in found:
            hits = search(index, model, sketch, RankingConfig(ann=mode), top=5).hits
            found[mode] += any(iou(h.footprint_pixels(), frame.pixel_polygon()) >= 0.25 for h in hits)
    assert found["on"] >= found["off"] - 1 and found["off"] >= 5, found


def test_the_ann_shortlist_hands_on_distinct_places(index_with_ann, model):
    """The neighbourhoods of the shortlist's windows overlap (windows half a tile apart, each
    scanned with half a tile around it), so the same peak is found in several. The candidates
    handed to the refine are distinct places, as the exact scan's are: none within a quarter
    template of a better one of the same map and size, and the full shortlist of them when the
    windows hold that many. (Before, the best peak of each neighbourhood was kept, and of 200
    candidates for one sketch of this scene 58 were distinct places.)"""
    index = TileIndex.open(index_with_ann[0])
    ranking = RankingConfig(ann="on")
    _, sketch = next(frames(index, 1, seed=3))
    templates = query_templates.build(sketch, ranking.sizes, ranking.angles)
    windows, _ = ann_shortlist(index, ranking).search(ann.query_vectors(templates.coarse), ranking.ann_neighbours)
    found = ann_peaks(scanner_of(index, model.device), templates, ranking, windows[:ranking.ann_windows], ranking.shortlist)
    assert len(found) == ranking.shortlist
    assert [c.coarse for c in found] == sorted((c.coarse for c in found), reverse=True)
    for i, a in enumerate(found):
        reach = peak_radius(a.size) * COARSE_STEP
        assert not any(b.map_key == a.map_key and b.size == a.size and abs(a.row - b.row) <= reach
                       and abs(a.col - b.col) <= reach for b in found[:i]), a
    edge = np.array([[0, 1, 0, 0], [0, 2, 0, 0]], np.int32)  # windows at the maps' corners: half their neighbourhoods outside
    scanner = scanner_of(index, model.device)
    for c in ann_peaks(scanner, templates, ranking, edge, 800):  # only squares the exact scan could place
        rows, cols = scanner.shape(c.map_key)
        assert 0 <= c.row <= rows - c.size // edge_cells.CELL and 0 <= c.col <= cols - c.size // edge_cells.CELL, c


def test_crowded_neighbourhoods_scored_as_one_block_score_as_each_alone(index_with_ann, model):
    """The ANN's neighbourhoods crowd around the best places and overlap; those crowded together
    are scored as one block and cut apart. Every neighbourhood's scores equal its own
    neighbourhood scored alone, crowded or not, even or odd corners, across the map's edge."""
    index = TileIndex.open(index_with_ann[0])
    ranking = RankingConfig(ann="on")
    _, sketch = next(frames(index, 1, seed=3))
    templates = query_templates.build(sketch, ranking.sizes, ranking.angles)
    scanner = scanner_of(index, model.device)
    side = ANN_SPAN
    rng = np.random.default_rng(1)
    spots = [((0, 1), int(r), int(c)) for r, c in 2 * rng.integers(-10, 40, (30, 2))]  # crowded, on even cells
    spots += [((0, 1), 41, 7), ((0, 1), 44, 7), ((0, 2), 3, 90), ((0, 1), 200, 10)]  # odd, alone, far
    local = local_scores(scanner, spots, side, templates, ranking)
    alone = edge_cells.block_map(scanner.regions(spots, side), COARSE, step=COARSE_STEP)
    for size in templates.sizes:
        expected = edge_cells.cosine_map(alone, templates.coarse[size], COARSE, COARSE_STEP, ranking.inked_only)
        assert local[size].shape == expected.shape
        torch.testing.assert_close(local[size], expected, rtol=0, atol=1e-5)
    assert len(crowds([s[1:] for s in spots[:30]], side)) < 30  # the crowd was scored as blocks


def test_a_shortlist_left_with_too_few_windows_by_a_removal_is_removed_and_the_removal_done(index_with_ann,
                                                                                            tmp_path):
    """Removing rasters until too few windows were left for a shortlist failed the removal
    (exit 2; a service job `failed`), though the rasters were gone; the old shortlist stayed,
    older than its index for good: `info` described rasters no longer there, and every index
    run, removal and build-ann failed on it, until someone deleted its folder by hand."""
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    [raster] = [r.path for r in TileIndex.open(folder).rasters.values()]
    run = lambda *args: subprocess.run([sys.executable, "-m", "worker", *args], cwd=REPO, capture_output=True, text=True)
    removed = run("remove", str(folder), raster)
    assert removed.returncode == 0, removed.stderr
    summary = json.loads(removed.stdout)
    assert summary["removed"] == [raster] and summary["tile_count"] == 0
    assert summary["ann"]["built"] is False and "too few" in summary["ann"]["why"]
    assert not ann.ann_dir(folder).exists() and not list(folder.glob(".ann*"))
    assert json.loads(run("info", str(folder)).stdout)["ann"] is None


def test_a_removal_stopped_while_its_shortlist_is_rebuilt_says_its_rasters_were_taken_out(index_with_ann, tmp_path,
                                                                                          monkeypatch):
    """A Ctrl-C once a removal was committed said "interrupted" alone, and the removal, run
    again, said the index held no such raster (probe): it says what was done."""
    from worker.app import RemovalRequest, remove_rasters
    from worker.interrupts import StoppedOnceDone

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    [raster] = [r.path for r in TileIndex.open(folder).rasters.values()]

    def pressed(index):
        raise KeyboardInterrupt

    monkeypatch.setattr(ann, "update", pressed)
    with pytest.raises(KeyboardInterrupt) as stopped:  # not StoppedOnceDone: the code before would stop the tests
        remove_rasters(RemovalRequest(folder, (raster,)))
    assert isinstance(stopped.value, StoppedOnceDone), repr(stopped.value)
    assert stopped.value.done.startswith("1 raster was taken out of the index, its ANN shortlist not rebuilt")
    assert TileIndex.open(folder).rasters == {}


def test_build_ann_removes_a_shortlist_its_index_has_too_few_windows_for(index_with_ann, tmp_path):
    """A removal killed after its commit, before its shortlist was built again, left the old one
    naming the rasters gone. Every search said to run build-ann, which said the windows were too
    few and left it there: the advice went round in a circle (probe). build-ann removes it, as
    the removal would have."""
    from worker.store.removal import remove_rasters

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    [raster] = [r.path for r in TileIndex.open(folder).rasters.values()]
    remove_rasters(folder, [raster])  # what the killed removal committed
    run = lambda *args: subprocess.run([sys.executable, "-m", "worker", *args], cwd=REPO, capture_output=True, text=True)
    built = run("build-ann", str(folder))
    assert built.returncode == 2 and "too few" in built.stderr and "old shortlist was removed" in built.stderr, \
        built.stderr
    assert not ann.ann_dir(folder).exists() and not list(folder.glob(".ann*"))
    assert json.loads(run("info", str(folder)).stdout)["ann"] is None


def test_a_shortlist_grown_far_past_its_training_is_trained_again(index_with_ann, model, assets, tmp_path):
    """An index grown region by region kept the training of its first shortlist for good: a few
    inverted lists, uncompressed, for millions of windows. Added to while it holds under four
    times the windows it was trained for, and within its compression tier; trained again past."""
    from worker.app import IndexRequest, build_index

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    built = lambda: json.loads((ann.ann_dir(folder) / "ann.json").read_text())
    first = built()
    assert first["trained_for"] == first["vectors"]
    settings = TileSettings(scales=(1, 2))
    small = Path(shutil.copy(assets["rmnp_rgb"], tmp_path / "small.tif"))
    build_index(IndexRequest(folder, (assets["s2_rgb"], small), settings), model)
    added = built()
    assert added["vectors"] > first["vectors"] and added["trained_for"] == first["trained_for"], "added to"
    (ann.ann_dir(folder) / "ann.json").write_text(json.dumps({**added, "trained_for": added["vectors"] // 4}))
    another = Path(shutil.copy(assets["rmnp_rgb"], tmp_path / "another.tif"))
    build_index(IndexRequest(folder, (assets["s2_rgb"], small, another), settings), model)
    again = built()
    assert again["trained_for"] == again["vectors"] > added["vectors"], "trained again for all it holds"
    assert ann.outgrown({"factory": "IVF40,Flat", "vectors": 40_000, "trained_for": 40_000}, 60_000), \
        "past the uncompressed tier"
    assert not ann.outgrown({"factory": "IVF40,Flat", "vectors": 30_000, "trained_for": 30_000}, 45_000)


def test_a_shortlist_build_stops_when_its_job_is_stopped_and_leaves_the_old_one(index_with_ann, tmp_path):
    """Building a 10M-tile index's shortlist takes minutes, and a job cancelled, or a worker
    stopping, waited for it to end: it stops between maps now, leaving the old one as it was."""
    from worker.app import _shortlist_kept
    from worker.cancellation import stop_when

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    before = (ann.ann_dir(folder) / "ann.json").read_text()
    index = TileIndex.open(folder)
    with stop_when(lambda: True), pytest.raises(ann.ShortlistStopped):
        ann.build(index)
    said = _shortlist_kept(index, update=False, should_stop=lambda: True)
    assert said["built"] is False and "stopped" in said["why"]
    assert (ann.ann_dir(folder) / "ann.json").read_text() == before
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".ann")) == [], "nothing half-written left"


def test_the_compressed_shortlist_re_ranks_its_candidates_close_to_the_exact_vectors(s2_index, model, tmp_path):
    """PQ codes rank windows only roughly, so the shortlist re-ranks FAISS's candidates by their
    8-bit rotated vectors, then the best of those by their 16-bit full vectors. Scene-sized
    indexes are too small for PQ to lose anything, so this is lab.ann_scale's set-up in small:
    5,000 windows mixed from the scene's real ones, a small OPQ + IVF-PQ factory. Of each
    sketch's exact best 200 windows, the re-ranked 200 hold at least 0.93, and far more than
    PQ's own order of the same candidates. Measured on 6 sketches: 0.99 re-ranked (0.80 by the
    rotated codes alone, before the full ones existed), 0.66 by PQ's order (1024 asked a query
    vector)."""
    import faiss

    from lab import ann_scale

    folder = tmp_path / "index"
    shutil.copytree(s2_index, folder)
    index = TileIndex.open(folder)
    ranking = RankingConfig()
    queries = [ann_scale.sketch_vectors(sketch) for _, sketch in frames(index, 6, seed=11)]
    built = ann_scale.build_synthetic(index, *ann_scale.real_windows(index), 5000, queries,
                                      factory="OPQ16_64,IVF16,PQ16")
    shortlist = ann.AnnShortlist(folder)
    assert faiss.extract_index_ivf(shortlist.index).nprobe == ann.NPROBE
    refined, by_pq = [], []
    for q, exact in zip(queries, built["exact"]):
        exact = set(exact.tolist())
        refined.append(len(exact & set(shortlist.candidates(q, ranking.ann_neighbours)[0][:200].tolist())) / 200)
        scores, ids = shortlist.index.search(q, ranking.ann_neighbours)
        best: dict[int, float] = {}
        for s, i in zip(scores.ravel(), ids.ravel()):
            best[int(i)] = max(best.get(int(i), -np.inf), float(s))
        by_pq.append(len(exact & set(sorted(best, key=lambda i: -best[i])[:200])) / 200)
    assert np.mean(refined) >= 0.93 and np.mean(refined) >= np.mean(by_pq) + 0.2, (refined, by_pq)


def test_the_full_re_rank_orders_windows_closer_than_an_8_bit_step(tmp_path):
    """The best 200 of millions of windows are near ties, and the last re-rank decides which of
    them the exact scan searches. 40 windows whose scores step by 1e-4 (about a quarter of an
    8-bit step over the range of 2,000 HOG-like windows) come out of the full codes in their
    exact order (8-bit codes over that range swapped neighbours here)."""
    rng = np.random.default_rng(0)
    dim = ann.WINDOW_DIM
    sample = np.abs(rng.standard_normal((2000, dim))).astype(np.float32)
    sample /= np.linalg.norm(sample, axis=1, keepdims=True)
    query = sample[0] + 0.5 * np.abs(rng.standard_normal(dim)).astype(np.float32)
    query /= np.linalg.norm(query)
    away = sample[1] - (sample[1] @ query) * query  # a unit direction that keeps the windows' norms
    away /= np.linalg.norm(away)
    target = np.linspace(0.9, 0.9 - 39e-4, 40)  # scores 1e-4 apart
    near = target[:, None] * query + np.sqrt(1 - target[:, None] ** 2) * away
    near = near.astype(np.float32)
    exact = near @ query
    assert np.all(np.diff(exact) < -5e-5)  # the set-up: distinct scores, best first
    assert np.median(sample.max(0) - sample.min(0)) / 255 > 3e-4  # an 8-bit step of this range: 3 times the spacing
    writer = ann.CodeWriter.trained(tmp_path, "refine_full", lambda x: x, sample, len(near))
    writer.add(near)
    writer.commit()
    scores = ann.Codes(tmp_path, "refine_full").best_scores(query[None], np.arange(len(near)))
    assert list(np.argsort(-scores, kind="stable")) == list(range(len(near))), scores - exact
    assert np.abs(scores - exact).max() < 2e-5


def peak_resident_mb_during(work) -> float:
    """How far this process's peak resident memory rose while `work()` ran (Linux: the peak is reset first)."""
    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")  # VmHWM := VmRSS
    before = memory_mb(os.getpid())["VmHWM"]
    work()
    return memory_mb(os.getpid())["VmHWM"] - before


def write_codes(folder, rows: int, dim: int) -> np.ndarray:
    """A file of 8-bit re-rank codes whose rows all differ (refine.npy, the values themselves): its rows."""
    codes = np.lib.format.open_memmap(folder / "refine.npy", mode="w+", dtype=np.uint8, shape=(rows, dim))
    codes[:] = np.random.default_rng(0).integers(0, 256, (1, dim), dtype=np.uint8) + np.arange(rows, dtype=np.uint8)[:, None]
    codes.flush()
    np.save(folder / "refine_range.npy", np.stack([np.zeros(dim), np.ones(dim)]).astype(np.float32))
    return np.array(codes)


def test_reading_scattered_re_rank_codes_does_not_hold_their_file_in_memory(tmp_path):
    """A search reads thousands of scattered rows of a code file of gigabytes. Read through a
    mapping, the kernel maps cached pages around each row, so one read of 8,000 rows of a warm
    256 MB file counted the whole file to the worker's resident memory while it lasted
    (measured: +245 MB). Rows are right and the peak rises by well under the file: 8 threads
    each let go of their pages every 256 rows, 32 KB apart here, so at most 64 MB of the file is
    mapped at once (measured: 12-72 MB with the threads' own)."""
    rows = 1_000_000
    expected = write_codes(tmp_path, rows, 256)  # the file's pages are now in the page cache, as a worker's are after a few searches
    ids = np.random.default_rng(1).choice(rows, 8000, replace=False)
    read = {}
    rose = peak_resident_mb_during(lambda: read.update(rows=ann.Codes(tmp_path, "refine").rows(ids)))
    assert (read["rows"] == expected[ids]).all()
    assert rose < 96, rose


def test_re_rank_codes_read_from_a_cold_disk_are_right_and_only_theirs(tmp_path):
    """The first searches after a restart, or on an index larger than memory, read their rows
    from disk, many threads at once. The rows are right, and the disk is asked for little more
    than their own pages: without random access advised, the kernel reads 128 KB around each
    row, here the whole file."""
    rows, dim = 200_000, 256
    expected = write_codes(tmp_path, rows, dim)
    codes = ann.Codes(tmp_path, "refine")
    evict([codes.path])
    if cached_share(codes.path) > 0.01:
        pytest.skip(f"{tmp_path}'s file system keeps its pages in memory (tmpfs): no cold file to read")
    ids = np.random.default_rng(1).choice(rows, 2000, replace=False)
    assert (codes.rows(ids) == expected[ids]).all()
    own_pages = np.unique((codes.offset + ids * dim) // PAGE)
    own_share = len(own_pages) / -(-codes.path.stat().st_size // PAGE)
    assert own_share < 0.25  # the set-up: rows pages apart
    assert cached_share(codes.path) < 1.5 * own_share, own_share


CTRL_C_WHILE_ROWS_ARE_READ = """
import signal, sys, threading, time
from pathlib import Path
import numpy as np
from worker import ann
from worker.thread_pools import shared_pool

signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: a run in the background ignores SIGINT
codes = ann.Codes(Path(sys.argv[1]), "refine")
readers = shared_pool("ann-read", ann.READ_THREADS)
release = threading.Event()

def main_thread_waits_for_reads():
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "wait" and "concurrent" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False

def busy(first):
    if first:  # the read below has queued its runs behind the busy readers and waits for them
        deadline = time.monotonic() + 30
        while not main_thread_waits_for_reads() and time.monotonic() < deadline:
            time.sleep(0.01)
        if main_thread_waits_for_reads():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # wakes the wait, as Ctrl-C does
            time.sleep(0.1)
        release.set()
    release.wait()

for n in range(ann.READ_THREADS):  # a fresh process: each starts a reading thread of its own
    readers.submit(busy, n == 0)
try:
    codes.rows(np.arange(0, 10_000, 3))
    print("no interrupt")
except KeyboardInterrupt:
    print("interrupted")
print("rows after", bool((codes.rows(np.array([7, 2])) == np.load(Path(sys.argv[1]) / "refine.npy")[[7, 2]]).all()))
"""


def test_ctrl_c_while_rows_are_read_stops_as_an_interrupt_and_reads_go_on(tmp_path):
    """`python -m worker search` reads rows in the main thread, and Ctrl-C there must end in the
    CLI's clean "interrupted" exit. Before, the interrupt skipped letting go of the mapping, whose
    close then failed (BufferError: cannot close exported pointers exist) in its place. Here the
    readers are busy (another search's reads, a slow disk) and SIGINT comes once this read waits
    for its own. In a process of its own, where the pool's threads and the signal's handler are
    known: run in pytest's process within the whole suite, the read once went undisturbed."""
    write_codes(tmp_path, 10_000, 64)
    run = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_ROWS_ARE_READ, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert run.stdout.split("\n")[:2] == ["interrupted", "rows after True"], run.stdout + run.stderr[-2000:]


def test_rows_outside_the_file_are_refused_before_any_is_read(tmp_path):
    """A negative id would wrap round to the file's last rows."""
    write_codes(tmp_path, 1000, 64)
    codes = ann.Codes(tmp_path, "refine")
    for ids in ([-1, 3], [3, 1000]):
        with pytest.raises(IndexError, match="refine.npy: rows"):
            codes.rows(np.array(ids))


def test_auto_asks_the_ann_only_for_large_indexes(index_with_ann):
    index = TileIndex.open(index_with_ann[0])
    assert len(index) < ann.AUTO_MIN_TILES
    assert ann_shortlist(index, RankingConfig()) is None  # auto: the exact scan for this small index
    assert ann_shortlist(index, RankingConfig(ann="on")) is not None


def test_an_index_big_enough_gets_its_ann_shortlist_unasked_and_searches_ask_it(s2_index, assets, model, tmp_path,
                                                                                  monkeypatch):
    """A user (or the plugin, which never asks) who indexes a large mosaic gets the shortlist
    built once the index is complete, and searches ask it; before, only `--ann` built one, and a
    plugin user's million-tile index was scanned exactly at every search (minutes on a CPU).
    `ann: false` builds none; a small index gets none. The threshold is lowered to this index's
    size here: the real one is tens of thousands of tiles."""
    from worker.app import IndexRequest, build_index

    def extend(name: str, **ann_choice):
        folder = tmp_path / name
        shutil.copytree(s2_index, folder)  # complete: extending it with its own raster only brings the shortlist
        return folder, build_index(IndexRequest.create(folder, [assets["s2_rgb"]], scales=[1, 2], **ann_choice), model)

    folder, summary = extend("small")
    assert summary.ann is None and not ann.AnnShortlist.exists(folder)
    monkeypatch.setattr(ann, "AUTO_MIN_TILES", len(TileIndex.open(s2_index)))
    folder, summary = extend("refused", ann=False)
    assert summary.ann is None and not ann.AnnShortlist.exists(folder)
    folder, summary = extend("big")
    assert summary.ann and summary.ann["vectors"] > 200, summary.ann
    index = TileIndex.open(folder)
    assert ann.describe(index)["asked_by_default"] and ann_shortlist(index, RankingConfig()) is not None


def test_an_ann_older_than_its_index_answers_for_what_it_holds_until_updated(index_with_ann, model, assets, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    before = ann.AnnShortlist(folder).info["vectors"]
    IndexWriter(folder, model, TileSettings(scales=(1, 2))).build([assets["s2_rgb"], assets["osbs_rgb"]])
    index = TileIndex.open(folder)  # as a worker holds it open
    assert ann_shortlist(index, RankingConfig(ann="on")).answers_for(index) == {0}  # raster 1 is scanned exactly
    info = ann.update(TileIndex.open(folder))  # as the indexing job updates it
    assert info.vectors > before and sorted(info.rasters) == [0, 1]
    shortlist = ann_shortlist(index, RankingConfig(ann="on"))  # the worker's open index asks the new one
    assert shortlist is not None
    assert set(np.unique(shortlist.windows.rows(np.arange(shortlist.windows.shape[0]))[:, 0])) == {0, 1}


def partly_indexed(model, assets, folder: Path) -> IndexWriter:
    """An index of s2_rgb, whole, and rmnp_rgb, its run stopped after a commit of part of its
    tiles; the writer, to finish it."""
    settings = TileSettings(tile=112, scales=(1,))
    IndexWriter(folder, model, settings, chunk_tiles=8).build([assets["s2_rgb"]])
    committed = []
    IndexWriter(folder, model, settings, chunk_tiles=8).build([assets["rmnp_rgb"]], progress=committed.append,
                                                              should_stop=lambda: len(committed) >= 3)
    index = TileIndex.open(folder)
    assert index.complete_rasters == {0} and index.tiles_per_raster[1], "partly indexed"
    return IndexWriter(folder, model, settings, chunk_tiles=8)


def test_a_shortlist_still_answers_where_a_worker_with_a_smaller_budget_leaves_a_raster_out(model, assets, tmp_path):
    """`build-ann` run while a raster was partly indexed; a worker started with a smaller
    --max-partial-maps-mb leaves that raster out. The shortlist still answers for the others:
    before, it was dropped, and every search scanned every map exactly."""
    folder = tmp_path / "index"
    partly_indexed(model, assets, folder)
    built = ann.build(TileIndex.open(folder))  # as `build-ann` from the command line: the default budget
    assert sorted(built.rasters) == [0]
    index = TileIndex.open(folder, partial_maps_bytes=0)  # as a worker started with --max-partial-maps-mb 0
    assert list(index.left_out) == [1]
    shortlist = ann_shortlist(index, RankingConfig(ann="on"))
    assert shortlist is not None and shortlist.answers_for(index) == {0}
    assert ann.describe(index)["rasters_scanned_exactly_beside"] == []  # left out: not scanned at all
    frame, sketch = next(frames(index, 1, seed=3))
    hits = search(index, model, sketch, RankingConfig(ann="on"), top=5).hits
    assert hits and {h.placement.raster.path for h in hits} == {str(assets["s2_rgb"])}


def test_a_shortlist_built_beside_a_stopped_run_answers_once_the_run_goes_on_and_is_added_to(model, assets, tmp_path,
                                                                                             monkeypatch):
    """`build-ann` while a raster's run was stopped midway covered that raster's tiles of the
    moment: once its run went on, the shortlist no longer matched it, every search scanned every
    map exactly (`current` false, said at each search) until the run ended, and its end trained
    the shortlist again from nothing (hours, at a continent's tiles). It covers the complete
    rasters now: the unfinished one is scanned exactly beside it, and added to it once complete."""
    folder = tmp_path / "index"
    from worker.store import maps

    writer = partly_indexed(model, assets, folder)
    joined, join_map = [], maps.join_map

    def recorded(index, key, earlier):
        joined.append(key)
        return join_map(index, key, earlier)

    monkeypatch.setattr(maps, "join_map", recorded)
    built = ann.build(TileIndex.open(folder))
    monkeypatch.undo()
    assert sorted(built.rasters) == [0]
    assert not [key for key in joined if key[0] == 1], "the stopped raster's maps joined (every tile's cells read)"
    assert ann.describe(TileIndex.open(folder))["current"], "it covers all it can"
    _, sketch = next(frames(TileIndex.open(folder), 1))
    assert search(TileIndex.open(folder), model, sketch, RankingConfig(ann="on"), top=3).scan == Scan("ann+exact"), \
        "nothing to do but let the run end: nothing said"
    writer.build([assets["rmnp_rgb"]])  # the run goes on to its end
    index = TileIndex.open(folder)
    assert index.complete_rasters == {0, 1}
    assert ann_shortlist(index, RankingConfig(ann="on")).answers_for(index) == {0}
    assert ann.describe(index)["rasters_scanned_exactly_beside"] == [1]
    updated = ann.update(index)
    assert sorted(updated.rasters) == [0, 1] and updated.vectors > built.vectors
    described = ann.describe(TileIndex.open(folder))
    assert described["current"] and described["trained_for"] == built.vectors, "added to, not trained again"


def test_a_shortlist_beside_a_stopped_run_is_current_once_that_raster_is_removed(model, assets, tmp_path):
    """The raster of a stopped run, taken out (`remove`): the shortlist covers all the index
    holds, and `info` says so. It said `current: false` (its record of every raster's file held
    the removed one), and a user told so would run build-ann: hours at a continent's tiles."""
    folder = tmp_path / "index"
    partly_indexed(model, assets, folder)
    ann.build(TileIndex.open(folder))
    removed = subprocess.run([sys.executable, "-m", "worker", "remove", str(folder), str(assets["rmnp_rgb"])],
                             cwd=REPO, capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr
    described = ann.describe(TileIndex.open(folder))
    assert described["current"] and described["rasters_scanned_exactly_beside"] == [], described


def test_a_shortlist_copied_from_another_index_of_the_same_sheets_is_not_taken_as_its_own(index_with_ann, model,
                                                                                           assets, tmp_path):
    """Two indexes whose raster ids name other files of the same size and time (a delivery's
    sheets unpacked with their times, indexed in another order): a shortlist copied from one
    into the other passed every check (tile counts, the files' sizes and times), was said
    current, and answered with the other index's sheets' places (the lifecycle probe's). The
    files' paths are kept with it now: it is said not current, and not asked."""
    sheet = tmp_path / "sheet.tif"
    shutil.copy2(assets["s2_rgb"], sheet)  # another file of the same size and modification time
    other = tmp_path / "other"
    IndexWriter(other, model, TileSettings(scales=(1, 2))).build([sheet])
    ann.build(TileIndex.open(other))
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    shutil.rmtree(ann.ann_dir(folder))
    shutil.copytree(ann.ann_dir(other), ann.ann_dir(folder))
    index = TileIndex.open(folder)
    assert index.tiles_per_raster == TileIndex.open(other).tiles_per_raster
    assert not ann.describe(index)["current"]
    assert ann.describe(index)["why_not_current"].startswith(f"{index.rasters[0].path} was indexed again since it was "
                                                             "built")
    assert ann_shortlist(index, RankingConfig(ann="on")) is None


def test_a_raster_indexed_again_with_as_many_tiles_makes_its_shortlist_stale(model, assets, tmp_path, caplog):
    """A raster replaced on disk (here: the same scene upside down) keeps its id and its tile
    count when it is indexed again; its old windows must not be asked all the same."""
    import rasterio

    raster = tmp_path / "s2.tif"
    shutil.copy(assets["s2_rgb"], raster)
    folder = tmp_path / "index"
    IndexWriter(folder, model, TileSettings(scales=(1, 2))).build([raster])
    ann.build(TileIndex.open(folder))
    tiles = len(TileIndex.open(folder))
    with rasterio.open(raster, "r+") as dst:
        dst.write(dst.read()[:, ::-1])
    IndexWriter(folder, model, TileSettings(scales=(1, 2))).build([raster])
    index = TileIndex.open(folder)
    assert len(index) == tiles and ann.covered(index) == {"0": tiles}
    with caplog.at_level(logging.WARNING, logger="worker.search"):
        for _ in range(2):
            assert ann_shortlist(index, RankingConfig(ann="on")) is None and not ann.describe(index)["current"]
    assert caplog.text.count("ANN shortlist is older than its tiles") == 1  # once while it lasts
    assert ann.describe(index)["why_not_current"] == (f"{raster} was indexed again since it was built (tiles: {tiles} "
                                                      f"then, {tiles} now)"), "info said only that it was not current"
    ann.update(index)
    assert ann_shortlist(index, RankingConfig(ann="on")) is not None and ann.describe(index)["current"]
    assert ann.describe(index)["why_not_current"] is None


def test_a_search_asking_for_a_shortlist_an_index_lacks_says_it_scans_exactly_once(s2_index, caplog):
    """`--ann on` on an index without one scanned exactly without a word: a slow search looked
    like a slow shortlist. It says so once per open index: a feedback search runs up to four
    searches, and a service answers many."""
    index = TileIndex.open(s2_index)
    with caplog.at_level(logging.WARNING, logger="worker.search"):
        assert ann_shortlist(index, RankingConfig(ann="on")) is None
        assert ann_shortlist(index, RankingConfig(ann="on")) is None
    assert caplog.text.count("has no ANN shortlist; scanning exactly (`build-ann` builds one, for an index of 256 "
                             "windows or more") == 1  # a smaller one: build-ann refuses it


def test_a_shortlist_warning_comes_back_only_when_its_state_does(model, assets, tmp_path, caplog):
    """Said once while it lasts, also over the views a service opens after each commit; said
    again when the shortlist, current meanwhile, is gone again."""
    folder = tmp_path / "index"
    IndexWriter(folder, model, TileSettings(tile=112, scales=(1,))).build([assets["s2_rgb"]])
    index = TileIndex.open(folder)
    wanted = RankingConfig(ann="on")
    with caplog.at_level(logging.WARNING, logger="worker.search"):
        assert ann_shortlist(index, wanted) is None
        assert ann_shortlist(TileIndex.open(folder, earlier=index), wanted) is None  # the next commit's view
        assert caplog.text.count("has no ANN shortlist") == 1
        ann.build(index)
        assert ann_shortlist(index, wanted) is not None
        shutil.rmtree(ann.ann_dir(folder))
        assert ann_shortlist(index, wanted) is None
    assert caplog.text.count("has no ANN shortlist") == 2


def test_a_raster_added_since_the_shortlist_was_built_is_scanned_exactly_beside_it(index_with_ann, model, assets,
                                                                                   tmp_path):
    """A raster added to an index (or being indexed) after its shortlist was built: the shortlist
    still answers for the others and the new raster is scanned exactly beside it, so places in
    either are found. Before, the shortlist was not asked at all until it was updated: one
    raster added to a 10M-tile index made every search meanwhile scan every map exactly."""
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    IndexWriter(folder, model, TileSettings(scales=(1, 2))).build([assets["rmnp_rgb"]])  # no shortlist update
    index = TileIndex.open(folder)
    shortlist = ann_shortlist(index, RankingConfig(ann="on"))
    assert shortlist is not None and shortlist.answers_for(index) == {0}
    described = ann.describe(index)
    assert not described["current"] and described["rasters_scanned_exactly_beside"] == [1]
    assert described["why_not_current"] == "1 raster indexed since it was built, scanned exactly beside it"
    found, scans = {0: 0, 1: 0}, set()
    for raster_id in found:
        for frame, sketch in frames(index, 3, seed=7, raster_id=raster_id):
            result = search(index, model, sketch, RankingConfig(ann="on"), top=5)
            scans.add(result.scan)
            found[raster_id] += any(h.placement.raster.path == frame.raster.path
                                    and iou(h.footprint_pixels(), frame.pixel_polygon()) >= 0.25 for h in result.hits)
    assert found[0] >= 2 and found[1] >= 2, found
    # the search says so, and what to do: at 10M tiles a raster scanned exactly beside costs seconds
    beside = ("1 raster indexed since the index's ANN shortlist was built, scanned exactly beside it (an index run "
              "that completes all the index's rasters adds them to it: run the index request again; `build-ann` "
              "builds it anew, which takes longer)")
    assert scans == {Scan("ann+exact", beside)}, scans
    import rasterio

    from worker.geo import bbox_to_wgs84

    with rasterio.open(assets["rmnp_rgb"]) as src:  # an area meeting the new raster alone: the shortlist not asked
        only_new = bbox_to_wgs84(tuple(src.bounds), src.crs)
    assert search(index, model, sketch, RankingConfig(ann="on"), top=5, area_wgs84=only_new).scan == \
        Scan("exact", beside)
    ann.update(index)
    index = TileIndex.open(folder)
    assert ann.describe(index)["current"] and ann.describe(index)["rasters_scanned_exactly_beside"] == []
    assert search(index, model, sketch, RankingConfig(ann="on"), top=5).scan == Scan("ann")


def test_a_search_says_when_it_scanned_exactly_and_what_would_make_it_faster(index_with_ann, model, tmp_path):
    """Only the worker's log said that a search scanned every window although the index has, or
    should have, a shortlist (minutes at 10M tiles, and nothing in the reply said why); an exact
    scan asked for, or of an index too small for a shortlist, has nothing to mend."""
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    _, sketch = next(frames(TileIndex.open(folder), 1))
    assert search(TileIndex.open(folder), model, sketch, RankingConfig(ann="on"), top=3).scan == Scan("ann")
    assert search(TileIndex.open(folder), model, sketch, RankingConfig(ann="off"), top=3).scan == Scan("exact")
    assert search(TileIndex.open(folder), model, sketch, RankingConfig(), top=3).scan == Scan("exact")  # small
    built = json.loads((ann.ann_dir(folder) / "ann.json").read_text())
    (ann.ann_dir(folder) / "ann.json").write_text(json.dumps({**built, "covers": {"0": 1}}))  # older than its tiles
    stale = search(TileIndex.open(folder), model, sketch, RankingConfig(ann="on"), top=3).scan
    tiles = len(TileIndex.open(folder))
    raster = TileIndex.open(folder).rasters[0].path
    assert stale.by == "exact" and stale.advice.startswith(
        f"the index's ANN shortlist is older than its tiles or this worker ({raster} was indexed again since it was "
        f"built (tiles: 1 then, {tiles} now)); scanning exactly (`build-ann` builds it again"), stale
    (ann.ann_dir(folder) / "ann.json").write_text(json.dumps({**built, "covers": {**built["covers"], "7": 5}}))
    assert ann.describe(TileIndex.open(folder))["why_not_current"] == ("raster 7 was removed from the index since it "
                                                                       "was built")  # a removal killed before its rebuild
    (ann.ann_dir(folder) / "ann.json").write_text(json.dumps(built))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["rasters"][0]["complete"] = False  # as a run indexing it again (or repairing a damaged shard) leaves it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert ann.describe(TileIndex.open(folder))["why_not_current"] == (f"{raster} is being indexed again since it was "
                                                                       f"built (tiles: {tiles} then, {tiles} now)")
    shutil.rmtree(ann.ann_dir(folder))
    told = []  # what a service's `timeout` of the search would say (worker.service.loop)
    with telling_why_slow(told.append):
        none = search(TileIndex.open(folder), model, sketch, RankingConfig(ann="on"), top=3).scan
        search(TileIndex.open(folder), model, sketch, RankingConfig(ann="off"), top=3)
    assert none.by == "exact" and none.advice.startswith("the index has no ANN shortlist; scanning exactly"), none
    assert told == [none.advice], told


def test_a_large_index_without_a_shortlist_is_said_unless_its_first_run_is_under_way(model, assets, tmp_path,
                                                                                     monkeypatch):
    """`auto` asks the shortlist of an index of AUTO_MIN_TILES tiles or more (lowered here): one
    without a shortlist says so; while the index's rasters are not all complete, the run under
    way builds it, and nothing is said (the plugin said so at each search)."""
    folder = tmp_path / "index"
    writer = partly_indexed(model, assets, folder)
    monkeypatch.setattr(ann, "AUTO_MIN_TILES", 10)
    _, sketch = next(frames(TileIndex.open(folder), 1))
    assert search(TileIndex.open(folder), model, sketch, RankingConfig(), top=3).scan == Scan("exact")
    writer.build([assets["rmnp_rgb"]])
    said = search(TileIndex.open(folder), model, sketch, RankingConfig(), top=3).scan
    assert said.by == "exact" and said.advice.startswith("the index has no ANN shortlist"), said


def test_a_shortlist_in_use_keeps_reading_its_own_files_while_another_is_built(index_with_ann, model, tmp_path):
    """A worker's open shortlist answers from the files it opened while `build-ann` swaps in
    new ones (rows of the new files under the old ids would rank other windows)."""
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    index = TileIndex.open(folder)
    ranking = RankingConfig(ann="on")
    shortlist = ann_shortlist(index, ranking)
    queries = ann.query_vectors(query_templates.build(next(frames(index, 1))[1], ranking.sizes, ranking.angles).coarse)
    before = shortlist.search(queries, ranking.ann_neighbours)
    rebuilt = ann.build(TileIndex.open(folder), seed=1)  # trained on other windows: other codes
    assert rebuilt.vectors == shortlist.info["vectors"]
    after = shortlist.search(queries, ranking.ann_neighbours)
    assert (after[0] == before[0]).all() and (after[1] == before[1]).all()
    assert ann_shortlist(index, ranking) is not shortlist  # the next search opens the new one


def test_what_a_killed_build_leaves_is_cleared_and_the_old_shortlist_kept(index_with_ann, model, tmp_path, caplog):
    """Killed while writing, a build leaves its half-written folder beside the old shortlist;
    killed between the swap's two renames, the old shortlist under another name and none in
    place (searches scan exactly meanwhile). The next update clears the one and puts the other
    back, unchanged; `info` and a search say so meanwhile (a search said the index had none, and
    to build one)."""
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    built = (ann.ann_dir(folder) / "ann.json").read_text()
    half = folder / ".ann.new.999999"
    half.mkdir()
    (half / "refine_full.npy").write_bytes(b"\x93NUMPY half")
    ann.ann_dir(folder).rename(folder / ".ann.old.999999")
    index = TileIndex.open(folder)
    sketch = next(frames(index, 1))[1]
    with caplog.at_level(logging.WARNING, logger="worker.search"):
        assert ann_shortlist(index, RankingConfig(ann="on")) is None
        assert search(index, model, sketch, RankingConfig(ann="on"), top=5).hits
    assert "puts it back" in caplog.text and "has no ANN shortlist" not in caplog.text, caplog.text
    assert "puts it back" in ann.describe(index)["set_aside"], "info said no shortlist, and to build one (hours at scale)"
    info = ann.update(index)
    assert info is not None and info.build_s == 0  # put back, not rebuilt
    assert (ann.ann_dir(folder) / "ann.json").read_text() == built
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".ann")) == []
    assert ann_shortlist(index, RankingConfig(ann="on")).answers_for(index) == {0}


def test_a_ctrl_c_as_a_build_swaps_its_shortlist_in_keeps_the_new_one(index_with_ann, tmp_path, monkeypatch):
    """A Ctrl-C between the swap's two renames (a real SIGINT, sent there) set the old shortlist
    aside and discarded the new one, whole: hours of a continent's build lost, for the old one
    put back. It is held until both renames are done: the build stops as asked, the new one in
    place, and says so (it said "interrupted" alone: the build looked failed)."""
    import signal

    from worker.cli import stopped_said
    from worker.interrupts import StoppedOnceDone

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    assert json.loads((ann.ann_dir(folder) / "ann.json").read_text())["factory"] != "IVF2,Flat"
    renamed = ann.replace_durably

    def pressed_between_the_renames(written: Path, live: Path) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        renamed(written, live)

    monkeypatch.setattr(ann, "replace_durably", pressed_between_the_renames)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a run in the background ignores SIGINT
    try:
        with pytest.raises(StoppedOnceDone) as stopped:
            ann.build(TileIndex.open(folder), factory="IVF2,Flat")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped_said(stopped.value, resumes=False) == (
        "interrupted once the new shortlist was written whole and is in place", 128 + signal.SIGINT)
    assert json.loads((ann.ann_dir(folder) / "ann.json").read_text())["factory"] == "IVF2,Flat"
    assert ann.describe(TileIndex.open(folder))["current"]
    ann.update(TileIndex.open(folder))  # the old one, set aside, is the next update's or build's to remove
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".ann")) == []


def test_a_ctrl_c_while_the_old_shortlist_is_removed_says_the_new_one_is_in_place(index_with_ann, tmp_path,
                                                                                  monkeypatch):
    """Removing the old shortlist after the swap (gigabytes, a network disk) is not held: a Ctrl-C
    there said "interrupted" alone, as if the build had failed (a review's)."""
    from worker.interrupts import StoppedOnceDone

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    discard = ann._discard

    def pressed_while_removing(path: Path) -> None:
        if path.name.startswith(".ann.old.") and path.exists():
            raise KeyboardInterrupt
        discard(path)

    monkeypatch.setattr(ann, "_discard", pressed_while_removing)
    with pytest.raises(StoppedOnceDone, match="in place"):
        ann.build(TileIndex.open(folder), factory="IVF2,Flat")
    assert json.loads((ann.ann_dir(folder) / "ann.json").read_text())["factory"] == "IVF2,Flat"


@pytest.mark.parametrize("live", [True, False])
def test_a_set_aside_link_whose_target_is_gone_does_not_stop_a_build(index_with_ann, tmp_path, live):
    """A shortlist kept elsewhere through a link (INDEX/ann -> another disk), set aside by a killed
    swap, its target since deleted: every build-ann and index run failed on it with a traceback;
    with no shortlist in place, it was put back, and the build failed at its swap, its work lost."""
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    (folder / ".ann.old.999999").symlink_to(tmp_path / "deleted")
    if not live:
        shutil.rmtree(ann.ann_dir(folder))
    built = subprocess.run([sys.executable, "-m", "worker", "build-ann", str(folder)], cwd=REPO, capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr
    assert ann.describe(TileIndex.open(folder))["current"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".ann")) == []


def test_a_set_aside_folder_this_worker_may_not_enter_is_removed_not_a_traceback(index_with_ann, tmp_path):
    """A shortlist set aside by a killed swap, of mode 000 (a restrictive umask, another tool): the
    look for one to put back failed every build-ann and index run with a traceback (a review's).
    Run as a user is: root's power over modes taken away."""
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    aside = folder / ".ann.old.999999"
    shutil.copytree(ann.ann_dir(folder), aside)
    aside.chmod(0)
    built = subprocess.run([*AS_A_USER, sys.executable, "-m", "worker", "build-ann", str(folder)], cwd=REPO,
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert not aside.exists()


def test_an_index_run_puts_back_a_shortlist_a_killed_swap_left_aside(index_with_ann, model, assets, tmp_path):
    """An index of fewer tiles than get a shortlist unasked kept one built before up to date,
    but not one a build killed between its swap's two renames had left aside: the next index
    run saw none and left it there, and the index had no shortlist from then on."""
    from worker.app import IndexRequest, build_index

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    built = (ann.ann_dir(folder) / "ann.json").read_text()
    ann.ann_dir(folder).rename(folder / ".ann.old.999999")
    summary = build_index(IndexRequest(folder, (assets["s2_rgb"],), TileSettings(scales=(1, 2))), model)
    assert summary.ann is not None and (ann.ann_dir(folder) / "ann.json").read_text() == built
    assert not list(folder.glob(".ann.old.*"))


def test_an_ann_of_an_older_format_is_not_asked_until_rebuilt(index_with_ann, tmp_path):
    """A shortlist built before the re-rank codes existed has no refine.npy: the search scans
    exactly instead of failing, `info` says it is not current, and `update` rebuilds it,
    leaving none of an older format's files (format 3 had a range file of 8-bit full codes)."""
    import json

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    meta = ann.ann_dir(folder) / "ann.json"
    old = {k: v for k, v in json.loads(meta.read_text()).items() if k != "format"}
    meta.write_text(json.dumps(old))
    (ann.ann_dir(folder) / "refine.npy").unlink()
    (ann.ann_dir(folder) / "refine_full_range.npy").write_bytes(b"format 3")
    index = TileIndex.open(folder)
    assert ann_shortlist(index, RankingConfig(ann="on")) is None and not ann.describe(index)["current"]
    assert ann.describe(index)["why_not_current"] == f"built in another format (no format recorded; this worker's " \
                                                     f"is {ann.FORMAT})"
    ann.update(index)
    index = TileIndex.open(folder)
    assert ann_shortlist(index, RankingConfig(ann="on")) is not None and ann.describe(index)["current"]
    assert not (ann.ann_dir(folder) / "refine_full_range.npy").exists()


@pytest.mark.parametrize("while_open", [False, True], ids=["before", "while_open"])
@pytest.mark.parametrize("name", ann.MAPPED_FILES)
def test_a_truncated_ann_file_is_refused_before_it_is_read(index_with_ann, model, tmp_path, name, while_open):
    """A memory-mapped file cut short would crash the worker at its first read past the end
    (SIGBUS), also when it is cut in place (a copy over it) while a worker holds the shortlist
    open: its size is checked against what was written before each search, and the search says
    what to do. Before, index.faiss cut to a third under an open shortlist killed the worker."""
    from worker.errors import CorruptIndexError

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    path = ann.ann_dir(folder) / name
    index = TileIndex.open(folder)
    sketch = next(frames(index, 1))[1]
    if while_open:
        assert search(index, model, sketch, RankingConfig(ann="on"), top=5).hits
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 3)
    with pytest.raises(CorruptIndexError, match="build-ann"):
        search(index, model, sketch, RankingConfig(ann="on"), top=5)
    assert search(index, model, sketch, RankingConfig(ann="off"), top=5).hits  # the exact scan still answers


def garbage(path, keep_header: bool = False) -> None:
    """The file's bytes replaced by others of the same size (past its .npy header)."""
    data = bytearray(path.read_bytes())
    start = 128 if keep_header else 0
    data[start:] = np.random.default_rng(0).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def pickled_range(path) -> None:
    """A range file holding a pickle, padded to the size it was written at (past the size check)."""
    size = path.stat().st_size
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path.write_bytes(path.read_bytes().ljust(size, b"\0"))


def fewer_windows(folder) -> None:
    """windows.npy of fewer rows than the codes, its size in ann.json to match (a file of another build)."""
    import json

    np.save(folder / "windows.npy", np.load(folder / "windows.npy")[:-1])
    built = json.loads((folder / "ann.json").read_text())
    built["file_bytes"]["windows.npy"] = (folder / "windows.npy").stat().st_size
    (folder / "ann.json").write_text(json.dumps(built))


def shift_windows(path) -> None:
    """windows.npy with its rows moved past the maps' ends (a file of the right size and kind)."""
    rows = np.load(path)
    rows[:, 2:] += 100_000
    np.save(path, rows)


def edited_built(change) -> Callable:
    """A damage: ann.json as `change` (a function of its content, in place) leaves it, valid JSON."""
    def damage(folder) -> None:
        built = json.loads((folder / "ann.json").read_text())
        change(built)
        (folder / "ann.json").write_text(json.dumps(built))
    return damage


@pytest.mark.parametrize("damage, info_sees_it", [
    (lambda folder: (folder / "ann.json").write_text("{not json"), True),
    (lambda folder: (folder / "ann.json").write_text("[]"), True),
    # valid JSON of the wrong shape: tracebacks from index runs, searches and `info` (the lifecycle probe)
    (edited_built(lambda built: built.pop("factory")), True),
    (edited_built(lambda built: built.update(sources=[1])), True),
    (edited_built(lambda built: built.update(covers={"x": 5})), True),
    (edited_built(lambda built: built.update(vectors="many")), True),
    (edited_built(lambda built: built.update(vectors=built["vectors"] + 1)), True),
    # said as "5986515, written as 5986515 bytes"
    (edited_built(lambda built: built.update(file_bytes={k: str(v) for k, v in built["file_bytes"].items()})), True),
    (lambda folder: garbage(folder / "index.faiss"), True),
    (lambda folder: pickled_range(folder / "refine_range.npy"), True),
    (fewer_windows, True),
    (lambda folder: shift_windows(folder / "windows.npy"), False),
    (lambda folder: garbage(folder / "windows.npy", keep_header=True), False),
], ids=["ann.json not json", "ann.json a list", "no factory", "sources a list", "covers of no raster id",
        "vectors no count", "vectors not the files'", "file sizes as text", "index.faiss garbage", "refine_range a pickle", "fewer windows",
        "windows outside the maps", "windows garbage"])
def test_a_damaged_shortlist_of_the_right_size_says_so_and_is_built_again(index_with_ann, model, tmp_path, damage,
                                                                           info_sees_it, monkeypatch, caplog):
    """Files damaged without a change of size pass the size check. A search asking for the
    shortlist (`on`) says it is damaged and what to do (before: internal errors, or no hits and
    no word); one of `auto` over enough tiles (lowered here) finds what the exact scan finds, and
    its scan says why it was slow and what to do, the log once (before, it failed with
    `corrupt_index` like `on`: a plugin user, who cannot ask `off`, could not search the index
    until someone ran `build-ann`). `info`, and the next indexing run, see what opening the
    shortlist sees, not each window's row (360 MB at 10M tiles): `info` says so beside what it
    says of the index, and the indexing run builds it again instead of failing after its work.
    Damaged window rows are found by the searches that use them, and by an indexing run that adds
    rasters (else copied into a new shortlist whose sizes then match); `build-ann`, which the
    message names, builds it again."""
    from worker.errors import CorruptIndexError

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    damage(ann.ann_dir(folder))
    index = TileIndex.open(folder)
    sketch = next(frames(index, 1))[1]
    monkeypatch.setattr(ann, "AUTO_MIN_TILES", 10)
    exact = search(index, model, sketch, RankingConfig(ann="off"), top=5)
    with caplog.at_level(logging.WARNING, logger="worker.search"):
        for _ in range(2):
            passed = search(index, model, sketch, RankingConfig(), top=5)
            assert [h.placement for h in passed.hits] == [h.placement for h in exact.hits]
            assert passed.scan.by == "exact" and re.fullmatch(
                r"the index's ANN shortlist is damaged \(.*(ann|index\.faiss|windows\.npy|_range\.npy).*\); scanning "
                r"exactly \(`build-ann` builds it again\)", passed.scan.advice), passed.scan
        after_a_commit = TileIndex.open(folder, earlier=index)  # the view a service opens after a job's commit
        assert [h.placement for h in search(after_a_commit, model, sketch, RankingConfig(), top=5).hits] == \
            [h.placement for h in exact.hits]
    assert caplog.text.count("ANN shortlist is damaged") == 1
    with pytest.raises(CorruptIndexError, match="build-ann"):
        search(index, model, sketch, RankingConfig(ann="on"), top=5)
    assert ("build-ann" in ann.describe(index).get("damaged", "")) == info_sees_it
    if info_sees_it:
        ann.update(index)
    else:
        ann.build(index)
    index = TileIndex.open(folder)
    assert ann.describe(index)["current"]
    assert search(index, model, sketch, RankingConfig(ann="on"), top=5).hits


SHORTLIST_AS_A_SEARCH_SEES_IT = """
import sys
from worker import ann
from worker.errors import CorruptIndexError
from worker.ranking import RankingConfig
from worker.search import ann_shortlist
from worker.store import TileIndex

index = TileIndex.open(sys.argv[1])
print(ann.describe(index).get("damaged", "not damaged"))
try:
    ann_shortlist(index, RankingConfig(ann="on"))
    print("asked")
except CorruptIndexError as exc:
    print(exc)
ann.update(index)  # as an index run does once its rasters are in
"""


@pytest.mark.parametrize("unreadable", ["refine_full.npy", "."], ids=["a file", "its folder"])
def test_a_shortlist_this_worker_may_not_read_says_so_and_is_built_again(index_with_ann, tmp_path, unreadable):
    """A shortlist's file or folder this worker may not read (mode 000: another user's on a
    shared disk, a restrictive umask): `info` and searches failed with a traceback (the service
    said `internal`: a bug), an index run failed after its work, and the old folder, set aside
    by the rebuild, stayed beside the new one for good. Now they say it is damaged and what to
    do, the index run builds it again, and nothing is left behind. Run as a user is: root's
    power over modes taken away (the lifecycle probe's finding)."""
    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    (ann.ann_dir(folder) / unreadable).chmod(0)
    result = subprocess.run([*AS_A_USER, sys.executable, "-c", SHORTLIST_AS_A_SEARCH_SEES_IT, str(folder)],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    info_said, search_said = result.stdout.splitlines()
    for said in (info_said, search_said):
        assert "cannot be read (Permission denied); run `python -m worker build-ann` again" in said, said
    assert ann.describe(TileIndex.open(folder))["current"]
    assert list(folder.glob(".ann.*")) == [], "the old one left beside"


def test_an_ann_json_of_the_wrong_shape_says_what_is_wrong(index_with_ann, tmp_path):
    """File sizes written as text were said as "index.faiss: 5986515, written as 5986515 bytes"."""
    from worker.errors import CorruptIndexError

    folder = tmp_path / "ann"
    shutil.copytree(ann.ann_dir(index_with_ann[0]), folder)
    edited_built(lambda built: built.update(file_bytes={k: str(v) for k, v in built["file_bytes"].items()}))(folder)
    with pytest.raises(CorruptIndexError, match=r"ann.json: not what a build writes \(a tile count, file size or raster id "
                                                r"that is no count\); run `python -m worker build-ann` again"):
        ann.read_built(folder)


def test_an_index_faiss_naming_windows_past_its_rows_is_a_damaged_shortlist(index_with_ann, model, tmp_path):
    """An index.faiss damaged in its lists' ids alone is the size it was written at, and FAISS
    reads it; the windows it names lie past windows.npy's rows. A search says the shortlist is
    damaged and what to do, from the ids FAISS hands back (not an error from reading rows that
    are not there, which a client would see as internal); `info` says so, and the next index run
    builds it again."""
    import faiss

    from worker.errors import CorruptIndexError

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    path = ann.ann_dir(folder) / "index.faiss"
    size = path.stat().st_size
    damaged = faiss.read_index(str(path))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(damaged).invlists)
    for number in range(lists.nlist):
        ids = faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number))
        ids += damaged.ntotal  # in place: every window named one index past the last
    faiss.write_index(damaged, str(path))
    assert path.stat().st_size == size
    index = TileIndex.open(folder)
    sketch = next(frames(index, 1))[1]
    with pytest.raises(CorruptIndexError, match=r"index.faiss: window \d+ of \d+; .*build-ann"):
        search(index, model, sketch, RankingConfig(ann="on"), top=5)
    assert "build-ann" in ann.describe(index)["damaged"], "info said it was current"
    ann.update(index)  # as the next index run does: it kept it as current
    index = TileIndex.open(folder)
    assert ann.describe(index)["current"] and search(index, model, sketch, RankingConfig(ann="on"), top=5).hits


def test_the_command_line_builds_reports_and_asks_the_ann(index_with_ann, assets, tmp_path):
    import json
    import subprocess
    import sys

    folder = tmp_path / "index"
    shutil.copytree(index_with_ann[0], folder)
    shutil.rmtree(folder / "ann")

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "worker", *map(str, args)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert json.loads(cli("info", folder))["ann"] is None
    built = json.loads(cli("build-ann", folder))
    info = json.loads(cli("info", folder))["ann"]
    assert info["vectors"] == built["vectors"] > 200 and info["current"] and not info["asked_by_default"]
    sketch = tmp_path / "sketch.png"
    frame, _ = next(frames(TileIndex.open(folder), 1))
    image, valid = frame.read(224)
    pseudo_sketch(image, "simple", valid=valid).save(sketch)
    out = tmp_path / "hits.geojson"
    said = json.loads(cli("search", folder, "--sketch", sketch, "--ann", "on", "--top", "5", "--out", out,
                          "--sketch-modules", "none"))
    written = json.loads(out.read_text())
    assert len(written["features"]) == 5 and said["scan"] == written["scan"] == {"by": "ann", "advice": None}


def test_a_continental_shortlist_gets_the_finer_codes_and_faiss_accepts_every_factory():
    """Indexes of LARGE_VECTORS windows or more get 128-byte PQ codes, smaller compressed ones 64
    bytes, small ones none; and FAISS makes each factory string (a typo in one would otherwise
    show only after an hour's training at continental scale)."""
    import faiss

    dim = ann.WINDOW_DIM
    made = {}
    for n in (ann.SMALL_VECTORS - 1, ann.SMALL_VECTORS, ann.LARGE_VECTORS - 1, ann.LARGE_VECTORS, 22_500_000):
        whole = faiss.index_factory(dim, ann.factory_for(n), faiss.METRIC_INNER_PRODUCT)
        made[n] = faiss.extract_index_ivf(whole).code_size  # `whole` kept: the lists belong to it
    assert made[ann.SMALL_VECTORS - 1] == dim * 4  # uncompressed float32
    assert made[ann.SMALL_VECTORS] == made[ann.LARGE_VECTORS - 1] == 64
    assert made[ann.LARGE_VECTORS] == made[22_500_000] == 128


@pytest.mark.parametrize("ann_mode", ["off", "on"])
def test_a_search_limited_to_an_area_ranks_the_places_inside_it(index_with_ann, model, ann_mode):
    """A map view over part of a raster gets the best places inside it, however many better
    ones lie outside: the scans keep only the peaks that meet the area, and the ANN shortlist
    only the windows near it, before they cut their lists short. The lists are cut short here
    (20 peaks, 16 windows) as, at scale, a map view holds few of a mosaic's best peaks."""
    from rasterio.crs import CRS

    from worker.geo import bbox_to_wgs84, reproject_rings
    from worker.store import WGS84

    index = TileIndex.open(index_with_ann[0])
    frame, sketch = next(frames(index, 1))
    raster = index.rasters[0]
    side = 480  # raster px: about 6% of the scene, away from the sketched place
    cx = min(max((frame.cx + raster.width / 2) % raster.width, side / 2), raster.width - side / 2)
    cy = min(max((frame.cy + raster.height / 2) % raster.height, side / 2), raster.height - side / 2)
    (x0, x1), (y0, y1) = (raster.affine * (np.array([cx - side / 2, cx + side / 2]), np.array([cy - side / 2, cy + side / 2])))
    area = bbox_to_wgs84((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), CRS.from_wkt(raster.crs_wkt))
    ranking = RankingConfig(ann=ann_mode, shortlist=20, tile_window_pool=20, ann_windows=16)
    hits = search(index, model, sketch, ranking, top=3, area_wgs84=area).hits
    assert len(hits) == 3
    for footprint in reproject_rings([h.placement for h in hits], WGS84):
        assert footprint.intersects(area)
    unlimited = search(index, model, sketch, ranking, top=3).hits
    assert not all(f.intersects(area) for f in reproject_rings([h.placement for h in unlimited], WGS84))


def test_the_area_keeps_windows_of_rasters_with_high_ids():
    """windows.npy holds int32 rows: a mosaic of thousands of sheets has raster ids past 2048,
    whose windows an area-limited search must still hand on."""
    from worker.search_area import SearchArea

    area = SearchArea(keys=[(2048, 1), (5000, 2)], boxes={(5000, 2): (0, 0, 10, 10)}, whole=False)
    rows = np.array([[2048, 1, 0, 0], [5000, 2, 5, 5], [5000, 2, 50, 50], [7, 1, 0, 0]], np.int32)
    assert list(area.meets_each(rows[:, :2], rows[:, 2], rows[:, 3], 4)) == [True, True, False, False]


BUILD_UNDER_A_FILE_SIZE_LIMIT = """
import json, resource, signal, sys
from worker import ann
from worker.errors import error_object
from worker.store import TileIndex
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    ann.build(TileIndex.open(sys.argv[1]))
except Exception as exc:
    print(json.dumps(error_object(exc)))
"""


def test_a_shortlist_the_disk_refuses_to_take_is_a_storage_error_and_the_index_stays_as_it_was(s2_index, tmp_path):
    """FAISS says a failed write in its own words (a RuntimeError, "write error in ..."): it was
    a traceback, `internal` in the service. Here the disk refuses FAISS's file alone (a file size
    limit above each re-rank code file, below the FAISS index): a storage error, and the index is
    left as it was, searchable, with no shortlist and nothing half-written beside it."""
    import json

    from wire import errors as codes

    index_dir = shutil.copytree(s2_index, tmp_path / "index")
    before = sorted(p.name for p in index_dir.iterdir())  # its lock too: each writer takes it
    done = subprocess.run([sys.executable, "-c", BUILD_UNDER_A_FILE_SIZE_LIMIT, str(index_dir), "1200000"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    reply = json.loads(done.stdout)
    assert reply["code"] == codes.STORAGE and "faiss" in reply["message"].lower(), reply
    assert "file size limit" in reply["message"], reply  # FAISS's words for the cause, read back
    assert sorted(p.name for p in index_dir.iterdir()) == before
    assert not ann.AnnShortlist.exists(index_dir) and len(TileIndex.open(index_dir)) > 0
