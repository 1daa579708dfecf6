"""Draw a known place of a raster as a wobbly hand-made-looking sketch (for scripts/demo).

Writes the sketch PNG and prints the place's window as JSON, so the demo can say where the
true place ranked.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from worker.assets import load_asset_paths
from lab.pseudo_sketch import load_hand_strokes, pseudo_sketch
from worker.tiling import Tile, TileReader, open_raster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raster", type=Path)
    parser.add_argument("--window", default="1176,672,224,224", help="col_off,row_off,width,height")
    parser.add_argument("--style", default="wobbly", choices=["canny", "simple", "wobbly"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    col, row, width, height = (int(v) for v in args.window.split(","))
    info = open_raster(args.raster.resolve(), None)
    tile = Tile(info, col, row, width, height, 1)
    with TileReader(info, 224) as reader:
        image, _ = reader.read(tile)
    strokes = load_hand_strokes(Path(load_asset_paths()["lasa_dir"]))
    sketch = pseudo_sketch(image, args.style, rng=np.random.default_rng(7), hand_strokes=strokes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sketch.save(args.out)
    print(json.dumps({"raster": info.path, "window": [col, row, width, height]}))


if __name__ == "__main__":
    main()
