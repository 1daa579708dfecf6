"""The network: ViT tokens of tiles (index side), of sketches, and their cross-attention score.

Line drawings and edge cells are not the network's business (worker.line_drawing,
worker.edge_cells, worker.tile_features); ranking settings are the search's (worker.search).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worker import edge_cells, line_drawing
from worker.errors import InputError
from worker.model.adapter import SketchAdapter
from worker.model.backbone import BackboneSpec, build_backbone
from worker.model.checkpoints import SKETCH_MODULE_PARTS
from worker.model.identity import WeightsIdentity
from worker.model.cross_attention import CrossAttentionScorer
from worker.model.tokenizer import MultiLevelTokenizer
from worker.model.vit_tokens import forward_tokens


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides what the network computes."""

    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    tile_tokens: int = 48  # patch tokens stored per tile, chosen by the last block's CLS attention
    tile_view: str = "edges"  # "edges": tiles are encoded as line drawings (see worker.line_drawing); "rgb"
    sketch_prune_layers: tuple[int, ...] = (3, 6, 9)  # attention-guided filtering of sketch tokens
    sketch_keep_rate: float = 0.7


@dataclass
class TileTokens:
    """Per tile: global token (B, D), filtered patch tokens (B, K, D), all L2-normalised fp16,
    and the patch index of each kept token (B, K)."""

    global_token: np.ndarray
    tokens: np.ndarray
    positions: np.ndarray


