"""Reading, drawing and describing tiles: on a GPU, or in worker processes beside a busy CPU.

Indexing does two kinds of work per tile: reading and stretching its window, drawing it as a
line drawing (Canny, skeleton) and its edge cells (worker.tile_features), about 12 ms a tile in
one thread on this project's CPU at batches of 16 (read 1.5, draw 8.9, cells 1.8); and, only in
an index with tokens, the ViT tokens of the drawing. Drawn on the CPU, the first capped a GPU's
second (13.4 s for 529 tiles on an H100 with everything in one process; 196 tiles/s on an H200
with the drawing in 15 processes, against 2,400 for its backbone alone).

So on a GPU (DeviceDrawing), each batch is read in threads while the ones before it are drawn
and encoded, and drawn and described on the GPU: the filters, the inking, the smoothing and the
cells run there a batch at once; the hysteresis and the thinning, which follow connected pixels,
stay on the CPU in threads (worker.line_drawing).
On a CPU of many cores, a DrawingPool runs whole batches in other processes while this one
encodes: batches are submitted ahead, at most `ahead` at once, across the ends of chunks (a
chunk's last batches would otherwise leave most processes idle: a 189-tile raster is 3 batches
of 64), and handed back in order. Only what the index stores travels back (the cells: 7 KB a
tile), and the pixels the ViT reads when tokens are asked for.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import rasterio.errors
import torch

from worker import edge_cells, line_drawing
from worker.interrupts import children_deaf_to_the_terminal, deaf_to_the_terminal
from worker.raster_handles import ThreadHandles
from worker.thread_pools import shared_pool, usable_cores, wait_all
from worker.tile_features import cells_on_grid
from worker.tiling import RasterInfo, Tile, read_tile, unopenable

T = TypeVar("T")


@dataclass
class DrawnBatch:
    tiles: list[Tile]  # the batch's tiles with enough valid area, in plan order
    valid_share: list[float]
    cells: np.ndarray  # (B, G, G, ORIENTATIONS) uint8 edge cells (worker.tile_features.cells_on_grid)
    cell_origins: np.ndarray  # (B, 4) int32
    # (B, S, S, 3) uint8 what the ViT encodes, when tokens are asked for: on the GPU that drew it, or an array
    pixels: np.ndarray | torch.Tensor | None


@dataclass(frozen=True)
class DrawingJob:
    """How to read and draw the tiles of one raster (the tiles travel apart, a batch at a time)."""

    raster: dict  # RasterInfo's JSON
    size: int  # drawing side, px (the model's input)
    tile_size: int  # the tile plan's tile side at scale 1 (where the level's cell grid runs)
    min_valid: float
    pixels: str | None = None  # "edges": the line drawings, "rgb": the images, None: neither (no tokens)


def run_handles() -> ThreadHandles:
    """An index run's raster handles: one a reading thread, the raster it reads now (a run reads
    one raster after another; kept open, the finished ones could not be replaced until its end)."""
    return ThreadHandles(per_thread=1)


def read_tiles(job: DrawingJob, tiles: Sequence[Tile],
               handles: ThreadHandles) -> list[tuple[Tile, np.ndarray, np.ndarray]]:
    """(tile, image, valid) for each of `tiles`, read through this thread's handle of `handles`,
    which stays open between batches: the raster was opened again for every batch of 16, and
    GDAL takes 2 s to open a VRT of 50,000 sheets. After a failed read the handle is closed, as
    verification's is (ThreadHandles.forget)."""
    raster = RasterInfo.from_json(job.raster)
    try:
        src = handles.get(raster.path)
    except (rasterio.errors.RasterioError, OSError) as exc:
        raise unopenable(raster.path, exc) from exc
    try:
        return [(tile, *read_tile(src, raster, tile, job.size)) for tile in tiles]
    except BaseException:
        handles.forget(raster.path)
        raise


def read_and_draw(job: DrawingJob, tiles: Sequence[Tile], handles: ThreadHandles) -> DrawnBatch:
    """Read `tiles` of `job`'s raster, leave out those with less valid area than its `min_valid`,
    draw the others and describe them by their edge cells, all on the CPU (a drawing process,
    or this one)."""
    return draw_read(job, read_tiles(job, tiles, handles))


_process_handles: ThreadHandles | None = None  # a drawing process's raster it reads: closed as it ends with its run


def _read_and_draw_here(job: DrawingJob, tiles: Sequence[Tile]) -> DrawnBatch:
    """read_and_draw in a DrawingPool's process, through the raster it read last, kept open."""
    global _process_handles
    if _process_handles is None:
        _process_handles = run_handles()
    return read_and_draw(job, tiles, _process_handles)


