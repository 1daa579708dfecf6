"""Cross-attention update between sketch tokens and tile tokens, giving a pair score.

Each sketch token attends over the tile's tokens (and each tile token over the sketch's);
the score is how well each token is reconstructed by what it attends to, averaged over both
directions. With identity projections (the untrained default) this is parameter-free scaled
dot-product attention over L2-normalised tokens, a soft version of token max-similarity.
Trained projections and temperature come from a checkpoint (scripts/train.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttentionScorer(nn.Module):
    def __init__(self, dim: int, temperature: float = 0.07):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        with torch.no_grad():
            for layer in (self.query, self.key):
                layer.weight.copy_(torch.eye(layer.weight.shape[0]))
                layer.bias.zero_()

    def _token_scores(self, a: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor | None) -> torch.Tensor:
        """Cosine between each token of `a` and its attention-weighted reading of `b`: (B, len(a))."""
        q = F.normalize(self.query(a), dim=-1)
        k = F.normalize(self.key(b), dim=-1)
        logits = q @ k.transpose(-2, -1) / self.log_temperature.exp()
        if b_mask is not None:
            logits = logits.masked_fill(~b_mask[:, None, :], float("-inf"))
        updated = torch.softmax(logits, -1) @ F.normalize(b, dim=-1)
        return F.cosine_similarity(F.normalize(a, dim=-1), updated, dim=-1)

    def forward(self, sketch: torch.Tensor, tiles: torch.Tensor,
                tile_mask: torch.Tensor | None = None) -> torch.Tensor:
        """sketch (M, D) or (B, M, D), tiles (B, N, D), tile_mask (B, N) of real tokens -> (B,)."""
        if sketch.dim() == 2:
            sketch = sketch.expand(tiles.shape[0], -1, -1)
        if tile_mask is None:
            tile_mask = torch.ones(tiles.shape[:2], dtype=torch.bool, device=tiles.device)
        s2t = self._token_scores(sketch, tiles, tile_mask).mean(-1)
        t2s = self._token_scores(tiles, sketch, None)
        t2s = (t2s * tile_mask).sum(-1) / tile_mask.sum(-1).clamp(min=1)
        return 0.5 * (s2t + t2s)
