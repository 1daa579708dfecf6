#!/usr/bin/env python3
"""Pack what training the tokenizer on a lent GPU machine needs into .gpu-bundle/ (git-ignored).

That machine has torch and timm but not the rasters, rasterio or the converted backbone, and a
call can carry 64 MiB. The bundle holds the default backbone's weights rounded to fp16 (43 MB;
the fp32 file is 87 MB) and a pair set built here (scripts/train --save-pairs). The fp16
copy stands in for the default weights: its identity is derived from the fp32 backbone's, so
modules trained on it are recorded for, and load on, the default backbone. This script measures what the
rounding changes in the backbone's sketch tokens and prints it.
Run: scripts/lab gpu_bundle, then scripts/train there with
  --pairs .gpu-bundle/pairs.npz --backbone-weights .gpu-bundle/dinov2_fp16.safetensors --no-eval --device cuda --tokenizer
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
from worker.assets import default_weights_path
from worker.model import identity
from worker.model.checkpoints import load_backbone_weights, save_safetensors
from worker.model.loading import load_model
from worker.model.vit_tokens import forward_tokens
from lab.training import sketch_input
from lab.training_pairs import PairSet

BUNDLE = REPO / ".gpu-bundle"


def main() -> int:
    source = default_weights_path()
    dest = BUNDLE / "dinov2_fp16.safetensors"
    state, parent = load_backbone_weights(source)
    save_safetensors({k: v.half() for k, v in state.items()}, dest, identity.stamp(identity.derived(parent, "fp16")))
    pairs = PairSet.load(BUNDLE / "pairs.npz")
    sketches = sketch_input(torch.from_numpy(pairs.sketches[:32]))
    exact, rounded = (load_model(weights=w, device="cpu", sketch_modules="none") for w in (source, dest))
    with torch.inference_mode():
        # all tokens, unfiltered: filtering can swap near-tied tokens and hide what rounding did
        a, b = (forward_tokens(m.vit, m.vit.patch_embed(m.normalise(sketches))) for m in (exact, rounded))
        kept_a, kept_b = (m.sketch_backbone(m.normalise(sketches))[1] for m in (exact, rounded))
    rel = ((a.patches - b.patches).norm() / a.patches.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a.cls, b.cls, dim=-1).min().item()
    same = (kept_a.sort(1).values == kept_b.sort(1).values).float().mean().item()
    size = sum(p.stat().st_size for p in BUNDLE.iterdir()) / 2**20
    print(f"{dest.name}: on 32 sketches, patch tokens differ by {rel:.1e} (relative norm), CLS cosine at "
          f"least {cos:.6f}, filtering keeps the same patches at {same:.3f} of positions; bundle {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
