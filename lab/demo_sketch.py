"""Draw a known place of a raster as a wobbly hand-made-looking sketch (for scripts/demo).

The place is a square anywhere in the raster, off the tile grid, of any size, turned (a
worker.placement.Placement: centre column and row, side in pixels, angle in degrees). Writes the
sketch PNG and prints the place as JSON, so the demo can say where and how well it was found.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from lab.pseudo_sketch import load_hand_strokes, pseudo_sketch
from worker.assets import load_asset_paths
from worker.placement import Placement
from worker.tiling import open_raster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raster", type=Path)
    parser.add_argument("--place", default="1330,760,270,8", help="centre column,centre row,side,angle")
    parser.add_argument("--style", default="wobbly", choices=["canny", "simple", "wobbly", "sloppy"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cx, cy, side, angle = (float(v) for v in args.place.split(","))
    info = open_raster(args.raster.resolve(), None)
    image, valid = Placement(info, cx, cy, side, angle).read(224)
    strokes = load_hand_strokes(Path(load_asset_paths()["lasa_dir"]))
    sketch = pseudo_sketch(image, args.style, rng=np.random.default_rng(7), hand_strokes=strokes, valid=valid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sketch.save(args.out)
    print(json.dumps({"raster": info.path, "center": [cx, cy], "side": side, "angle": angle}))


if __name__ == "__main__":
    main()
