"""Indexing elsewhere gives the index one process gives: on a Dask cluster (local mode, 2 worker
processes), with tiles read and drawn in a pool of processes, and drawn as a GPU draws them
(worker.drawing_pool)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch

from worker.app import ModelOptions
from worker.distributed import Cluster, ClusterChunks, connect
from worker.drawing_pool import DeviceDrawing, DrawingJob, DrawingPool, _read_and_draw_here, drawn_batches
from worker.errors import InputError, RasterReadError
from worker.store import IndexWriter, TileIndex
from conftest import damaged_near_its_end
from worker.store.writer import LocalChunks, UnreadRasters
from worker.tiling import TileSettings, open_raster, plan_tiles

SETTINGS = TileSettings(tile=128, scales=(1, 2))
OPTIONS = ModelOptions(device="cpu", sketch_modules="none")  # the `model` fixture's
CHUNK = 12  # several chunks per raster, so two workers share them


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, assets, model) -> TileIndex:
    """The reference, with tokens: an index built elsewhere with or without them must match it."""
    out = tmp_path_factory.mktemp("one") / "index"
    IndexWriter(out, model, SETTINGS, CHUNK, tokens=True).build([assets["rmnp_rgb"], assets["osbs_rgb"]])
    return TileIndex.open(out)


@pytest.fixture(scope="module")
def cluster():
    with connect("local:2") as client:
        yield client


def assert_same_index(got: TileIndex, want: TileIndex) -> None:
    assert len(got) == len(want) > 2 * CHUNK
    keys = ("raster_id", "col_off", "row_off", "width", "height", "scale", "cell_row", "cell_col")
    order_g, order_w = (np.lexsort([i.records[k] for k in reversed(keys)]) for i in (got, want))
    for k in keys:
        assert (got.records[k][order_g] == want.records[k][order_w]).all(), k
    if got.has_tokens:  # built with tokens: they travelled and came back
        tokens_g, _ = got.tokens_of(order_g)
        tokens_w, _ = want.tokens_of(order_w)
        np.testing.assert_allclose(tokens_g.astype(np.float32), tokens_w.astype(np.float32), atol=2e-2)
    assert (got.cells_of(order_g) == want.cells_of(order_w)).mean() > 0.999


def test_cluster_index_equals_single_process(tmp_path, assets, model, cluster, single_process):
    out = tmp_path / "index"
    chunks = ClusterChunks(cluster, OPTIONS, model.fingerprint()["tile_encoder"])
    seen = []
    IndexWriter(out, model, SETTINGS, CHUNK, tokens=True).build([assets["rmnp_rgb"], assets["osbs_rgb"]],
                                                                progress=seen.append, computer=chunks)
    assert TileIndex.open(out).has_tokens
    assert_same_index(TileIndex.open(out), single_process)
    assert seen[-1].tiles_done == seen[-1].tiles_total  # progress reached the end
    assert len(cluster.run(os.getpid)) == 2


def test_a_killed_worker_does_not_stop_the_job(tmp_path, assets, model, cluster, single_process):
    out = tmp_path / "index"
    chunks = ClusterChunks(cluster, OPTIONS, model.fingerprint()["tile_encoder"])
    killed = threading.Event()

    def kill_one_worker(progress) -> None:
        if not killed.is_set():  # after the first commit: the other chunks are queued or running
            pid = next(iter(cluster.run(os.getpid).values()))
            os.kill(pid, signal.SIGKILL)
            killed.set()

    IndexWriter(out, model, SETTINGS, CHUNK).build([assets["rmnp_rgb"], assets["osbs_rgb"]], progress=kill_one_worker,
                                                   computer=chunks)
    assert killed.is_set()
    assert not TileIndex.open(out).has_tokens  # the default: what a search needs, no more
    assert not list((out / "shards").rglob("tokens.npy"))
    assert_same_index(TileIndex.open(out), single_process)


def test_a_worker_with_another_model_is_refused(tmp_path, assets, model, cluster):
    from worker.errors import InputError

    other = ModelOptions(device="cpu", sketch_modules="none", random_weights=True)
    chunks = ClusterChunks(cluster, other, model.fingerprint()["tile_encoder"])
    with pytest.raises(InputError, match="another model"):
        IndexWriter(tmp_path / "index", model, SETTINGS, CHUNK).build([assets["osbs_rgb"]], computer=chunks)


@pytest.mark.parametrize("tokens, batch", [(False, 5), (True, CHUNK)])
def test_drawing_in_other_processes_gives_the_same_index(tmp_path, assets, model, single_process, tokens, batch):
    """Two drawing processes, chunks of several batches or of one: the pool draws ahead across
    the ends of chunks and of rasters, and hands every batch back to its own chunk, in order."""
    out = tmp_path / "index"
    seen = []
    IndexWriter(out, model, SETTINGS, CHUNK, tokens=tokens).build(
        [assets["rmnp_rgb"], assets["osbs_rgb"]], progress=seen.append, batch_size=batch,
        computer=LocalChunks(model, processes=2))
    assert_same_index(TileIndex.open(out), single_process)
    assert [p.tiles_done for p in seen] == sorted(p.tiles_done for p in seen) and seen[-1].tiles_done == seen[-1].tiles_total


def test_a_pool_run_stopped_or_failed_midway_resumes_to_the_same_index(tmp_path, assets, model, single_process):
    """Stopped in the middle of a chunk, then failing when the second raster turns unreadable
    after the pool has started: each time the pool's processes end, what was committed stays,
    and the run resumed gives the one-process index. The second raster's first batch is asked
    for only after the first raster's last (the pool looks 4 batches ahead), so it is read
    after it was cut short."""
    rmnp, osbs = tmp_path / "rmnp-rgb.tif", tmp_path / "OSBS_029.tif"
    shutil.copy2(assets["rmnp_rgb"], rmnp)
    shutil.copy2(assets["osbs_rgb"], osbs)
    out = tmp_path / "index"
    others = set(multiprocessing.active_children())  # the module's Dask cluster

    def build(**kw):
        return IndexWriter(out, model, SETTINGS, CHUNK).build([rmnp, osbs], batch_size=5,
                                                             computer=LocalChunks(model, processes=2), **kw)

    seen = []
    stopped = build(progress=seen.append, should_stop=lambda: len(seen) >= 5)  # the plan, 4 steps
    assert 0 < len(stopped["shards"]) and not set(multiprocessing.active_children()) - others
    saved, stat = osbs.read_bytes(), osbs.stat()

    def cut_short(progress):
        osbs.write_bytes(saved[:2000])

    with pytest.raises(InputError):
        build(progress=cut_short)
    assert not set(multiprocessing.active_children()) - others
    osbs.write_bytes(saved)
    os.utime(osbs, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same file again, not a changed one
    build()
    assert_same_index(TileIndex.open(out), single_process)


def test_a_drawing_pool_outlives_ctrl_c_and_a_closed_terminal_sent_to_its_group(assets):
    """SIGINT and SIGHUP reach every process of the group: the pool's processes died of them, the
    run failed on a broken pool, and a service's job stopped by its closed terminal ended failed,
    dropped instead of left to resume. They hold both while they boot (importing torch takes
    seconds; a pool of 15 took 14 s) and ignore both once they run; the run's own process stops
    the run."""
    info = open_raster(assets["osbs_rgb"], None)
    tiles = list(plan_tiles(info, SETTINGS))[:8]
    job = DrawingJob(info.to_json(), 224, SETTINGS.tile, SETTINGS.min_valid)

    def signal_every_process() -> None:
        for process in pool.executor._processes.values():
            os.kill(process.pid, signal.SIGINT)
            os.kill(process.pid, signal.SIGHUP)

    # the processes start with the signals as a terminal gives them: a run in the background (CI)
    # hands on both ignored, and the test could not fail
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGHUP, signal.SIG_DFL)
    pool = DrawingPool(2)
    try:
        booting = [pool.submit(_read_and_draw_here, job, tiles[start:start + 4]) for start in (0, 4)]
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGHUP, before[1])
        assert len(pool.executor._processes) == 2  # spawned by the submits, and booting now
        signal_every_process()
        assert [batch.tiles for batch in (future.result() for future in booting)] == [tiles[:4], tiles[4:]]
        signal_every_process()  # booted: running
        time.sleep(0.5)
        assert [n for n, _ in next(pool.each_job([(job, tiles)], 4))] == [4, 8]
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGHUP, before[1])
        pool.close()


def test_a_chunk_left_early_is_an_error_not_an_empty_chunk(assets):
    """The pool draws the next chunk's batches ahead: if one chunk's batches are left untaken,
    asking for the next chunk's must fail, not hand back none (a chunk of nothing but skipped
    tiles would be committed)."""
    info = open_raster(assets["osbs_rgb"], None)
    tiles = list(plan_tiles(info, SETTINGS))
    job = DrawingJob(info.to_json(), 224, SETTINGS.tile, SETTINGS.min_valid)
    pool = DrawingPool(2)
    try:
        chunks = pool.each_job([(job, tiles[:12]), (job, tiles[12:24])], 4)
        next(next(chunks))  # the first chunk's first batch of three
        with pytest.raises(RuntimeError, match="not all taken"):
            next(next(chunks))
    finally:
        pool.close()


@pytest.mark.parametrize("pixels", ["edges", "rgb"])
def test_tiles_drawn_as_a_gpu_draws_them_are_the_cpus_drawings(assets, pixels):
    """On a GPU a batch is read in threads and drawn and described there, the hysteresis and the
    thinning in threads on the CPU (drawn_batches' device; DeviceDrawing). The CPU standing in
    for the GPU runs that path here, a whole batch at once: the tiles kept, their cells and the
    ViT's pixels must be the CPU path's, for tiles inside the raster and tiles reaching past its
    edges (partly nodata)."""
    for name in ("rmnp_rgb", "osbs_rgb"):  # 26 and 20 tiles
        info = open_raster(assets[name], None)
        tiles = list(plan_tiles(info, SETTINGS))
        job = DrawingJob(info.to_json(), 224, SETTINGS.tile, SETTINGS.min_valid, pixels)
        on_cpu = list(drawn_batches(job, tiles, 16))
        as_on_gpu = list(drawn_batches(job, tiles, 16, torch.device("cpu")))
        assert [n for n, _ in as_on_gpu] == [n for n, _ in on_cpu] == [16, len(tiles)]
        assert min(share for _, b in on_cpu for share in b.valid_share) < 1  # some tiles reach past an edge
        for (_, want), (_, got) in zip(on_cpu, as_on_gpu):
            assert got.tiles == want.tiles and got.valid_share == want.valid_share
            assert np.array_equal(got.cells, want.cells) and np.array_equal(got.cell_origins, want.cell_origins)
            assert isinstance(got.pixels, torch.Tensor) and np.array_equal(got.pixels.numpy(), want.pixels)


def open_files() -> set[str]:
    """The files this process has open now (Linux)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile
            pass
    return found


def test_a_gpus_reads_ahead_hand_back_each_chunks_batches_in_order(assets, tmp_path):
    """DeviceDrawing reads the next batches in threads, across the ends of chunks, while one is
    drawn: each chunk gets its own batches, in order, the same as drawn one after another. Once
    the run ends, no reading thread holds the raster open (on Windows it could not be replaced)."""
    raster = tmp_path / "rmnp.tif"
    shutil.copyfile(assets["rmnp_rgb"], raster)
    info = open_raster(raster, None)
    tiles = list(plan_tiles(info, SETTINGS))
    job = DrawingJob(info.to_json(), 224, SETTINGS.tile, SETTINGS.min_valid)
    chunks = [tiles[:10], tiles[10:11], tiles[11:]]  # 3, 1 and 4 batches of 4
    drawing = DeviceDrawing(torch.device("cpu"))
    try:
        got = [list(batches) for batches, _ in zip(drawing.each_job([(job, c) for c in chunks], 4), chunks)]
        assert str(raster) in open_files()
    finally:
        drawing.close()
    assert str(raster) not in open_files()
    for chunk, batches in zip(chunks, got):
        want = list(drawn_batches(job, chunk, 4))
        assert [n for n, _ in batches] == [n for n, _ in want]
        for (_, a), (_, b) in zip(batches, want):
            assert a.tiles == b.tiles and np.array_equal(a.cells, b.cells)


def test_a_run_drawn_here_keeps_the_raster_it_reads_open_and_no_other(tmp_path, model, assets):
    """Drawn in this process, a run reads each raster through a handle kept from batch to batch
    (it opened the raster for every batch of 16: a VRT of 50,000 sheets takes GDAL 2 s to open),
    closed once the run reads another or ends (on Windows an open raster cannot be replaced). A
    mosaic's sheet not there fails the read, and read through the same handles once it is back,
    it is read whole."""
    from two_sheets import write_two_sheets
    from worker.drawing_pool import read_tiles
    from worker.raster_handles import ThreadHandles

    mosaic, _ = write_two_sheets(assets["rmnp_rgb"], tmp_path)
    info = open_raster(mosaic, None)
    tiles = list(plan_tiles(info, SETTINGS))
    job = DrawingJob(info.to_json(), 224, SETTINGS.tile, SETTINGS.min_valid)
    east = [t for t in tiles if t.scale == 1 and t.col_off >= info.width // 2]
    want = read_tiles(job, east, ThreadHandles())
    handles = ThreadHandles()
    (tmp_path / "east.tif").rename(tmp_path / "east.away")
    with pytest.raises(RasterReadError, match="east.tif"):
        read_tiles(job, east, handles)
    (tmp_path / "east.away").rename(tmp_path / "east.tif")
    got = read_tiles(job, east, handles)
    assert all(np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) for a, b in zip(got, want))
    handles.close()

    class Watched(LocalChunks):
        def run(self, *args, **kwargs):  # open files seen after each of the run's chunks
            for job, result in super().run(*args, **kwargs):
                seen.append((job.raster["path"], {str(r) for r in rasters} & open_files()))
                yield job, result

    seen: list[tuple[str, set[str]]] = []
    rasters = [shutil.copyfile(assets[name], tmp_path / f"{name}.tif") for name in ("rmnp_rgb", "osbs_rgb")]
    IndexWriter(tmp_path / "index", model, SETTINGS, CHUNK).build(rasters, computer=Watched(model, processes=0))
    assert len(seen) > 2 and all(open_now == {path} for path, open_now in seen), \
        "the raster read kept open from chunk to chunk, and it alone (a GeoTIFF's file stays open with it)"
    assert not {str(r) for r in rasters} & open_files()


def test_a_gpus_reading_threads_keep_only_the_raster_read_now_open(tmp_path, assets):
    """Read in threads (DeviceDrawing), a batch is split among the threads; a thread given no part
    of the next raster kept the last one open to the run's end (on Windows it could not be
    replaced), found by a review. Two threads (on two cores or more) read the first raster's batch, one
    the second's."""
    rasters = [shutil.copyfile(assets[name], tmp_path / f"{name}.tif") for name in ("rmnp_rgb", "osbs_rgb")]
    jobs = [DrawingJob(open_raster(r, None).to_json(), 224, SETTINGS.tile, SETTINGS.min_valid) for r in rasters]
    tiles = [list(plan_tiles(open_raster(r, None), SETTINGS)) for r in rasters]
    drawing = DeviceDrawing(torch.device("cpu"))
    try:
        for batches in zip(drawing.each_job([(jobs[0], tiles[0][:4]), (jobs[1], tiles[1][:1])], 4), range(2)):
            list(batches[0])
        assert {str(r) for r in rasters} & open_files() == {str(rasters[1])}
    finally:
        drawing.close()


def test_a_raster_damaged_before_a_gpu_reads_it_is_an_input_error(tmp_path, assets):
    """Saying GDAL's reason, not rasterio's "Read failed. See previous exception for details";
    the chunks after it are read still."""
    info = open_raster(assets["osbs_rgb"], None)
    tiles = list(plan_tiles(info, SETTINGS))[:8]
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(assets["osbs_rgb"].read_bytes()[:2000])
    job = DrawingJob({**info.to_json(), "path": str(damaged)}, 224, SETTINGS.tile, SETTINGS.min_valid)
    with pytest.raises(InputError, match=r"damaged.tif: cannot read window .*got \d+ bytes, expected \d+"):
        list(drawn_batches(job, tiles, 4, torch.device("cpu")))
    drawing = DeviceDrawing(torch.device("cpu"))  # read ahead in another thread: the error still comes here
    try:
        chunks = drawing.each_job([(job, tiles), (replace(job, raster=info.to_json()), tiles)], 2)
        with pytest.raises(RasterReadError, match="damaged.tif"):
            list(next(chunks))
        # the failed chunk's batches read ahead, and those not yet read, are dropped, and the next
        # chunk's come whole (a run goes on)
        assert [n for n, _ in next(chunks)] == [2, 4, 6, 8]
    finally:
        drawing.close()


OVERLAPPING_CLUSTERS = """
import os
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from test_distributed import CHUNK, OPTIONS, SETTINGS, DaskScheduler
from worker.assets import load_asset_paths
from worker.distributed import ClusterChunks, connect
from worker.model.loading import load_model
from worker.store import IndexWriter, TileIndex

before = dict(os.environ)
first, second = connect("local:1"), connect("local:1")
first.__enter__()
second.__enter__()
first.__exit__(None, None, None)  # the first started closes first
second.__exit__(None, None, None)
print("environment", "kept" if dict(os.environ) == before else "changed", flush=True)
folder, model = Path(sys.argv[1]), load_model(device="cpu", sketch_modules="none")
with DaskScheduler(folder) as cluster, connect(cluster.address) as client:  # then a run on the user's own scheduler
    chunks = ClusterChunks(client, OPTIONS, model.fingerprint()["tile_encoder"])
    IndexWriter(folder / "index", model, SETTINGS, CHUNK).build([load_asset_paths()["osbs_rgb"]], computer=chunks)
print("indexed", TileIndex.open(folder / "index").info()["complete"])
"""


def test_a_local_cluster_leaves_this_process_as_it_was(tmp_path):
    """Dask's nannies set OMP_NUM_THREADS=1 in the process that starts them; processes started
    after the cluster (a worker service, a drawing pool) must not inherit it, also when two
    clusters overlap (a service's jobs side by side: each put back what it found). Clients
    closed out of order left Dask's default client a closed one, and a later run on a
    scheduler of the user's waited for ever for its first chunk."""
    before = dict(os.environ)
    with connect("local:1") as client:
        assert list(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values()) == ["1"]  # as Dask means it
    assert dict(os.environ) == before
    import subprocess
    import sys

    from conftest import REPO

    overlapping = subprocess.Popen([sys.executable, "-c", OVERLAPPING_CLUSTERS, str(tmp_path)], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)  # in a process of its own, its Dask processes in its group
    try:
        out, err = overlapping.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(overlapping.pid, signal.SIGKILL)  # a run waiting for ever, and what it started
        out, err = overlapping.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(overlapping.pid, signal.SIGKILL)
    assert out.strip().splitlines() == ["environment kept", "indexed True"], out + err


def test_the_command_line_indexes_on_a_local_cluster_keeping_the_users_dask_preload(tmp_path, assets):
    """A worker preload in the user's Dask configuration (a site's logging or credentials set-up)
    still runs in the local cluster's workers beside ours: ours once replaced it, and then,
    given with its arguments as a list each, left the lists one short and stopped every worker."""
    import json
    import subprocess
    import sys

    ran = tmp_path / "preload-ran"
    ran.mkdir()
    users_preload = tmp_path / "site_preload.py"
    users_preload.write_text(f"import os\n\ndef dask_setup(worker):\n    open(os.path.join({str(ran)!r}, "
                             f"str(os.getpid())), 'w').close()\n")
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": str(users_preload),
           "DASK_DISTRIBUTED__WORKER__PRELOAD_ARGV": "[['--site', 'lab']]"}
    done = subprocess.run([sys.executable, "-m", "worker", "index", "--out", tmp_path / "index", "--tile", "128",
                           "--scales", "1", "--cluster", "local:2", "--quiet", "--sketch-modules", "none",
                           assets["osbs_rgb"]], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert " INFO " not in done.stderr, done.stderr  # --quiet: Dask's 37 lines of news are not the user's
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["tile_count"] == len(TileIndex.open(tmp_path / "index")) > 0
    assert len(os.listdir(ran)) >= 2, "the user's preload ran in each of the 2 workers (a restarted one again)"


class InATerminal:
    """A command started as a terminal starts it (its own process group: a test's Ctrl-C reaches
    its worker processes too), its stderr gathered as it comes; what is left of it is killed on
    leaving."""

    def __init__(self, command: list):
        import subprocess

        from conftest import as_a_terminal_starts_it

        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                        preexec_fn=as_a_terminal_starts_it)
        self._said: list[str] = []
        self._reader = threading.Thread(target=lambda: self._said.extend(iter(lambda: self.process.stderr.read(1), "")),
                                        daemon=True)
        self._reader.start()

    def said(self) -> str:
        return "".join(self._said)

    def until_it_says(self, pattern: str) -> None:
        import re

        self.until(lambda: re.search(pattern, self.said()), f"it says {pattern!r}")

    def until(self, condition: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + 180
        while not condition() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert condition() and self.process.poll() is None, f"not {what}: {self.said()}"

    def children(self) -> list[int]:
        """The processes it started (Dask's worker processes, Python's resource tracker); Linux's /proc."""
        kids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            if parent == self.process.pid:
                kids.append(int(entry))
        return kids

    def ctrl_c(self, times: int = 1) -> None:
        for _ in range(times):
            os.killpg(self.process.pid, signal.SIGINT)
            time.sleep(0.3)

    def __enter__(self) -> "InATerminal":
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left: its workers ignore SIGINT
        except ProcessLookupError:
            pass
        self.process.wait()
        self._reader.join(timeout=10)
        self.process.stderr.close()


def test_ctrl_c_stops_a_local_cluster_run_in_a_few_lines_and_it_resumes(tmp_path, assets):
    """Ctrl-C reaches the terminal's whole process group, Dask's worker processes too: each died
    with two KeyboardInterrupt tracebacks and its nanny's, some 150 lines around the one that
    says what happened. The driver alone stops the run, however often Ctrl-C is pressed; the
    committed chunks are kept."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "worker", "index", "--out", tmp_path / "index", "--tile", "64", "--scales", "1",
               "--chunk-tiles", "4", "--cluster", "local:2", "--sketch-modules", "none", assets["osbs_rgb"],
               assets["lsat7_rgb"]]
    with InATerminal(command) as run:
        run.until_it_says(r"\b[1-9]\d*/\d+ \[")  # a chunk is in (the bar moved)
        run.ctrl_c(3)  # an impatient user: Ctrl-C again while the cluster closes broke the close off, and Dask's
        assert run.process.wait(timeout=60) == 128 + signal.SIGINT  # exit hook waited 10 s; a third printed its traceback
    said = run.said()
    assert said.rstrip().splitlines()[-1].startswith("interrupted: committed work is kept")  # after the bar's end
    assert "Traceback" not in said and "KeyboardInterrupt" not in said and "distributed." not in said, said
    kept = len(TileIndex.open(tmp_path / "index"))
    assert kept > 0
    resumed = subprocess.run(command + ["--quiet"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(TileIndex.open(tmp_path / "index")) > kept


def loading_torch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch" in maps.read()
    except OSError:
        return False


@pytest.mark.parametrize("pressed_once", ["while its worker processes boot", "while its workers load the model"])
def test_ctrl_c_early_in_a_local_cluster_run_stops_it_in_a_few_lines(tmp_path, assets, pressed_once):
    """Pressed while the cluster started, Ctrl-C left it half started: its booting workers
    printed their KeyboardInterrupt tracebacks, and Dask its own. Pressed while the workers
    loaded the model for their first chunk, each closing worker logged the heartbeat its close
    cut off, as an ERROR with two tracebacks. Some 30 to 70 lines either way, around the one
    that says what happened."""
    import sys

    command = [sys.executable, "-m", "worker", "index", "--out", tmp_path / "index", "--tile", "64", "--scales", "1",
               "--cluster", "local:2", "--sketch-modules", "none", assets["osbs_rgb"]]
    with InATerminal(command) as run:
        if pressed_once == "while its worker processes boot":  # Python's resource tracker, then the two workers
            run.until(lambda: len(run.children()) >= 3, "three processes started")
        else:
            run.until(lambda: any(map(loading_torch, run.children())), "a worker loading torch")
        run.ctrl_c()
        assert run.process.wait(timeout=60) == 128 + signal.SIGINT
    said = run.said()
    assert said.rstrip().splitlines()[-1].startswith("interrupted: committed work is kept")
    assert "Traceback" not in said and "KeyboardInterrupt" not in said and "ERROR" not in said, said


def test_a_connection_closed_under_a_message_as_a_cluster_closes_is_said_without_a_traceback(caplog):
    """Dask's real batched stream, its connection closed between a message queued and written,
    as a worker and its scheduler closing at once do: a `-v` log (`serve --cluster`) showed the
    CommClosedError's 15-line traceback for a normal end."""
    import asyncio
    import logging

    from distributed.batched import BatchedSend
    from distributed.comm import connect as dial
    from distributed.comm import listen

    from worker.local_cluster_worker import closed_comms_without_traceback

    async def close_under_a_message():
        async def accept(comm):
            await comm.close()

        async with listen("inproc://", accept) as listener:
            comm = await dial(listener.contact_address)
            batched = BatchedSend(interval="5ms")
            batched.start(comm)
            batched.send({"op": "heartbeat"})
            comm.abort()
            await asyncio.sleep(0.2)  # its sending wakes and finds the connection closed

    closed_comms_without_traceback()  # as every process of a cluster run does
    with caplog.at_level(logging.INFO, logger="distributed.batched"):
        asyncio.run(close_under_a_message())
    assert "Batched Comm Closed" in caplog.text and "Traceback" not in caplog.text, caplog.text


def test_a_stop_while_a_cluster_starts_is_held_until_it_is_up_and_a_second_is_not(monkeypatch):
    """What lets a local cluster start whole (worker.interrupts.stops_held), with real signals:
    a Ctrl-C, SIGTERM or SIGHUP is handled once the start is over, as it would have been; one again,
    or one held too long, is handled at once (a start that hangs still stops: a SIGTERM to the
    whole group made Dask's wait for ever); and a start that failed stops as asked, its error
    chained."""
    from worker import interrupts
    from worker.cli import Terminated, _terminate
    from worker.interrupts import stops_held

    def press(signum: int) -> None:
        os.kill(os.getpid(), signum)
        time.sleep(0.2)  # handled here, in the main thread, while it sleeps

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a run in the background ignores SIGINT
    previous_term = signal.signal(signal.SIGTERM, _terminate)  # as the command line runs
    previous_hup = signal.signal(signal.SIGHUP, _terminate)
    try:
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with stops_held():
                press(signal.SIGINT)
                reached.append("the end of the start")
        with pytest.raises(Terminated):
            with stops_held():
                press(signal.SIGTERM)
                reached.append("the end of another")
        with pytest.raises(Terminated) as hung_up:  # a terminal closed: as SIGTERM (worker.cli)
            with stops_held():
                press(signal.SIGHUP)
                reached.append("the end of a third")
        assert hung_up.value.signum == signal.SIGHUP
        with pytest.raises(KeyboardInterrupt):
            with stops_held():
                press(signal.SIGINT)
                press(signal.SIGINT)
                reached.append("not reached")
        with pytest.raises(KeyboardInterrupt) as stopped:
            with stops_held():
                press(signal.SIGINT)
                raise OSError("the cluster did not start")
        monkeypatch.setattr(interrupts, "HELD_AT_MOST_S", 0.5)
        began = time.monotonic()
        with pytest.raises(Terminated):
            with stops_held():
                press(signal.SIGTERM)
                for _ in range(300):  # a start that hangs, waited for as Dask waits: in slices (10 s there)
                    time.sleep(0.1)
                reached.append("not reached either")
        assert time.monotonic() - began < 10
        assert reached == ["the end of the start", "the end of another", "the end of a third"]
        assert isinstance(stopped.value.__context__, OSError)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and signal.getsignal(signal.SIGTERM) is _terminate
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGHUP, previous_hup)


