"""One place that turns user choices into a RetrievalModel (CLI, service, scripts)."""

from __future__ import annotations

from pathlib import Path

from worker.assets import default_weights_path
from worker.errors import InputError
from worker.model.backbone import BackboneSpec
from worker.model.retrieval_model import ModelConfig, RetrievalModel

REPO = Path(__file__).resolve().parents[2]
SHIPPED_SKETCH_MODULES = REPO / "weights" / "sketch_modules.safetensors"
DEFAULT_TIMM = "vit_small_patch14_dinov2"


def load_model(timm_name: str = DEFAULT_TIMM, weights: Path | None = None, random_weights: bool = False,
               sketch_modules: Path | str | None = None, img_size: int = 224, device: str = "auto",
               tile_view: str = "edges", ranker: str = "layout", token_weight: float | None = None) -> RetrievalModel:
    """Default: the converted offline DINOv2 plus the shipped trained sketch modules when present."""
    if random_weights:
        weights = None
    elif weights is None:
        if timm_name != DEFAULT_TIMM:
            raise InputError(f"--model {timm_name} needs --weights PATH (no model hub is reachable)")
        weights = default_weights_path()
        if not weights.exists():
            raise InputError(f"default weights missing at {weights}: run scripts/setup")
    if sketch_modules is None and not random_weights and timm_name == DEFAULT_TIMM and weights == default_weights_path():
        sketch_modules = SHIPPED_SKETCH_MODULES if SHIPPED_SKETCH_MODULES.exists() else None
    elif str(sketch_modules) == "none":
        sketch_modules = None
    spec = BackboneSpec(timm_name=timm_name, weights=weights, img_size=img_size)
    config = ModelConfig(backbone=spec, tile_view=tile_view, ranker=ranker,
                         token_weight=ModelConfig.token_weight if token_weight is None else token_weight,
                         sketch_modules=Path(sketch_modules) if sketch_modules else None)
    return RetrievalModel(config, device=device)
