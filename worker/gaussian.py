"""Sampled Gaussian filters of image batches, as scipy.ndimage computes them, in torch.

They run on the device of the tensors given, a whole batch at once: the line drawing's
smoothing and gradients (worker.line_drawing) and the smoothing of every compared drawing
(worker.edge_cells.compared_drawings) are then device work while indexing on a GPU, instead
of CPU work in the process that feeds it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

TRUNCATE = 4.0  # Gaussian kernels reach this many sigmas (scipy's default)


@lru_cache(maxsize=32)
def filter_matrix(n: int, sigma: float, order: int, padding: str, device: str) -> torch.Tensor:
    """(n, n) matrix M with x @ M = x correlated along its last axis with a sampled Gaussian
    (order 0) or its derivative (order 1), as scipy.ndimage samples them; past the border: zeros
    ("constant") or the line mirrored about its edge ("symmetric", scipy's "reflect"). A matrix
    product, because torch's CPU convolution is slow for one channel and a long kernel (13 ms a
    pass over 12 tiles, against 2 ms)."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 * (x / sigma) ** 2)
    phi /= phi.sum()
    kernel = phi if order == 0 else x / sigma ** 2 * phi  # correlation weights of d/dx
    matrix = np.zeros((n, n))
    out = np.arange(n)
    for offset, weight in zip(x, kernel):
        source = out + offset
        if padding == "symmetric":  # mirrored as often as the kernel reaches past the line
            source = np.mod(source, 2 * n)
            source = np.where(source >= n, 2 * n - 1 - source, source)
        inside = (source >= 0) & (source < n)
        np.add.at(matrix, (source[inside], out[inside]), weight)
    return torch.from_numpy(matrix.astype(np.float32)).to(device)


def filtered(images: torch.Tensor, sigma: float, orders: tuple[int, int] = (0, 0),
             padding: str = "symmetric") -> torch.Tensor:
    """(B, H, W) float images filtered along rows then columns by the Gaussian orders given (0
    smooths, 1 differentiates)."""
    h, w = images.shape[-2:]
    down = filter_matrix(h, sigma, orders[0], padding, str(images.device))
    across = filter_matrix(w, sigma, orders[1], padding, str(images.device))
    return down.T @ images @ across