def draw_read(job: DrawingJob, read: Iterable[tuple[Tile, np.ndarray, np.ndarray]],
              device: torch.device | None = None) -> DrawnBatch:
    """The tiles `read` (tile, image, valid) of `job` with enough valid area, drawn and described
    on `device` (None: on the CPU, into arrays)."""
    kept, shares, images, masks = [], [], [], []
    for tile, image, valid in read:
        share = float(valid.mean())
        if share >= job.min_valid:
            kept.append(tile)
            shares.append(share)
            images.append(image)
            masks.append(valid)
    if not kept:
        g = job.size // edge_cells.CELL
        no_cells = np.zeros((0, g, g, edge_cells.ORIENTATIONS), np.uint8)
        return DrawnBatch([], [], no_cells, np.zeros((0, 4), np.int32), None)
    images_a, masks_a = np.stack(images), np.stack(masks)
    if device is not None:
        images_a, masks_a = torch.from_numpy(images_a).to(device), torch.from_numpy(masks_a).to(device)
    drawings = line_drawing.tile_line_drawings(images_a, masks_a)
    cells, origins = cells_on_grid(drawings[..., 0], kept, job.tile_size)
    pixels = {"edges": drawings, "rgb": images_a, None: None}[job.pixels]
    return DrawnBatch(kept, shares, cells, origins, pixels)


READ_THREADS = min(16, usable_cores())  # GDAL releases the GIL while it reads and decodes


def read_in_threads(job: DrawingJob, tiles: Sequence[Tile],
                    handles: ThreadHandles) -> tuple[DrawingJob, list[tuple[Tile, np.ndarray, np.ndarray]]]:
    """`job` and (tile, image, valid) for each of `tiles`, in order, read in up to READ_THREADS
    threads, each reading a run of neighbouring tiles (which share the raster's blocks) through
    its own handle of `handles`. Returns, or raises the first error, once no thread reads."""
    pool = shared_pool("tile-read", READ_THREADS)
    futures = [pool.submit(read_tiles, job, tiles[p[0]:p[-1] + 1], handles)
               for p in np.array_split(np.arange(len(tiles)), min(READ_THREADS, len(tiles))) if len(p)]
    wait_all(futures)  # a failed part must not close the handles under the others
    handles.close_others(job.raster["path"])  # no thread reads: one raster open, the one read
    return job, [one for future in futures for one in future.result()]


def drawn_batches(job: DrawingJob, tiles: Sequence[Tile], batch_size: int, device: torch.device | None = None,
                  handles: ThreadHandles | None = None) -> Iterator[tuple[int, DrawnBatch]]:
    """(tiles read so far, the drawn batch) for each batch of `tiles`, in order, read and drawn
    here one batch at a time: on the CPU (read_and_draw), or read in threads and drawn on
    `device` (a GPU's; DeviceDrawing also reads ahead). A DrawingPool draws in other processes.
    Read through `handles` (a run's, kept open from chunk to chunk), else through handles of
    its own, closed at the end."""
    own = handles is None
    handles = run_handles() if own else handles
    try:
        for start in range(0, len(tiles), batch_size):
            part = tiles[start:start + batch_size]
            drawn = read_and_draw(job, part, handles) if device is None else \
                draw_read(*read_in_threads(job, part, handles), device)
            yield start + len(part), drawn
    finally:
        if own:
            handles.close()


POOL_FROM_CORES = 8  # a CPU index without tokens is drawn in a pool on this many cores or more
POOL_FROM_TILES = 2_000  # fewer tiles to compute are drawn here: the pool's start-up would cost more
MAX_PROCESSES = 15  # the most measured; each holds a few hundred MB


def default_processes(tokens: bool, tiles: int) -> int:
    """Drawing processes by default for `tiles` tiles drawn on the CPU (a GPU draws its own:
    DeviceDrawing): on POOL_FROM_CORES cores or more, every core but one when the index stores
    no ViT tokens (all its work is drawing); none for fewer than POOL_FROM_TILES tiles, nor
    otherwise.

    Measured (lab.gpu_speed on H200 machines, the tiles drawn on the CPU): 16 cores indexed 55.6
    tiles/s in one process and 195.8 in a pool of 15 on one machine (about 350 once started and
    the files opened), 108.2 in one process on another; 2 cores 78.9 in one process, 55.3 in a
    pool of 2 (567 tiles). Core counts between were not measured, hence the threshold half-way.
    The pool of 15 took 14 s to start there, 800 to 1,500 tiles of one process's work. Each
    process holds its own torch and rasterio (340 MB of its own after a batch on this CPU), hence
    at most MAX_PROCESSES. On a CPU an index with tokens is mostly the ViT, which already uses
    every core. A GPU's own drawing leaves the CPU the reads, the hysteresis and the thinning,
    about 3 of the 16 ms a tile took in one thread there, in threads; it has not yet run on a
    GPU (docs/benchmarks/speed.md)."""
    if tiles < POOL_FROM_TILES:
        return 0
    cores = usable_cores()
    return min(MAX_PROCESSES, cores - 1) if not tokens and cores >= POOL_FROM_CORES else 0


