"""Dark or flat 8-bit imagery: is it found as often as the same place at full range?

The 8-bit benchmark scene (rmnp) with its pixels put into a narrow range, 30 + GAIN * v, is
written twice: as 8-bit, which the worker drew as it is until worker.tiling.NARROW_8BIT_SPAN, and
as 16-bit, which it always stretched. With --borders, a hazy version instead (HAZY + 0.25 v), as
it is and with black or white corners and no nodata (a scanned air photo's border, a JPEG's
beside a world file): with black ones it spans 0 to its brightest, is told wide and is drawn as
it is. Each is indexed alone (the benchmark's tiles), and the same
pseudo-sketches of places of the full-range scene (every placement kind, three styles) are searched
in each, with the full-range scene as the control. A hit is right at IoU >= 0.25 with the place
(lab.bench_quality.CORRECT_IOU).
Run: scripts/lab narrow_range [--gains 0.25,0.5 | --borders] [--per-placement 6] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import rasterio

from lab.bench_quality import CORRECT_IOU, hit_polygon
from lab.placements import PLACEMENTS, iou
from lab.pseudo_sketch import load_hand_strokes, pseudo_sketch
from lab.queries import BENCH_TILES, sketchable_frames
from worker.assets import load_asset_paths
from worker.model.loading import load_model
from worker.ranking import RankingConfig
from worker.search import search
from worker.sketch import prepare_sketch
from worker.store import IndexWriter, TileIndex
from worker.tiling import open_raster

STYLES = ("wobbly", "simple", "strokes")
OFFSET = 30  # the narrow range's darkest level
HAZY = 140  # a hazy scene's darkest level (--borders): 140 to 204, wide with a black border


def sketches(path: Path, per_placement: int) -> list[tuple]:
    """(frame, sketch) of places of the raster at `path`, `per_placement` of each placement kind."""
    rng = np.random.default_rng(0)
    strokes = load_hand_strokes(Path(load_asset_paths()["lasa_dir"]))
    raster = open_raster(path, None)
    return [(frame, pseudo_sketch(image, style, rng=rng, hand_strokes=strokes, valid=valid))
            for placement in PLACEMENTS
            for frame, image, valid in sketchable_frames(raster, BENCH_TILES, placement, per_placement, rng)
            for style in STYLES]


def narrowed(source: Path, gain: float, dtype: str, out: Path, offset: int = OFFSET) -> Path:
    """The source's pixels as offset + gain * v, written as `dtype`."""
    with rasterio.open(source) as src:
        data, profile = src.read(), src.profile
    with rasterio.open(out, "w", **{**profile, "dtype": dtype}) as dst:
        dst.write(np.clip(np.round(data * gain + offset), 0, 255).astype(dtype))
    return out


def cornered(path: Path, fill: int, out: Path) -> Path:
    """The raster at `path` with each corner cut off as `fill` in every band, no nodata: a
    triangle of a fifth of each side, about 8% of the raster (a scanned photo's border)."""
    with rasterio.open(path) as src:
        data, profile = src.read(), src.profile
    rows, cols = np.mgrid[:data.shape[1], :data.shape[2]]
    u, v = cols / data.shape[2], rows / data.shape[1]
    corners = (u + v < 0.2) | ((1 - u) + v < 0.2) | (u + (1 - v) < 0.2) | ((1 - u) + (1 - v) < 0.2)
    data[:, corners] = fill
    with rasterio.open(out, "w", **{**profile, "nodata": None}) as dst:
        dst.write(data)
    return out


def recall(path: Path, queries: list[tuple], model, folder: Path) -> dict[int, float]:
    """Recall@1/5/10 of `queries` in an index of the raster at `path` alone."""
    IndexWriter(folder / f"index-{path.stem}", model, BENCH_TILES).build([path])
    index = TileIndex.open(folder / f"index-{path.stem}")
    ranks = []
    for frame, sketch in queries:
        hits = search(index, model, prepare_sketch(sketch, model.img_size), RankingConfig(), top=10).hits
        ranks.append(next((n for n, h in enumerate(hits, 1)
                           if iou(hit_polygon(h), frame.pixel_polygon()) >= CORRECT_IOU), 99))
    return {k: float((np.array(ranks) <= k).mean()) for k in (1, 5, 10)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gains", default="0.25,0.5")
    parser.add_argument("--borders", action="store_true", help="a hazy scene with and without a border instead")
    parser.add_argument("--per-placement", type=int, default=6)
    parser.add_argument("--keep", type=Path, default=None, help="write the rasters and indexes here")
    args = parser.parse_args()
    model = load_model(device="cpu")
    source = Path(load_asset_paths()["rmnp_rgb"])
    queries = sketches(source, args.per_placement)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [("full range, 8-bit (the control)", source)]
        if args.borders:
            hazy = narrowed(source, 0.25, "uint8", folder / "hazy.tif", HAZY)
            rows = [(f"{HAZY} + 0.25 v, 8-bit", hazy)] + [
                (f"{HAZY} + 0.25 v, 8-bit, {name} corners without nodata", cornered(hazy, fill, folder / f"{name}.tif"))
                for name, fill in (("black", 0), ("white", 255))]
        for gain in [] if args.borders else (float(g) for g in args.gains.split(",")):
            for dtype, bits in (("uint8", "8-bit"), ("uint16", "16-bit, always stretched")):
                rows.append((f"{OFFSET} + {gain:g} v, {bits}", narrowed(source, gain, dtype,
                                                                         folder / f"narrow-{gain:g}-{dtype}.tif")))
        table = [(name, widest_span(path), recall(path, queries, model, folder)) for name, path in rows]
    print(f"{len(queries)} sketches of rmnp, {args.per_placement} places a placement kind, styles {', '.join(STYLES)}")
    print("| raster | widest band's 2-98% span (levels) | R@1 | R@5 | R@10 |\n|---|---|---|---|---|")
    for name, span, r in table:
        print(f"| {name} | {span:.0f} | {r[1]:.3f} | {r[5]:.3f} | {r[10]:.3f} |")
    return 0


def widest_span(path: Path) -> float:
    """The widest 2nd-98th percentile span of the raster's three bands, in levels."""
    with rasterio.open(path) as src:
        return max(float(np.subtract(*np.percentile(src.read(b, masked=True).compressed(), (98, 2))))
                   for b in (1, 2, 3))


if __name__ == "__main__":
    raise SystemExit(main())
