"""A residual MLP on the sketch side's output tokens, zero-initialised (identity untrained).

Learning only on the sketch side keeps every built index valid when the sketch modules are
retrained: tile tokens never change.
"""

from __future__ import annotations

import torch
from torch import nn


class SketchAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int = 768):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(tokens))))
