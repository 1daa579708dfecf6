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

    def _is_identity(self) -> bool:
        eye = torch.eye(self.query.weight.shape[0], device=self.query.weight.device)
        return all(torch.equal(l.weight, eye) and not l.bias.any() for l in (self.query, self.key))

    def _project(self, tokens: torch.Tensor, layer: nn.Linear, identity: bool) -> torch.Tensor:
        return F.normalize(tokens if identity else layer(tokens), dim=-1)

    @staticmethod
    def _token_scores(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, originals: torch.Tensor,
                      temperature: torch.Tensor, k_mask: torch.Tensor | None) -> torch.Tensor:
        """Cosine between each original token and its attention-weighted reading of `values`."""
        logits = q @ k.transpose(-2, -1) / temperature
        if k_mask is not None:
            logits = logits.masked_fill(~k_mask[:, None, :], float("-inf"))
        updated = torch.softmax(logits, -1) @ values
        return F.cosine_similarity(originals, updated, dim=-1)

    def forward(self, sketch: torch.Tensor, tiles: torch.Tensor,
                tile_mask: torch.Tensor | None = None) -> torch.Tensor:
        """sketch (M, D) or (B, M, D), tiles (B, N, D), tile_mask (B, N) of real tokens -> (B,)."""
        if sketch.dim() == 2:
            sketch = sketch[None]
        if tile_mask is None:
            tile_mask = torch.ones(tiles.shape[:2], dtype=torch.bool, device=tiles.device)
        identity = not self.training and self._is_identity()
        s, t = F.normalize(sketch, dim=-1), F.normalize(tiles, dim=-1)
        s_q, s_k = self._project(sketch, self.query, identity), self._project(sketch, self.key, identity)
        t_q, t_k = self._project(tiles, self.query, identity), self._project(tiles, self.key, identity)
        temperature = self.log_temperature.exp()
        s2t = self._token_scores(s_q, t_k, t, s, temperature, tile_mask).mean(-1)
        t2s = self._token_scores(t_q, s_k, s, t, temperature, None)
        t2s = (t2s * tile_mask).sum(-1) / tile_mask.sum(-1).clamp(min=1)
        return 0.5 * (s2t + t2s)
