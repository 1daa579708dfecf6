"""Training the sketch-side modules on pseudo-sketch pairs cut from real rasters.

The backbone is frozen. Tile tokens are what the index stores (the tile encoder never changes,
so built indexes stay valid); sketch-side backbone outputs are cached once per augmented
pseudo-sketch. The sketch adapter and the cross-attention scorer are then trained on the
cache with the paper's triplet objective, each sketch against its own place (positive) and the
hardest other places of the same scene in the batch (negatives). Half of each batch are places
whose edge layouts resemble an anchor place's: the re-rank only ever sees the layout shortlist,
so those are the negatives it has to tell apart. The multi-level tokenizer
sits before the backbone and would need a backbone backward pass per step; it is not trained
here (its gate stays zero, so it remains the exact patch embedding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from worker.model.retrieval_model import RetrievalModel
from worker.pseudo_sketch import augment, pseudo_sketch
from worker.sketch import prepare_sketch
from worker.tiling import Tile, TileReader, open_raster

log = logging.getLogger(__name__)
STYLES = ("canny", "simple", "wobbly")


@dataclass
class PairCache:
    """Per sample: the sketch's pre-adapter tokens (S, 1 + M, D), their positions (S, M) and its
    place's id; per place: the tile's global (P, D), filtered tokens (P, K, D), positions (P, K) and
    coarse edge layout (P, L)."""

    sketch_tokens: torch.Tensor
    sketch_positions: torch.Tensor
    place: torch.Tensor
    tile_global: torch.Tensor
    tile_tokens: torch.Tensor
    tile_positions: torch.Tensor
    tile_layout: torch.Tensor


def random_windows(raster: Path, count: int, rng: np.random.Generator, sizes=(96, 128, 192, 256)) -> list[Tile]:
    info = open_raster(raster, None)
    tiles = []
    for _ in range(count):
        size = int(min(rng.choice(sizes), info.width, info.height))
        col = int(rng.integers(0, info.width - size + 1))
        row = int(rng.integers(0, info.height - size + 1))
        tiles.append(Tile(info, col, row, size, size, 1))
    return tiles


@torch.inference_mode()
def sketch_backbone_tokens(model: RetrievalModel, sketches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen part of the sketch path (patch embedding + filtered ViT output, before the adapter)."""
    tokens, positions = model.sketch_backbone(model.normalise(sketches))
    return tokens.cpu(), positions.cpu()


def build_cache(model: RetrievalModel, rasters: list[Path], windows_per_raster: int, sketches_per_window: int,
                hand_strokes: list[np.ndarray], seed: int, batch: int = 16) -> PairCache:
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for raster in rasters:
        tiles = random_windows(raster, windows_per_raster, rng)
        with TileReader(tiles[0].raster, model.img_size) as reader:
            for tile in tiles:
                image, valid = reader.read(tile)
                if valid.mean() >= 0.9:
                    images.append(image)
                    masks.append(valid)
    images, masks = np.stack(images), np.stack(masks)
    globals_, tokens, positions, layouts = [], [], [], []
    for i in tqdm(range(0, len(images), batch), desc="tile tokens", unit="batch"):
        out = model.encode_tiles(images[i:i + batch], masks[i:i + batch])
        globals_.append(torch.from_numpy(out.global_token.astype(np.float32)))
        tokens.append(torch.from_numpy(out.tokens.astype(np.float32)))
        positions.append(torch.from_numpy(out.positions.astype(np.int64)))
        layouts.append(torch.from_numpy(out.layout.coarse.astype(np.float32)))
    sketches, places = [], []
    for place, image in enumerate(images):
        for k in range(sketches_per_window):
            style = STYLES[(place + k) % len(STYLES)]
            img = augment(pseudo_sketch(image, style, rng=rng, hand_strokes=hand_strokes, valid=masks[place]), rng)
            sketches.append(prepare_sketch(img, model.img_size))
            places.append(place)
    encoded = [sketch_backbone_tokens(model, torch.stack(sketches[i:i + batch]))
               for i in tqdm(range(0, len(sketches), batch), desc="sketch tokens", unit="batch")]
    return PairCache(torch.cat([e[0] for e in encoded]), torch.cat([e[1] for e in encoded]), torch.tensor(places),
                     torch.cat(globals_), torch.cat(tokens), torch.cat(positions), torch.cat(layouts))


