"""One place that turns user choices into a RetrievalModel (CLI, service, scripts): it reads the
weights files, takes their identities (worker.model.identity) and hands both to the model."""

from __future__ import annotations

from pathlib import Path

from worker.assets import default_weights_path
from worker.errors import InputError
from worker.model import checkpoints, identity
from worker.model.backbone import DEFAULT_TIMM, BackboneSpec
from worker.model.retrieval_model import ModelConfig, RetrievalModel

SHIPPED_SKETCH_MODULES = Path(__file__).resolve().parents[1] / "weights" / "sketch_modules.safetensors"
# a ViT's input: at least a patch a side of timm's largest (32 px), at most 4.6 times the
# default's (a 1024 px input is 5,300 patches of 14 px: minutes a tile on a CPU)
MIN_IMG_SIZE, MAX_IMG_SIZE = 32, 1024


def load_model(timm_name: str = DEFAULT_TIMM, weights: Path | None = None, random_weights: bool = False,
               sketch_modules: Path | str | None = None, img_size: int = 224, device: str = "auto",
               tile_view: str = "edges") -> RetrievalModel:
    """Default: the converted offline DINOv2 plus the shipped trained sketch modules.

    `sketch_modules`: None takes the shipped modules when the backbone is the default one (the
    ones they were trained for), "none" runs without trained modules, a path loads that file.
    """
    if not MIN_IMG_SIZE <= img_size <= MAX_IMG_SIZE:  # 0 failed in timm, 13 in resizing the position embedding
        raise InputError(f"model input size {img_size} px (--img-size) is not between {MIN_IMG_SIZE} and "
                         f"{MAX_IMG_SIZE}: leave it out to take the model's own (224)")
    state = None
    default_backbone = weights is None and not random_weights and timm_name == DEFAULT_TIMM and img_size == 224
    if random_weights:
        backbone_id = identity.random_init(timm_name, img_size)
    else:
        if weights is None:
            if timm_name != DEFAULT_TIMM:
                raise InputError(f"--model {timm_name} needs --weights PATH (no model hub is reachable)")
            weights = default_weights_path()
            if not weights.exists():
                raise InputError(f"default weights missing at {weights}: run scripts/setup")
        state, backbone_id = checkpoints.load_backbone_weights(Path(weights))
    modules = None
    if sketch_modules is None:
        if default_backbone:
            modules = checkpoints.load_sketch_modules(SHIPPED_SKETCH_MODULES, backbone_id)
    elif str(sketch_modules) != "none":
        modules = checkpoints.load_sketch_modules(Path(sketch_modules), backbone_id)
    spec = BackboneSpec(timm_name=timm_name, identity=backbone_id, img_size=img_size)
    return RetrievalModel(ModelConfig(backbone=spec, tile_view=tile_view), device=device, backbone_state=state,
                          sketch_modules=modules)
