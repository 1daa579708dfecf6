"""Training the sketch-side modules on pseudo-sketch pairs cut from real rasters (lab.training_pairs).

The backbone is frozen. Tile tokens are what the index stores (the tile encoder never changes,
so built indexes stay valid). The sketch adapter and the cross-attention scorer are trained with
the paper's triplet objective, each sketch against its own place (positive) and the hardest
other places of the same scene in the batch (negatives). Half of each batch are places whose
edge layouts resemble an anchor place's: the re-rank only ever sees the layout shortlist, so
those are the negatives it has to tell apart.

The multi-level tokenizer sits before the backbone, so training it runs the backbone forward and
backward on every step's sketches (`train_tokenizer`; meant for a GPU). Without it the sketches'
backbone outputs are computed once and cached, which is what makes training fit on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from worker import edge_cells
from worker.model.checkpoints import save_sketch_modules
from worker.model.retrieval_model import RetrievalModel
from lab.training_pairs import PairSet

log = logging.getLogger(__name__)


@dataclass
class PairCache:
    """A pair set as the model sees it. Per sketch either its pre-adapter backbone tokens
    (S, 1 + M, D) and their positions (S, M) (frozen tokenizer), or its image (S, H, W) uint8
    (trained tokenizer), and its place id; per place the tile's global token (P, D), filtered
    tokens (P, K, D), their positions (P, K) and coarse edge layout (P, L)."""

    sketch_tokens: torch.Tensor | None
    sketch_positions: torch.Tensor | None
    sketch_images: torch.Tensor | None
    place: torch.Tensor
    tile_global: torch.Tensor
    tile_tokens: torch.Tensor
    tile_positions: torch.Tensor
    tile_layout: torch.Tensor

    def to(self, device: torch.device) -> "PairCache":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PairCache(**{k: None if v is None else v.to(device) for k, v in moved.items()})


def sketch_input(images: torch.Tensor) -> torch.Tensor:
    """Stored sketch images (B, H, W) uint8 -> (B, 3, H, W) in [0, 1], as prepare_sketch gives."""
    return (images.float() / 255.0)[:, None].expand(-1, 3, -1, -1)


@torch.inference_mode()
def encode_pairs(model: RetrievalModel, pairs: PairSet, cache_sketch_tokens: bool = True, batch: int = 16) -> PairCache:
    """Tile tokens of every place, and the sketches' backbone tokens unless the tokenizer trains."""
    globals_, tokens, positions, layouts = [], [], [], []
    for i in tqdm(range(0, len(pairs.drawings), batch), desc="tile tokens", unit="batch"):
        drawings = pairs.drawings[i:i + batch]
        out = model.tile_tokens(np.repeat(drawings[..., None], 3, axis=-1))
        globals_.append(torch.from_numpy(out.global_token.astype(np.float32)))
        tokens.append(torch.from_numpy(out.tokens.astype(np.float32)))
        positions.append(torch.from_numpy(out.positions.astype(np.int64)))
        layouts.append(edge_cells.describe(torch.from_numpy(drawings), edge_cells.COARSE).cpu())
    images = torch.from_numpy(pairs.sketches)
    sketch_tokens = sketch_positions = None
    if cache_sketch_tokens:
        encoded = [model.sketch_backbone(model.normalise(sketch_input(images[i:i + batch])))
                   for i in tqdm(range(0, len(images), batch), desc="sketch tokens", unit="batch")]
        sketch_tokens = torch.cat([e[0].cpu() for e in encoded])
        sketch_positions = torch.cat([e[1].cpu() for e in encoded])
        images = None
    return PairCache(sketch_tokens, sketch_positions, images, torch.from_numpy(pairs.place),
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


def sketch_side(model: RetrievalModel, cache: PairCache, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-adapter tokens and positions of the sketches `rows`: cached, or through the tokenizer
    and the frozen backbone with gradients (bf16 autocast on a GPU)."""
    if cache.sketch_images is None:
        return cache.sketch_tokens[rows], cache.sketch_positions[rows]
    on_gpu = model.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    with autocast:
        tokens, positions = model.sketch_backbone(model.normalise(sketch_input(cache.sketch_images[rows])))
    return tokens.float(), positions


def pair_scores(model: RetrievalModel, cache: PairCache, sketch_rows: torch.Tensor,
                places: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank scores (S, P) of sketches against places as the product computes them, and the
    global-token cosines (S, P) the shortlist uses."""
    tokens, positions = sketch_side(model, cache, sketch_rows)
    g, t = model.adapt(tokens)
    xattn = model.scorer.pairwise(t, cache.tile_tokens[places], sketch_pos=positions,
                                  tile_pos=cache.tile_positions[places])
    return xattn, g @ cache.tile_global[places].T


def triplet_loss(scores: torch.Tensor, positive: torch.Tensor, margin: float, hardest: int = 4) -> torch.Tensor:
    """Margin loss of each sketch's positive against its `hardest` negatives."""
    pos = scores.gather(1, positive[:, None])
    neg = scores.masked_fill(F.one_hot(positive, scores.shape[1]).bool(), float("-inf"))
    hard = neg.topk(min(hardest, scores.shape[1] - 1), dim=1).values
    return F.relu(margin - pos + hard).mean()


TRAINED = ("adapter", "scorer")
TRAINED_WITH_TOKENIZER = ("tokenizer", "adapter", "scorer")


def train(model: RetrievalModel, cache: PairCache, steps: int, seed: int, batch_places: int = 16,
          lr: float = 3e-4, margin: float = 0.1, checkpoint: Path | None = None, resume: bool = False,
          time_limit_s: float | None = None, checkpoint_every: int = 100) -> list[float]:
    """Train adapter + scorer, and the tokenizer when the cache holds sketch images; returns the
    loss per step. Deterministic for a seed on a CPU. Stops early, saving, after `time_limit_s`."""
    torch.manual_seed(seed)
    names = TRAINED if cache.sketch_images is None else TRAINED_WITH_TOKENIZER
    modules = [getattr(model, n) for n in names]
    model.vit.requires_grad_(False)
    opt = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=lr, weight_decay=1e-4)
    start = 0
    state_path = checkpoint.with_suffix(".train-state.pt") if checkpoint else None
    if resume and state_path and state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=model.device)
        for n in names:
            getattr(model, n).load_state_dict(state[n])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log.info("resuming at step %d", start)
    cache = cache.to(model.device)
    sample_places = BatchSampler(cache.tile_layout.cpu(), batch_places, seed)
    for _ in range(start):  # replay the sampler so a resumed run sees the same batches
        sample_places()

    def save(step: int) -> None:
        if state_path:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_name(state_path.name + ".tmp")
            torch.save({**{n: getattr(model, n).state_dict() for n in names}, "opt": opt.state_dict(),
                        "step": step}, tmp)
            tmp.replace(state_path)
            save_sketch_modules(model.sketch_module_state(), checkpoint, model.backbone_identity,
                                {"trained_steps": str(step), "seed": str(seed), "trained": ",".join(names)})

    for m in modules:
        m.train()
    losses, began, done = [], time.monotonic(), start
    bar = tqdm(range(start, steps), desc="train", unit="step", mininterval=5.0)
    for step in bar:
        places = sample_places().to(model.device)
        lookup = torch.full((len(cache.tile_global),), -1, device=model.device)
        lookup[places] = torch.arange(len(places), device=model.device)
        rows = torch.nonzero(lookup[cache.place] >= 0).squeeze(1)
        xattn, global_scores = pair_scores(model, cache, rows, places)
        positive = lookup[cache.place[rows]]
        # both stages learn: the re-rank score and the global token that builds the shortlist
        loss = triplet_loss(xattn, positive, margin) + triplet_loss(global_scores, positive, margin)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        done = step + 1
        if done % checkpoint_every == 0:
            save(done)
            log.info("step %d: loss %.4f (mean of the last %d), %.0f s", done, np.mean(losses[-checkpoint_every:]),
                     min(len(losses), checkpoint_every), time.monotonic() - began)
        if time_limit_s is not None and time.monotonic() - began > time_limit_s:
            log.warning("time limit reached after step %d of %d", done, steps)
            break
    for m in modules:
        m.eval()
    save(done)
    return losses