class BatchSampler:
    """Places per step: an anchor, up to half the batch drawn from its `near` nearest places by
    coarse edge layout (the shortlist's confusers), the rest at random. Deterministic for a seed."""

    def __init__(self, layouts: torch.Tensor, batch_places: int, seed: int, near: int = 32):
        self.count, self.batch = len(layouts), batch_places
        sims = layouts @ layouts.T
        sims.fill_diagonal_(float("-inf"))
        self.neighbours = sims.topk(min(near, self.count - 1), dim=1).indices
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        order = torch.randperm(self.count, generator=self.gen)
        anchor = order[0]
        near = self.neighbours[anchor]
        near = near[torch.randperm(len(near), generator=self.gen)[:self.batch // 2 - 1]]
        picked = torch.cat([anchor[None], near, order[1:]])
        first = np.unique(picked.numpy(), return_index=True)[1]
        return picked[np.sort(first)][:self.batch]


def pair_scores(model: RetrievalModel, cache: PairCache, sketch_rows: torch.Tensor,
                places: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank scores (S, P) of sketches against places as the product computes them, and the
    global-token cosines (S, P) the shortlist uses."""
    g, t = model.adapt(cache.sketch_tokens[sketch_rows])
    xattn = model.scorer.pairwise(t, cache.tile_tokens[places], sketch_pos=cache.sketch_positions[sketch_rows],
                                  tile_pos=cache.tile_positions[places])
    return xattn, g @ cache.tile_global[places].T


def triplet_loss(scores: torch.Tensor, positive: torch.Tensor, margin: float, hardest: int = 4) -> torch.Tensor:
    """Margin loss of each sketch's positive against its `hardest` negatives."""
    pos = scores.gather(1, positive[:, None])
    neg = scores.masked_fill(F.one_hot(positive, scores.shape[1]).bool(), float("-inf"))
    hard = neg.topk(min(hardest, scores.shape[1] - 1), dim=1).values
    return F.relu(margin - pos + hard).mean()


def train(model: RetrievalModel, cache: PairCache, steps: int, seed: int, batch_places: int = 16,
          lr: float = 3e-4, margin: float = 0.1, checkpoint: Path | None = None, resume: bool = False) -> list[float]:
    """Train adapter + scorer; returns the loss per step. Deterministic for a seed."""
    torch.manual_seed(seed)
    params = list(model.adapter.parameters()) + list(model.scorer.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    start = 0
    state_path = checkpoint.with_suffix(".train-state.pt") if checkpoint else None
    if resume and state_path and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.adapter.load_state_dict(state["adapter"])
        model.scorer.load_state_dict(state["scorer"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log.info("resuming at step %d", start)
    sample_places = BatchSampler(cache.tile_layout, batch_places, seed)
    for _ in range(start):  # replay the sampler so a resumed run sees the same batches
        sample_places()
    model.adapter.train()
    model.scorer.train()
    losses = []
    bar = tqdm(range(start, steps), desc="train", unit="step")
    for step in bar:
        places = sample_places()
        lookup = torch.full((len(cache.tile_global),), -1)
        lookup[places] = torch.arange(len(places))
        rows = torch.nonzero(lookup[cache.place] >= 0).squeeze(1)
        xattn, global_scores = pair_scores(model, cache, rows, places)
        positive = lookup[cache.place[rows]]
        # both stages learn: the re-rank score and the global token that builds the shortlist
        loss = triplet_loss(xattn, positive, margin) + triplet_loss(global_scores, positive, margin)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if state_path and ((step + 1) % 100 == 0 or step + 1 == steps):
            torch.save({"adapter": model.adapter.state_dict(), "scorer": model.scorer.state_dict(),
                        "opt": opt.state_dict(), "step": step + 1}, state_path)
    model.adapter.eval()
    model.scorer.eval()
    if checkpoint:
        model.save_sketch_modules(checkpoint, {"trained_steps": str(steps), "seed": str(seed)})
    return losses