@dataclass
class SketchTokens:
    """A sketch's tokens after the trained sketch modules."""

    global_token: torch.Tensor  # (D,) normalised fp32
    tokens: torch.Tensor  # (M, D) normalised fp32
    positions: torch.Tensor  # (M,) patch index of each token


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA device here")
    return torch.device(name)


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RetrievalModel(nn.Module):
    """The network. Weights come in as tensors with their identities (worker.model.loading reads
    the files): `backbone_state` None is a random backbone, `sketch_modules` (state, identity)
    the trained tokenizer, adapter and scorer (None: their untrained, zero-shot defaults)."""

    def __init__(self, config: ModelConfig, device: str = "auto", backbone_state: dict[str, torch.Tensor] | None = None,
                 sketch_modules: tuple[dict[str, torch.Tensor], WeightsIdentity] | None = None):
        super().__init__()
        if config.backbone.identity is None:
            raise ValueError("a model needs to know which backbone weights it runs (BackboneSpec.identity)")
        if config.tile_view not in ("edges", "rgb"):
            raise InputError(f"tile view {config.tile_view!r} must be 'edges' or 'rgb'")
        self.config = config
        self.vit = build_backbone(config.backbone, backbone_state)
        dim = self.vit.embed_dim
        grid = self.vit.patch_embed.grid_size[0]
        self.tokenizer = MultiLevelTokenizer(dim, grid)
        self.adapter = SketchAdapter(dim)
        self.scorer = CrossAttentionScorer(dim, grid)
        self.sketch_modules_identity: WeightsIdentity | None = None
        if sketch_modules is not None:
            self.set_sketch_modules(*sketch_modules)
        self.device = resolve_device(device)
        self.to(self.device).eval()
        mean = torch.tensor(config.backbone.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(config.backbone.std, device=self.device).view(1, 3, 1, 1)
        self.register_buffer("_mean", mean, persistent=False)
        self.register_buffer("_std", std, persistent=False)

    # -- identity -------------------------------------------------------------------------
    @property
    def img_size(self) -> int:
        return self.config.backbone.img_size

    @property
    def backbone_identity(self) -> WeightsIdentity:
        return self.config.backbone.identity

    def tile_encoder_fingerprint(self) -> str:
        """What decides stored tile tokens; an index is only valid for this exact value."""
        b = self.config.backbone
        return _digest({"timm": b.timm_name, "img": b.img_size, "weights": b.identity.digest,
                        "mean": b.mean, "std": b.std, "tile_tokens": self.config.tile_tokens,
                        "tile_view": self.config.tile_view, "drawing": line_drawing.fingerprint(),
                        "cells": edge_cells.fingerprint()})

    def fingerprint(self) -> dict:
        """The model's identity as recorded in index manifests and `info` replies."""
        b = self.config.backbone
        sketch = self.sketch_modules_identity.digest if self.sketch_modules_identity else None
        return {"tile_encoder": self.tile_encoder_fingerprint(), "timm_name": b.timm_name,
                "img_size": b.img_size, "tile_view": self.config.tile_view,
                "backbone": b.identity.to_dict(), "backbone_id": b.identity.digest, "sketch_modules_id": sketch,
                "model": _digest({"tile": self.tile_encoder_fingerprint(), "sketch": sketch,
                                  "cfg": asdict(replace(self.config, backbone=None))})}

    # -- trained sketch-side modules --------------------------------------------------------
    def sketch_module_state(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().cpu().contiguous()
                for name in SKETCH_MODULE_PARTS
                for k, v in getattr(self, name).state_dict().items()}

    def set_sketch_modules(self, state: dict[str, torch.Tensor], identity: WeightsIdentity) -> None:
        """Load trained tokenizer/adapter/scorer tensors (checked by worker.model.checkpoints)."""
        for name in SKETCH_MODULE_PARTS:
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            try:
                getattr(self, name).load_state_dict(part, strict=True)
            except RuntimeError as exc:
                raise InputError(f"sketch modules do not fit this model's {name}: {exc}") from exc
        self.sketch_modules_identity = identity

    # -- encoders ----------------------------------------------------------------------------
    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float in [0, 1] (B, 3, H, W) -> backbone input. On the model's
        device first: uint8 is a quarter of float32's bytes to copy, and the arithmetic is the device's."""
        images = images.to(self.device)
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float() / 255.0
        return (images - self._mean) / self._std

    @torch.inference_mode()
    def tile_tokens(self, views: np.ndarray | torch.Tensor) -> TileTokens:
        """What the index stores of tiles, from their views (B, S, S, 3) uint8, an array or a
        tensor (one drawn on the model's device stays there): line drawings for the "edges"
        tile view (worker.line_drawing draws them), the imagery for "rgb"."""
        x = self.normalise(views if isinstance(views, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(views)))
        out = forward_tokens(self.vit, self.vit.patch_embed(x), final_keep=self.config.tile_tokens)
        return TileTokens(
            global_token=F.normalize(out.cls, dim=-1).half().cpu().numpy(),
            tokens=F.normalize(out.patches, dim=-1).half().cpu().numpy(),
            positions=out.positions.to(torch.int16).cpu().numpy(),
        )

    def sketch_backbone(self, sketch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised sketch batch (B, 3, S, S) -> pre-adapter tokens (B, 1 + M, D) and patch positions (B, M)."""
        tokens = self.vit.patch_embed(sketch) + self.tokenizer(sketch)
        out = forward_tokens(self.vit, tokens, prune_layers=self.config.sketch_prune_layers,
                             keep_rate=self.config.sketch_keep_rate)
        return torch.cat([out.cls[:, None], out.patches], 1), out.positions

    def adapt(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-adapter sketch tokens (B, 1 + M, D) -> normalised (global (B, D), tokens (B, M, D))."""
        adapted = F.normalize(self.adapter(tokens), dim=-1)
        return adapted[:, 0], adapted[:, 1:]

    @torch.inference_mode()
    def encode_sketch(self, sketch: torch.Tensor) -> SketchTokens:
        """A preprocessed sketch (3, S, S) in [0, 1] -> its global token, filtered tokens and
        their positions (the expensive part of a query on a CPU: one ViT pass)."""
        vit_tokens, positions = self.sketch_backbone(self.normalise(sketch[None]))
        g, t = self.adapt(vit_tokens)
        return SketchTokens(global_token=g[0].float(), tokens=t[0].float(), positions=positions[0])

    @torch.inference_mode()
    def token_scores(self, sketch: SketchTokens, tile_tokens: np.ndarray, tile_positions: np.ndarray | None = None) -> np.ndarray:
        """The cross-attention token-correspondence score of the sketch with each tile (n,)."""
        tiles = torch.from_numpy(np.ascontiguousarray(tile_tokens)).to(self.device).float()
        pos = None if tile_positions is None else torch.from_numpy(np.asarray(tile_positions, np.int64)).to(self.device)
        return self.scorer(sketch.tokens, tiles, sketch_pos=sketch.positions if pos is not None else None,
                           tile_pos=pos).cpu().numpy()

    @torch.inference_mode()
    def aligned_token_scores(self, sketch: SketchTokens, tile_tokens: np.ndarray, tile_positions: np.ndarray,
                             sketch_rc: np.ndarray, sketch_in: np.ndarray, tile_in: np.ndarray) -> np.ndarray:
        """The cross-attention score of the sketch with B tiles it was placed over (see
        CrossAttentionScorer.aligned): (B,)."""
        dev = self.device
        tiles = torch.from_numpy(np.ascontiguousarray(tile_tokens)).to(dev).float()
        tile_rc = self.scorer.grid_rc(torch.from_numpy(np.asarray(tile_positions, np.int64)).to(dev))
        return self.scorer.aligned(sketch.tokens, torch.from_numpy(sketch_rc).to(dev).float(),
                                   torch.from_numpy(sketch_in).to(dev), tiles, tile_rc,
                                   torch.from_numpy(tile_in).to(dev)).cpu().numpy()
