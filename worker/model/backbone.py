"""The ViT backbone (timm) and how its weights get in: one loader, every foreign layout converted."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from worker.errors import InputError
from worker.model.identity import WeightsIdentity

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TIMM = "vit_small_patch14_dinov2"  # the backbone the shipped weights and sketch modules are for


@dataclass(frozen=True)
class BackboneSpec:
    """Which ViT, at which input size, with which weights (`identity` says where they came from;
    a random initialisation is the quality floor)."""

    timm_name: str = DEFAULT_TIMM
    identity: WeightsIdentity | None = None
    img_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def build_backbone(spec: BackboneSpec, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A timm VisionTransformer in eval mode with `state` strictly loaded (None: random init)."""
    try:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=spec.img_size)
    except RuntimeError as exc:
        raise InputError(f"unknown timm model {spec.timm_name!r}: {exc}") from exc
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise InputError(f"{spec.timm_name} is not a ViT (no blocks/patch_embed)")
    if state is not None:
        # Foreign timm-family checkpoints (hub files, other input sizes) go through timm's own
        # filter, which renames legacy keys and resamples position embeddings.
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise InputError(f"these weights do not fit {spec.timm_name}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return model.eval()