class DaskScheduler:
    """A `dask scheduler` and `workers` `dask worker` processes, as a cluster's users start them
    (this code importable by the workers through PYTHONPATH, unless not `worker_has_code`); all
    killed on leaving."""

    def __init__(self, folder, worker_has_code: bool = True, workers: int = 1):
        import json
        import subprocess
        import sys

        from conftest import REPO

        dask = [os.path.join(os.path.dirname(sys.executable), "dask")]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        where = folder / "scheduler.json"
        where.unlink(missing_ok=True)
        self.processes = [subprocess.Popen(dask + ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                                   "--scheduler-file", where], env=env, stderr=subprocess.DEVNULL)]
        try:
            deadline, self.address = time.monotonic() + 60, None
            while self.address is None and time.monotonic() < deadline:
                try:  # Dask writes the file in place: it may be there and not yet whole
                    self.address = json.loads(where.read_text())["address"]
                except (FileNotFoundError, json.JSONDecodeError, KeyError):
                    time.sleep(0.1)
            assert self.address, "the scheduler did not write its address"
            worker_env = env if worker_has_code else {k: v for k, v in env.items() if k != "PYTHONPATH"}
            self.processes += [subprocess.Popen(dask + ["worker", self.address, "--nthreads", "1", "--no-dashboard"],
                                                env=worker_env, cwd=folder, stderr=subprocess.DEVNULL)
                               for _ in range(workers)]
        except BaseException:
            self.__exit__()
            raise

    def kill_scheduler(self) -> None:
        self.processes[0].kill()

    def __enter__(self) -> "DaskScheduler":
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def test_a_scheduler_lost_mid_run_fails_it_saying_so_and_a_rerun_on_a_new_one_completes(tmp_path, assets):
    """A `dask scheduler` a run used (not a local cluster: its users' own) stopped mid-run:
    the run ended in one line that says so, the committed chunks kept, and ran again on a new
    scheduler it completed. Closing the client that had lost it logged Dask's cancelled
    reconnect as an ERROR with 30 lines of traceback."""
    import json
    import subprocess
    import sys

    def command(address: str) -> list:
        return [sys.executable, "-m", "worker", "index", "--out", tmp_path / "index", "--tile", "64", "--scales", "1",
                "--chunk-tiles", "4", "--cluster", address, "--sketch-modules", "none", assets["osbs_rgb"]]

    with DaskScheduler(tmp_path) as cluster, InATerminal(command(cluster.address)) as run:
        run.until_it_says(r"\b[1-9]\d*/\d+ \[")  # a chunk is in (the bar moved)
        cluster.kill_scheduler()
        assert run.process.wait(timeout=120) == 2
    said = run.said()
    assert said.rstrip().splitlines()[-1].startswith(f"error: lost the Dask scheduler at {cluster.address}"), said
    assert "Traceback" not in said and "ERROR" not in said, said
    kept = len(TileIndex.open(tmp_path / "index"))
    assert kept > 0
    with DaskScheduler(tmp_path) as cluster:
        again = subprocess.run(command(cluster.address) + ["--quiet"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    index = TileIndex.open(tmp_path / "index")
    assert index.info()["complete"] and len(index) == json.loads(again.stdout.strip().splitlines()[-1])["tile_count"] > kept


def test_workers_without_this_code_are_said_so_before_any_chunk_and_kept(tmp_path, assets, model):
    """A `dask worker` started without this code on its PYTHONPATH could not read its first
    chunk: Dask closed it, the user's `dask worker` command exited, and the run said two minutes
    later that the cluster "has had no workers"."""
    with DaskScheduler(tmp_path, worker_has_code=False) as cluster, connect(cluster.address) as client:
        deadline = time.monotonic() + 60
        while not client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        chunks = ClusterChunks(client, OPTIONS, model.fingerprint()["tile_encoder"])
        asked = time.monotonic()
        with pytest.raises(InputError, match=r"1 of the 1 Dask workers .* cannot import this code .*PYTHONPATH"):
            IndexWriter(tmp_path / "index", model, SETTINGS, CHUNK).build([assets["osbs_rgb"]], computer=chunks)
        assert time.monotonic() - asked < 30
        assert cluster.processes[1].poll() is None, "the user's worker still runs"


def test_a_scheduler_that_stops_answering_fails_the_run_saying_so(tmp_path, assets, model, monkeypatch):
    """A scheduler stopped (SIGSTOP: hung, or its machine gone silent) left the run waiting for
    ever, saying nothing, and a service's jobs queued behind it."""
    from worker import distributed

    monkeypatch.setattr(distributed, "SCHEDULER_SILENT_S", 8.0)
    stopped = []
    with DaskScheduler(tmp_path) as cluster:
        with connect(cluster.address) as client:  # closed on the silent scheduler too: Dask's own wait is 40 s
            chunks = ClusterChunks(client, OPTIONS, model.fingerprint()["tile_encoder"])

            def stop_the_scheduler(progress) -> None:
                if progress.tiles_done and not stopped:  # after the first commit: the other chunks wait on it
                    cluster.processes[0].send_signal(signal.SIGSTOP)
                    stopped.append(time.monotonic())

            with pytest.raises(InputError, match="scheduler at .* has not answered for 8 s"):
                IndexWriter(tmp_path / "index", model, SETTINGS, 4).build([assets["osbs_rgb"]], computer=chunks,
                                                                          progress=stop_the_scheduler)
        assert stopped and time.monotonic() - stopped[0] < 8 + 2 * distributed.CLOSE_S + 15, "ended in time"
    assert len(TileIndex.open(tmp_path / "index")) > 0, "committed chunks are kept"


def test_a_client_closed_between_two_reconnect_tries_logs_no_error(tmp_path):
    """How a client that lost its scheduler ends its reconnect depends on when it is closed: the
    try cancelled (an ERROR with a traceback), or, closed between two tries, "Failed to reconnect
    to scheduler after 20.00 seconds", logged as the run said it lost the scheduler (CI met it
    once). Here a try ends (refused, as at a dead port) only once the close has begun, and the
    close waits longer than the pause before the next try: the close always falls between two."""
    import asyncio
    import logging

    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    client_log = logging.getLogger("distributed.client")
    client_log.addHandler(handler)
    try:
        with DaskScheduler(tmp_path) as cluster, connect(cluster.address) as client:
            teardown = client.preloads.teardown

            async def refused_once_closing(timeout=None) -> None:
                while client.status == "connecting":
                    await asyncio.sleep(0.01)
                raise OSError("connection refused")

            async def slower_teardown() -> None:  # the close's first wait, longer than the 0.1 s pause
                await asyncio.sleep(0.5)
                await teardown()

            client._ensure_connected = refused_once_closing
            client.preloads.teardown = slower_teardown
            cluster.kill_scheduler()
            deadline = time.monotonic() + 30
            while client.status != "connecting" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.status == "connecting", "the client tries to reconnect"
    finally:
        client_log.removeHandler(handler)
    assert not errors, [record.getMessage() for record in errors]


def test_a_service_job_on_a_local_cluster_equals_one_process_and_publishes_progress(tmp_path, assets,
                                                                                      single_process):
    """`serve --cluster`: the service's index op computes its chunks on the cluster, publishes
    progress as they commit and writes the index one process writes."""
    from wire import job_states as states
    from wire.protocol import decode_progress
    from wire.sockets import subscribe_progress
    from lab.worker_process import WorkerProcess, wait_job

    rasters = tmp_path / "rasters"
    rasters.mkdir()
    for name in ("rmnp_rgb", "osbs_rgb"):
        shutil.copy(assets[name], rasters / assets[name].name)
    root = tmp_path / "indexes"
    root.mkdir()
    service = WorkerProcess(root, rasters, extra=["--cluster", "local:2"])
    service.cmd.insert(service.cmd.index("serve"), "-v")  # Dask's news in its log: where the chunks ran
    service.start()
    try:
        progress = subscribe_progress(service.pub)
        time.sleep(0.3)  # the subscription reaches the publisher
        with service.client() as client:
            job = client.start_index("both", [str(rasters / assets[n].name) for n in ("rmnp_rgb", "osbs_rgb")],
                                     tile=SETTINGS.tile, scales=list(SETTINGS.scales), chunk_tiles=CHUNK, tokens=True)
            final = wait_job(client, job["id"], timeout=600)
            assert client.ping()["ok"]  # still serving
        events = []
        while progress.poll(100):
            events.append(decode_progress(progress.recv_multipart()))
        progress.close()
    finally:
        service.stop()
    assert final["state"] == states.DONE, final
    assert any(0 < e["progress"] < 1 for e in events) and events[-1]["state"] == states.DONE, events
    assert_same_index(TileIndex.open(root / "both"), single_process)
    log = service.log.read_text()
    assert log.count("distributed.scheduler: Register worker") == 2 and "Traceback" not in log


@pytest.mark.parametrize("where", ["here", "in a drawing pool", "on a cluster"])
def test_a_raster_damaged_midway_leaves_its_chunks_out_and_the_run_indexes_the_rest(tmp_path, assets, model,
                                                                                    cluster, single_process, where):
    """One damaged file of a mosaic failed the whole run at its first bad block, the rasters after
    it not indexed (on a cluster too, where the worker's error had come back as a plain
    Exception). Now the chunks that cannot be read are left out and the run goes on: it ends in
    one error naming the file and GDAL's reason, what could be read committed and searchable. Once
    the file is whole again, the next run computes only the chunks left out, to the index an
    undamaged run makes."""
    damaged, whole = damaged_near_its_end(tmp_path, assets)
    computer = {"here": LocalChunks(model, 0), "in a drawing pool": LocalChunks(model, 2),
                "on a cluster": ClusterChunks(cluster, OPTIONS, model.fingerprint()["tile_encoder"])}[where]
    out = tmp_path / "index"
    with pytest.raises(UnreadRasters, match=r"^1 of the run's 2 rasters could not be read whole: .*damaged.tif: "
                                            r"cannot read window .*\((\d+) of (\d+) chunks left out\)") as failed:
        # batches of 4: the pool has read a failed chunk's later batches ahead, and drops them
        IndexWriter(out, model, SETTINGS, CHUNK).build([damaged, assets["osbs_rgb"]], computer=computer, batch_size=4)
    left_out, chunks = map(int, re.search(r"\((\d+) of (\d+) chunks left out", str(failed.value)).groups())
    assert 0 < left_out < chunks and failed.value.paths == (str(damaged),)
    index = TileIndex.open(out)
    done = {r["path"]: r["complete"] for r in index.info()["rasters"]}
    assert done == {str(damaged): False, str(assets["osbs_rgb"]): True}
    manifest = json.loads((out / "manifest.json").read_text())
    kept = [s for s in manifest["shards"] if s["raster_id"] == 0]
    assert len(kept) == chunks - left_out  # the damaged file's readable chunks, searchable
    tiles_left_out = manifest["rasters"][0]["tiles_total"] - sum(s["count"] + s["skipped"] for s in kept)
    assert (index.records["raster_id"] == 1).sum() == (single_process.records["raster_id"] == 1).sum() > 0

    stat = damaged.stat()
    damaged.write_bytes(whole)  # repaired in place: the same file to the index (size and time)
    os.utime(damaged, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    computed = []
    IndexWriter(out, model, SETTINGS, CHUNK).build([damaged, assets["osbs_rgb"]], progress=computed.append)
    # only the chunks left out were computed again: those read before were done from the start
    assert computed[0].tiles_done == computed[0].tiles_total - tiles_left_out
    IndexWriter(tmp_path / "undamaged", model, SETTINGS, CHUNK).build([damaged, assets["osbs_rgb"]])
    assert_same_index(TileIndex.open(out), TileIndex.open(tmp_path / "undamaged"))


def test_a_raster_changed_after_a_cluster_run_began_leaves_its_chunks_out_and_the_run_goes_on(tmp_path, assets,
                                                                                            model, cluster):
    """A raster written again while a cluster run indexes it (overviews built into it, a new
    export): the run stopped at once, blaming the shared file system, and the rasters after it
    were never indexed; a run without a cluster goes on. Now its chunks still to come are left
    out, as unreadable, and the next raster is indexed whole."""
    import rasterio

    raster = tmp_path / "sheet.tif"
    shutil.copy(assets["rmnp_rgb"], raster)
    with rasterio.open(raster) as src:
        profile, other = src.profile, src.read()[:, ::-1, ::-1]
    chunks = ClusterChunks(cluster, OPTIONS, model.fingerprint()["tile_encoder"])
    replaced = []

    def replace_the_file(progress) -> None:
        if progress.tiles_done and not replaced:  # after the first commit: the other chunks are still to be read
            with rasterio.open(raster, "w", **profile) as dst:
                dst.write(other)
            replaced.append(True)

    with pytest.raises(UnreadRasters, match=r"sheet.tif: changed or gone since the run began .*\(\d+ of \d+ chunks "
                                            r"left out\)"):
        IndexWriter(tmp_path / "index", model, SETTINGS, 4).build([raster, assets["osbs_rgb"]], computer=chunks,
                                                                  progress=replace_the_file)
    assert replaced
    done = {r["path"]: r["complete"] for r in TileIndex.open(tmp_path / "index").info()["rasters"]}
    assert done == {str(raster): False, str(assets["osbs_rgb"]): True}


def test_a_cluster_run_whose_chunks_stall_says_so_once_naming_the_workers(tmp_path, assets, model, cluster,
                                                                          monkeypatch, caplog):
    """A worker hung on a read (a shared disk not answering) or stopped left a cluster run
    waiting for ever, its bar frozen and not a word (probe). No chunk finished for STALLED_S is
    said once, naming the workers that hold chunks; the run goes on when they move. Here no time
    is allowed: the first wait for a chunk stalls (0.3 s was flaky on a warm cluster)."""
    import logging

    import worker.distributed

    monkeypatch.setattr(worker.distributed, "STALLED_S", 0.0)
    chunks = ClusterChunks(cluster, OPTIONS, model.fingerprint()["tile_encoder"])
    with caplog.at_level(logging.WARNING, logger="worker.distributed"):
        IndexWriter(tmp_path / "index", model, SETTINGS, CHUNK).build([assets["rmnp_rgb"]], computer=chunks)
    said = [r.getMessage() for r in caplog.records if "no chunk has finished" in r.getMessage()]
    assert said and re.search(r"chunks held by tcp://[\d.:]+ \(\d+\)", said[0]) and "Ctrl-C stops the run" in said[0]
    assert len(said) <= len(TileIndex.open(tmp_path / "index").manifest["shards"]), "once a stall, not every poll"


def test_the_scheduler_asked_while_a_run_waits_logs_no_bare_connections(tmp_path, assets, model, cluster, monkeypatch):
    """The driver asks the scheduler who it is every ASK_EVERY_S while it waits; each ask opened
    a bare TCP connection first, which the scheduler logged ("Connection from ... closed before
    handshake completed"): a sixth of a user's scheduler log (probe)."""
    import logging

    import worker.distributed

    monkeypatch.setattr(worker.distributed, "ASK_EVERY_S", 0.05)
    lines: list[str] = []
    keep = logging.Handler(logging.INFO)
    keep.emit = lambda record: lines.append(record.getMessage())
    comm = logging.getLogger("distributed.comm.tcp")  # Dask's loggers do not pass records up
    level = comm.level
    comm.addHandler(keep)
    comm.setLevel(logging.INFO)
    try:
        chunks = ClusterChunks(cluster, OPTIONS, model.fingerprint()["tile_encoder"])
        IndexWriter(tmp_path / "index", model, SETTINGS, CHUNK).build([assets["rmnp_rgb"]], computer=chunks)
    finally:
        comm.removeHandler(keep)
        comm.setLevel(level)
    assert not [line for line in lines if "before handshake" in line], lines


def test_the_wait_between_asks_of_the_scheduler_is_not_counted_as_its_silence(tmp_path, assets, model, monkeypatch):
    """The silence was counted from the scheduler's last answer, so the wait before the next ask
    counted as silence: on a busy machine a scheduler that answered every ask within the limit
    failed the run as "has not answered" (CI met it, with the limit of 8 s in the test of a
    stopped scheduler and asks every 5). Here the asks are farther apart than the limit, and
    the run waits on a cluster without workers, as long on any machine, until that is said."""
    import worker.distributed

    monkeypatch.setattr(worker.distributed, "SCHEDULER_SILENT_S", 5.0)
    monkeypatch.setattr(worker.distributed, "ASK_EVERY_S", 6.0)
    monkeypatch.setattr(worker.distributed, "NO_WORKERS_S", 14.0)  # two asks, each past the limit
    with DaskScheduler(tmp_path, workers=0) as cluster, connect(cluster.address) as client:
        chunks = ClusterChunks(client, OPTIONS, model.fingerprint()["tile_encoder"])
        with pytest.raises(InputError, match="has had no workers for 14 s"):
            IndexWriter(tmp_path / "index", model, SETTINGS, CHUNK).build([assets["rmnp_rgb"]], computer=chunks)


def test_a_cluster_worker_that_reads_another_file_than_the_drivers_is_refused(tmp_path, assets):
    """A worker that read another file at a raster's path (its own copy, another version) built
    an index of that file's pixels under the driver's raster, unsaid and for good: the driver's
    file never looks changed. Its report is a refusal where the driver's own file is still the
    one planned, and a chunk left out where that changed too (the test above)."""
    from worker.distributed import NotThePlannedFile, _check_same_file, changed_since_planned, file_fingerprint

    raster, copy = tmp_path / "sheet.tif", tmp_path / "other.tif"
    shutil.copy(assets["rmnp_rgb"], raster)
    shutil.copy(assets["osbs_rgb"], copy)
    planned = file_fingerprint(str(raster))
    with pytest.raises(NotThePlannedFile, match="reads another file there") as seen:
        _check_same_file(str(copy), planned)  # as a worker whose file at that path is another
    reported = NotThePlannedFile(str(raster), str(seen.value))  # of the driver's path, as the worker sends it
    judged = changed_since_planned(reported, planned)
    assert judged is reported and "every worker must read the rasters at the same paths" in str(judged)
    raster.unlink()
    assert isinstance(changed_since_planned(reported, planned), RasterReadError)


@pytest.mark.parametrize("peer", ["silent", "ssh"])
def test_an_address_where_no_dask_scheduler_answers_is_refused_in_time(peer, monkeypatch):
    """A peer that accepts the connection and never answers left the run waiting for ever (a
    service's job running, every later job queued behind it); one that answers in another
    protocol failed with numpy's "Unable to allocate 2.82 EiB"."""
    import socket

    from worker import distributed

    monkeypatch.setattr(distributed, "CONNECT_S", 3.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            if peer == "ssh":
                conn.sendall(b"SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.1\r\n" * 4)

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(InputError, match="cannot reach the Dask scheduler") as err:
            with connect(f"tcp://127.0.0.1:{listener.getsockname()[1]}"):
                pass
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
    assert ("within 3 s" if peer == "silent" else "does not speak") in str(err.value)


@pytest.mark.parametrize("spec", ["", "locl", "localhost", "tcp://[::1]:99999", "inproc://x"])
def test_what_is_no_cluster_is_refused_before_any_work_by_the_command_line_and_the_service(spec, tmp_path, assets):
    """A typo of local went to Dask as an address ("does not speak Dask's protocol" of a place
    nothing listens at), an empty one indexed with no cluster and no word, and a service took
    either and failed each job after its model loaded."""
    from worker.service.config import ServiceConfig

    with pytest.raises(InputError, match="is not a cluster: give local, local:N"):
        Cluster(spec, OPTIONS)
    with pytest.raises(InputError, match="is not a cluster"):
        ServiceConfig.create(index_roots=[tmp_path], cluster=spec)
    if spec == "":
        import subprocess
        import sys

        done = subprocess.run([sys.executable, "-m", "worker", "index", "--out", tmp_path / "index", "--cluster", "",
                               "--quiet", "--sketch-modules", "none", assets["osbs_rgb"]], capture_output=True, text=True)
        assert done.returncode == 2 and "is not a cluster" in done.stderr, done.stderr


def test_more_local_workers_than_cores_is_refused_before_any_worker_starts(tmp_path):
    """`local:1000` on 2 cores was taken: a thousand processes, each loading the model, ran the
    machine out of memory. It is refused, by the command line's check and the service's."""
    from worker.distributed import local_workers, most_local_workers
    from worker.service.config import ServiceConfig

    assert local_workers(f"local:{most_local_workers()}") == most_local_workers()
    too_many = f"local:{most_local_workers() + 1}"
    with pytest.raises(InputError, match=f"{too_many}: at most local:{most_local_workers()} here"):
        Cluster(too_many, OPTIONS)
    with pytest.raises(InputError, match="at most local:"):
        ServiceConfig.create(index_roots=[tmp_path], cluster="local:1000")


@pytest.mark.parametrize("spec, said", [("local:abc", "takes N, a number of workers"), ("local:1_0", "takes N"),
                                        ("local: 1", "takes N"), ("local:+1", "takes N"), ("local:0", "at least 1")])
def test_a_local_clusters_worker_count_is_digits_and_local_any_case(spec, said):
    """local:1_0 started 10 workers (int() reads it so), local:abc was "at least 1", and Local:1
    went to Dask as a host named Local ("Name or service not known")."""
    from worker.distributed import local_workers

    with pytest.raises(InputError, match=said):
        local_workers(spec)
    assert local_workers("Local:1") == 1 and local_workers("LOCAL") is None


@pytest.mark.parametrize("spec", ["localhost:8786", "tcp://sched-1.example.org:8786", "tls://10.0.0.7:8786",
                                  "tcp://[::1]:8786", "tcp://[fe80::1%eth0]:8786", "ws://h:8786", "ucx://10.0.0.7:13337",
                                  "ucxx://10.0.0.7:13337"])
def test_every_kind_of_scheduler_address_dask_takes_is_taken(spec):
    """Addresses are checked by their form, and every form Dask connects to passes: the check
    first written refused websocket (ws://, wss://) and UCX schedulers and IPv6 zones."""
    from worker.distributed import local_workers

    assert local_workers(spec) == 0 and Cluster(spec, OPTIONS).address == spec


def test_an_address_nothing_listens_at_is_refused_at_once_saying_why():
    """Dask's own connecting retries a refused connection until its timeout: a typo in the port
    waited 24 s, then said that nothing answered as a Dask scheduler."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(InputError, match="cannot reach the Dask scheduler") as err:
        with connect(f"tcp://127.0.0.1:{port}"):
            pass
    assert "refused" in str(err.value)
    assert "run the worker's `index` or `serve` command with --cluster local" in str(err.value)  # a plugin's user
    # has no such flag


def test_a_ucx_scheduler_this_machine_cannot_reach_is_said_to_be_ucxs_failing():
    """UCX has no TCP peer to ask first: its failure here (distributed-ucxx not installed) was
    told as "what answers there does not speak Dask's protocol"."""
    with pytest.raises(InputError, match=r"cannot reach the Dask scheduler at ucx://127.0.0.1:13337 \(UCX: "):
        with connect("ucx://127.0.0.1:13337"):
            pass


def left_without_workers(client) -> None:
    """The client's cluster with its workers closed, once its scheduler says so (30 s at most)."""
    client.retire_workers(close_workers=True)
    deadline = time.monotonic() + 30
    while client.scheduler_info()["workers"] and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_cluster_without_workers_fails_the_run_instead_of_waiting_for_ever(tmp_path, assets, model, monkeypatch):
    """Its chunks waited for a worker for ever, the job running and the service's jobs queued."""
    from worker import distributed

    monkeypatch.setattr(distributed, "NO_WORKERS_S", 2.0)
    with connect("local:1") as client:
        left_without_workers(client)
        chunks = ClusterChunks(client, OPTIONS, model.fingerprint()["tile_encoder"])
        with pytest.raises(InputError, match="no workers"):
            IndexWriter(tmp_path / "index", model, SETTINGS, CHUNK).build([assets["osbs_rgb"]], computer=chunks)


def test_a_chunk_whose_result_is_lost_with_every_worker_says_so_not_that_the_scheduler_is_silent(model, monkeypatch):
    """A chunk that finished on a worker killed before the driver fetched its arrays is computed
    again, by no one on a cluster left without workers: the fetch's one wait of
    SCHEDULER_SILENT_S then said that the scheduler, which answered, had not (the cluster
    probe's finding, every worker killed mid-run). The fetch waits as the chunks do: a cluster
    without workers is said as such, and a stop is seen."""
    from types import SimpleNamespace

    from worker import distributed

    monkeypatch.setattr(distributed, "SCHEDULER_SILENT_S", 3.0)
    monkeypatch.setattr(distributed, "NO_WORKERS_S", 6.0)
    with connect("local:1") as client:
        left_without_workers(client)
        chunks = ClusterChunks(client, OPTIONS, model.fingerprint()["tile_encoder"])
        never = client.submit(sum, [1, 2], pure=False)  # no worker runs it
        job = SimpleNamespace(raster={"path": "sheet.tif"}, chunk=3)
        with pytest.raises(InputError, match="has had no workers for 6 s"):
            chunks._result(never, job, lambda: False)
        stopped = time.monotonic() + 0.5
        assert chunks._result(never, job, lambda: time.monotonic() > stopped) is None
    with connect("local:1") as client:  # a chunk failed by its own TimeoutError (a read timing out) was waited on
        chunks = ClusterChunks(client, OPTIONS, model.fingerprint()["tile_encoder"])
        timed_out = client.submit(_times_out, pure=False)
        with pytest.raises(InputError, match=r"a cluster worker failed computing sheet.tif \(chunk 3\): 'a share "
                                             r"did not answer'"):
            chunks._result(timed_out, job, lambda: False)


def _times_out() -> None:
    raise TimeoutError("a share did not answer")


def test_a_cancel_is_seen_while_the_cluster_computes(tmp_path, assets, model, cluster):
    """A job cancelled on a cluster stops within a moment, not when its computing chunks end
    (one chunk of a large raster takes minutes), and commits none of them. Last in this module:
    the cluster's worker computes the cancelled chunk to its end."""
    out = tmp_path / "index"
    chunks = ClusterChunks(cluster, OPTIONS, model.fingerprint()["tile_encoder"])
    cancelled_at = time.monotonic() + 1.0
    manifest = IndexWriter(out, model, SETTINGS, 100_000, tokens=True).build(  # the scene's ~500 tiles in one chunk
        [assets["s2_rgb"]], should_stop=lambda: time.monotonic() > cancelled_at, computer=chunks)
    stopped_after = time.monotonic() - cancelled_at
    assert manifest["tile_count"] == 0 and not manifest["rasters"][0]["complete"]
    assert stopped_after < 5, f"the cancel was seen {stopped_after:.1f} s late"  # the chunk itself takes about a minute
