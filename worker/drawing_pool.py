"""Reading and drawing tiles in worker processes, so the model's device never waits for the CPU.

Indexing does two kinds of work per tile: reading and stretching its window and drawing it as a
line drawing (Canny, skeleton: CPU; here 1.2 and 5.5 ms a tile in one thread) and encoding the
drawing (ViT tokens and edge cells: the model's device). On a GPU the first caps the second
(13.4 s for 529 tiles on an H100 with everything in one process). A DrawingPool runs the CPU
part for the next batches in other processes while this one encodes: batches are submitted
ahead, at most `ahead` at once, and handed back in order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from worker import line_drawing
from worker.tiling import RasterInfo, Tile, iter_tile_pixels


@dataclass
class DrawnBatch:
    tiles: list[Tile]  # the batch's tiles with enough valid area, in plan order
    valid_share: list[float]
    images: np.ndarray  # (B, S, S, 3) uint8
    drawings: np.ndarray  # (B, S, S, 3) uint8 line drawings


def read_and_draw(raster: dict, tiles: list[Tile], size: int, min_valid: float) -> DrawnBatch:
    """Read tiles, leave out those with less valid area than `min_valid`, draw the others."""
    kept, shares, images, masks = [], [], [], []
    for tile, image, valid in iter_tile_pixels(RasterInfo.from_json(raster), tiles, size):
        share = float(valid.mean())
        if share >= min_valid:
            kept.append(tile)
            shares.append(share)
            images.append(image)
            masks.append(valid)
    if not kept:
        empty = np.zeros((0, size, size, 3), np.uint8)
        return DrawnBatch([], [], empty, empty)
    images_a = np.stack(images)
    return DrawnBatch(kept, shares, images_a, line_drawing.tile_line_drawings(images_a, np.stack(masks)))


def drawn_batches(raster: dict, tiles: list[Tile], size: int, batch_size: int, min_valid: float,
                  pool: "DrawingPool | None" = None) -> Iterator[tuple[int, DrawnBatch]]:
    """(tiles of the plan read so far, the drawn batch) for each batch of `tiles`, in order: read
    and drawn in `pool`'s processes, or here, one batch at a time, without one."""
    if pool is not None:
        yield from pool.batches(raster, tiles, size, batch_size, min_valid)
        return
    for start in range(0, len(tiles), batch_size):
        yield min(start + batch_size, len(tiles)), read_and_draw(raster, tiles[start:start + batch_size], size,
                                                                 min_valid)


def default_processes(device_type: str) -> int:
    """Drawing processes by default: on a GPU every core but one draws; on a CPU none (the model
    already uses every core, and a pool would only add copying)."""
    return max(1, (os.cpu_count() or 2) - 1) if device_type == "cuda" else 0


def _one_thread() -> None:
    """A drawing process draws with one torch thread: the pool's processes are the parallelism."""
    import torch

    torch.set_num_threads(1)


class DrawingPool:
    """`processes` worker processes (spawned: no copy of a CUDA context or open rasters)."""

    def __init__(self, processes: int, ahead: int | None = None):
        self.executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_one_thread)
        self.ahead = ahead or 2 * processes

    def batches(self, raster: dict, tiles: list[Tile], size: int, batch_size: int,
                min_valid: float) -> Iterator[tuple[int, DrawnBatch]]:
        """(tiles of the plan read so far, the drawn batch) for each batch of `tiles`, in order."""
        starts = list(range(0, len(tiles), batch_size))
        queue: deque[tuple[int, Future]] = deque()
        for start in starts:
            queue.append((start, self.executor.submit(read_and_draw, raster, tiles[start:start + batch_size], size,
                                                      min_valid)))
            if len(queue) >= self.ahead:
                start_done, future = queue.popleft()
                yield min(start_done + batch_size, len(tiles)), future.result()
        while queue:
            start_done, future = queue.popleft()
            yield min(start_done + batch_size, len(tiles)), future.result()

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)
