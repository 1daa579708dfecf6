"""What the shards of a continental index cost before a search begins: the worker's look at
whether its open index changed (every search), opening it (after each commit) and listing it.

An index of 10M tiles written 256 tiles a chunk has 39,000 shards, two files each. The ANN
benchmark at 10M (lab.ann_scale) keeps the real index's one shard, so what a worker does per
shard is not in its figures. Here the demo index's tiles are copied round into N shards of
`--per-shard` tiles (the same raster, its level maps on disk) and the service's index cache
(worker.service.indexes.OpenIndexes) is timed on each copy: `get` of the open index, as every
search asks it; opening it afresh; opening it after one more shard was committed, continuing
the view before (as the worker does while an index is built); `status`, as `list_indexes` asks it. Searches themselves
are not timed: the copies repeat the same tiles, which a search would find many times over.
Run: scripts/lab many_shards --index DIR [--shards 1,1000,10000,39000] [--per-shard 1] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from worker.model.loading import load_model
from worker.service.indexes import OpenIndexes
from worker.store import MANIFEST, TileIndex
from worker.store.format import SHARDS, shard_arrays, write_json_atomic


def split_copy(source: Path, dest: Path, shards: int, per_shard: int) -> int:
    """A copy of a one-shard index whose tiles are the source's, copied round into `shards`
    shards of `per_shard` tiles (no ANN shortlist). Returns its tile count."""
    manifest = json.loads((source / MANIFEST).read_text())
    [only] = manifest["shards"]
    arrays = {key: np.load(source / SHARDS / only["name"] / f"{key}.npy") for key in shard_arrays(manifest)}
    dest.mkdir(parents=True)
    shutil.copytree(source / "maps", dest / "maps")
    n = len(arrays["records"])
    entries = []
    for chunk in range(shards):
        rows = (np.arange(per_shard) + chunk * per_shard) % n
        folder = dest / SHARDS / f"r00000-c{chunk:06d}"
        folder.mkdir(parents=True)
        for key, values in arrays.items():
            np.save(folder / f"{key}.npy", values[rows])
        entries.append({"name": folder.name, "raster_id": 0, "chunk": chunk, "count": per_shard, "skipped": 0})
    write_json_atomic(dest / MANIFEST, {**manifest, "shards": entries, "tile_count": shards * per_shard,
                                        "chunk_tiles": per_shard})
    return shards * per_shard


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="a one-shard index (the demo's)")
    parser.add_argument("--shards", default="1,1000,10000,39000")
    parser.add_argument("--per-shard", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model = load_model()
    print("| shards | tiles | each search's look (get), ms | opening, ms | opening after a commit, ms | "
          "listing (status), ms |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="many-shards-") as work:
        for shards in map(int, args.shards.split(",")):
            index_dir = Path(work) / f"index-{shards}"
            tiles = split_copy(args.index, index_dir, shards, args.per_shard)
            indexes = OpenIndexes(model)
            opening = median_ms(lambda: OpenIndexes(model).get(index_dir), args.repeat)
            indexes.get(index_dir)
            look = median_ms(lambda: indexes.get(index_dir), args.repeat)
            listing = median_ms(lambda: indexes.status(index_dir), args.repeat)
            manifest = json.loads((index_dir / MANIFEST).read_text())
            before = TileIndex(index_dir, manifest, manifest["shards"][:-1])
            continued = median_ms(lambda: TileIndex(index_dir, manifest, manifest["shards"], earlier=before), args.repeat)
            shutil.rmtree(index_dir)
            print(f"| {shards:,} | {tiles:,} | {look:,.1f} | {opening:,.0f} | {continued:,.0f} | {listing:,.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