def _drawing_process() -> None:
    """A drawing process draws with one torch thread: the pool's processes are the parallelism.
    It ignores Ctrl-C and a closed terminal (sent to the whole process group), as cluster
    workers do, and held them while it booted (DrawingPool.submit): the run's own process stops
    and closes the pool in order. Killed by them, the pool broke the run (BrokenProcessPool),
    and a service's job ended failed and was dropped instead of being left to resume."""
    import torch

    deaf_to_the_terminal()
    torch.set_num_threads(1)


def batches_ahead(executor: Executor | DrawingPool, task: Callable[[DrawingJob, Sequence[Tile]], T],
                  work: Iterable[tuple[DrawingJob, Sequence[Tile]]], batch_size: int,
                  ahead: int) -> Iterator[Iterator[tuple[int, T]]]:
    """For each job of `work`, taken as needed, an iterator of (tiles done, `task`'s result) for
    each of its batches, the tasks run by `executor` at most `ahead` at once, across the ends of
    jobs, and handed back in order. Later jobs' batches are submitted while earlier ones are
    handed back, so each job's batches must be taken to the end before the next job's: a job's
    iterator used while an earlier one's batches wait raises, rather than hand back nothing.
    A batch that raised ends its job: its iterator raises that error, and the job's other
    batches are dropped (a raster's damaged block fails its chunk, not the chunks after it)."""
    tasks = ((j, tiles, job, start) for j, (job, tiles) in enumerate(work)
             for start in range(0, len(tiles), batch_size))
    queue: deque[tuple[int, int, Future]] = deque()  # job number, tiles done with this batch, result
    failed: set[int] = set()  # jobs a batch of which raised

    def fill() -> None:
        while len(queue) < ahead:
            next_task = next(tasks, None)
            if next_task is None:
                return
            j, tiles, job, start = next_task
            if j not in failed:
                part = tiles[start:start + batch_size]
                queue.append((j, start + len(part), executor.submit(task, job, part)))

    def drop(j: int) -> None:
        failed.add(j)
        for entry in [entry for entry in queue if entry[0] == j]:
            entry[2].cancel()
            queue.remove(entry)

    def batches_of(j: int) -> Iterator[tuple[int, T]]:
        while True:
            fill()
            if queue and queue[0][0] < j:
                raise RuntimeError(f"chunk {queue[0][0]}'s batches were not all taken before chunk {j}'s")
            if not queue or queue[0][0] != j:
                return
            _, done, future = queue.popleft()
            try:
                result = future.result()
            except BaseException:
                drop(j)
                raise
            yield done, result

    for j in itertools.count():
        yield batches_of(j)


class DrawingPool:
    """`processes` worker processes (spawned: no copy of a CUDA context or open rasters) that read,
    draw and describe whole batches, `ahead` batches at once."""

    def __init__(self, processes: int, ahead: int | None = None):
        self.executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_drawing_process)
        self.ahead = ahead or 2 * processes

    def submit(self, task: Callable[..., T], *args) -> Future[T]:
        """`task` run by one of the pool's processes. The pool spawns them as work arrives, in
        the submitting thread, and each takes seconds to boot (15 took 14 s on an H200 machine):
        they are spawned deaf to the terminal, or a Ctrl-C meanwhile killed them half booted."""
        with children_deaf_to_the_terminal():
            return self.executor.submit(task, *args)

    def each_job(self, work: Iterable[tuple[DrawingJob, Sequence[Tile]]],
                 batch_size: int) -> Iterator[Iterator[tuple[int, DrawnBatch]]]:
        """For each job of `work`, an iterator of its batches as drawn_batches gives them
        (batches_ahead: each job's must be taken to the end before the next job's)."""
        return batches_ahead(self, _read_and_draw_here, work, batch_size, self.ahead)

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)


class DeviceDrawing:
    """Tiles drawn and described on `device` in this process, each batch read in threads while
    the one before it is drawn and encoded, across the ends of chunks too (a chunk is 256 tiles:
    16 batches at the default batch size, 4 at 64). Its raster handles are closed with it."""

    READ_AHEAD = 3  # batches in flight: the one handed back, and the next two, read one at a time

    def __init__(self, device: torch.device):
        self.device = device
        self.handles = run_handles()
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="tile-read-ahead")

    def each_job(self, work: Iterable[tuple[DrawingJob, Sequence[Tile]]],
                 batch_size: int) -> Iterator[Iterator[tuple[int, DrawnBatch]]]:
        """As DrawingPool.each_job, the batches drawn here on the device."""
        read = functools.partial(read_in_threads, handles=self.handles)
        for batches in batches_ahead(self.reader, read, work, batch_size, self.READ_AHEAD):
            yield ((done, draw_read(*one, self.device)) for done, one in batches)

    def close(self) -> None:
        self.reader.shutdown(cancel_futures=True)  # waits for the batch being read
        self.handles.close()
