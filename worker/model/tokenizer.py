"""Multi-level tokenization of sketches (Yang et al. 2024, section 3.2).

A sketch is a few thin lines: a 14 px patch embedding sees a line at one scale only. A small
conv pyramid reads the sketch at strides 2, 4 and 8, each level is pooled onto the patch grid,
and the fused features are added to the backbone's patch tokens. The fusion is gated by a
zero-initialised vector so an untrained tokenizer is exactly the backbone's patch embedding
(the zero-shot default); trained weights (scripts/train) open the gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.GELU())


class MultiLevelTokenizer(nn.Module):
    """Residual multi-level features for the patch grid: (B, 3, H, W) -> (B, grid*grid, dim)."""

    def __init__(self, dim: int, grid: int, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        self.grid = grid
        self.stages = nn.ModuleList([_stage(3, widths[0]), _stage(widths[0], widths[1]),
                                     _stage(widths[1], widths[2])])
        self.fuse = nn.Linear(sum(widths), dim)
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        levels, x = [], image
        for stage in self.stages:
            x = stage(x)
            levels.append(F.adaptive_avg_pool2d(x, self.grid))
        fused = torch.cat(levels, 1).flatten(2).transpose(1, 2)  # B, grid*grid, sum(widths)
        return self.gate * self.fuse(fused)
