"""How finely the ANN's last re-rank must store the full window vectors: of each sketch's exact
best 200 windows among n synthetic windows (lab.ann_scale), the share each way of storing them
keeps in its own best 200, ranking all n (no FAISS: the re-rank codes' own loss).

Ways: 8 bits over each dimension's range in a training sample (the product before), float16
(the product: worker.ann.CODES), 8 bits over each vector's own range, 8 bits in square-root
steps over each dimension's range, and 8 bits plus a 4-bit residual (12 bits).
Run: scripts/lab rerank_codes [--windows 450000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from lab import ann_scale
from lab.bench_speed import sketches
from worker.assets import load_asset_paths
from worker.model.loading import load_model
from worker.store import IndexWriter, TileIndex
from worker.tiling import TileSettings

SKETCHES = 20
SAMPLE = 100_000  # windows the 8-bit ranges are taken from (worker.ann.TRAIN_MIN)


def ways(sample: np.ndarray) -> dict:
    """Each way of storing vectors: the vectors it gives back, and its bytes a window."""
    low, span = sample.min(0), np.maximum(sample.max(0) - sample.min(0), 1e-12)
    step = span / 255

    def by_range(x):
        return low + np.clip(np.rint((x - low) / step), 0, 255) * step

    def by_own_range(x):
        lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
        own = np.maximum(hi - lo, 1e-12) / 255
        return lo + np.rint((x - lo) / own) * own

    def square_root_steps(x):
        return low + span * (np.rint(255 * np.sqrt(np.clip((x - low) / span, 0, 1))) / 255) ** 2

    def with_residual(x):
        coarse = by_range(x)
        return coarse + np.clip(np.rint((x - coarse) / (step / 16)), -8, 7) * (step / 16)

    dim = sample.shape[1]
    return {"8 bits over each dimension's range (before)": (by_range, dim),
            "float16 (product)": (lambda x: x.astype(np.float16).astype(np.float32), 2 * dim),
            "8 bits over each vector's own range": (by_own_range, dim + 8),
            "8 bits in square-root steps": (square_root_steps, dim),
            "8 bits + 4-bit residual": (with_residual, dim * 3 // 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=450_000)
    args = parser.parse_args()
    model = load_model(device="cpu")
    with tempfile.TemporaryDirectory(prefix="rerank-codes-") as work:
        IndexWriter(Path(work) / "index", model, TileSettings()).build([Path(load_asset_paths()["s2_rgb"])])
        index = TileIndex.open(Path(work) / "index")
        queries = [ann_scale.sketch_vectors(q) for q in sketches(index, model, SKETCHES)]
        base = ann_scale.real_windows(index)[0]
    sample = next(ann_scale.synthetic_windows(base, SAMPLE, SAMPLE))[0]
    decoders = ways(sample)
    exact = ann_scale.ExactBest(queries, ann_scale.RECALL_AT)
    stored = {name: ann_scale.ExactBest(queries, ann_scale.RECALL_AT) for name in decoders}
    for x, _ in ann_scale.synthetic_windows(base, args.windows, 100_000):
        exact.add(x)
        for name, (decode, _) in decoders.items():
            stored[name].add(decode(x))
    truth = exact.best_first()
    lines = [f"{args.windows:,} synthetic windows, {SKETCHES} sketches: share of the exact best "
             f"{ann_scale.RECALL_AT} in the best {ann_scale.RECALL_AT} by the stored vectors", "",
             "| stored as | bytes a window | exact best 200 kept |", "|---|---|---|"]
    for name, found in stored.items():
        kept = np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found.best_first(), truth)])
        lines.append(f"| {name} | {decoders[name][1]} | {kept:.4f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
