"""How a search's time grows with the mosaic: many small rasters against the same pixels as one
VRT, and a search of one large raster scanned exactly and with the ANN shortlist.

Two runs, in process, the same sketches for each index (simple pseudo-sketches of its tiles):
  --rasters N   N rasters of 240 px (crops of the demo scene, on a grid, EPSG:32618), indexed
                at scale 1, against the same pixels as one VRT. Found that one
                map per raster was scanned one convolution at a time (placement_scan.batch_maps).
  --vrt-side K  the demo scene's first 1,100 px repeated K by K times as one VRT, indexed at
                scale 1, searched exactly and with an ANN shortlist (ann.AUTO_MIN_TILES).
  --scan-tiles  the exact coarse scan alone over one map of the area of N tiles (random cells,
                no index: what the scan costs at sizes too slow to index here).
  --sheets      a search's looks at a VRT of N sheets of 5,000 px and 3 bands, written as
                gdalbuildvrt writes one (its sheets empty files: no pixel is read): the gone-sheet
                check (worker.vrt_sheets), its first read in a process and a search's check of 300
                placements after it; and the once-a-minute look at its sources
                (RasterInfo.changed_beside), the first and the next; and GDAL's own opening
                of it, as each thread that reads it opens it, and the memory its handle holds.
  --sources-px  the demo scene's GeoTIFF indexed at scale 1, and the same pixels as a VRT of
                sources of N px a side, each reading its own block of the GeoTIFF (8: about
                59,000 sources a band, GDAL's cost of a country's VRT of sheets): GDAL's opening of
                each, and an index run of each (one process, no drawing pool).
Run: scripts/lab mosaic_scale [--rasters 1000] [--vrt-side 0] [--scan-tiles 19000,50000] [--sheets 10000,50000]
     [--sources-px 8] [--queries 8] [--keep DIR]
     (each run is skipped at 0: scripts/lab mosaic_scale --rasters 0 --sources-px 8 runs that one alone)
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import torch
from PIL import Image, ImageDraw
from rasterio.dtypes import dtype_rev, typename_fwd
from rasterio.transform import from_origin

from lab.bench_speed import search_latency, sketches
from worker import ann, edge_cells, placement_scan, query_templates
from worker.assets import load_asset_paths
from worker.model.loading import load_model
from worker.placement import Placement
from worker.ranking import RankingConfig
from worker.search_area import SearchArea
from worker.sketch import prepare_sketch
from worker.store import IndexWriter, TileIndex
from worker.store.writer import LocalChunks
from worker.tiling import RasterInfo, TileSettings, sources_stamp
from worker.vrt_sheets import gone_sheets

CHIP = 240  # px a side of each small raster: four tiles of 224 px at 25% overlap
SETTINGS = TileSettings(scales=(1,))


def scene_pixels() -> tuple[np.ndarray, rasterio.crs.CRS]:
    with rasterio.open(load_asset_paths()["s2_rgb"]) as src:
        return src.read(window=((0, 1100), (0, 1100))), src.crs


def small_rasters(folder: Path, n: int) -> list[Path]:
    """`n` crops of the demo scene on a grid, each its own GeoTIFF (flipped in turn, so that
    neighbours differ); those already written (--keep) are kept, so their index stays current."""
    pixels, crs = scene_pixels()
    rng = np.random.default_rng(0)
    columns = int(np.ceil(np.sqrt(n)))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        r, c = rng.integers(0, pixels.shape[1] - CHIP, 2)
        crop = pixels[:, r:r + CHIP, c:c + CHIP][:, ::(-1 if i % 2 else 1), ::(-1 if i % 3 == 1 else 1)]
        path = folder / f"chip{i:05d}.tif"
        paths.append(path)
        if path.exists():
            continue
        corner = from_origin(500_000 + (i % columns) * CHIP * 10, 4_000_000 - (i // columns) * CHIP * 10, 10, 10)
        with rasterio.open(path, "w", driver="GTiff", count=crop.shape[0], height=CHIP, width=CHIP, dtype=crop.dtype,
                           photometric="RGB", crs=crs, transform=corner) as dst:
            dst.write(np.ascontiguousarray(crop))
    return paths


def chips_vrt(path: Path, chips: list[Path]) -> Path:
    """The small rasters as one VRT, each where small_rasters placed it on its grid."""
    columns = int(np.ceil(np.sqrt(len(chips))))
    placed = [(chip, (i % columns) * CHIP, (i // columns) * CHIP, CHIP) for i, chip in enumerate(chips)]
    return vrt_of(path, placed, columns * CHIP)


def repeated_scene(folder: Path, side: int) -> Path:
    """The demo scene's first 1,100 px as one GeoTIFF, and a VRT repeating it `side` by `side`
    (what an earlier run wrote, --keep, is kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    scene = folder / "scene.tif"
    pixels, crs = scene_pixels()
    if not scene.exists():
        with rasterio.open(scene, "w", driver="GTiff", count=pixels.shape[0], height=pixels.shape[1],
                           width=pixels.shape[2], dtype=pixels.dtype, photometric="RGB", crs=crs,
                           transform=from_origin(500_000, 4_000_000, 10, 10)) as dst:
            dst.write(pixels)
    size = pixels.shape[1]
    placed = [(scene, (i % side) * size, (i // side) * size, size) for i in range(side * side)]
    return vrt_of(folder / f"repeated-{side}.vrt", placed, side * size)


def vrt_of(path: Path, placed: list[tuple[Path, int, int, int]], side: int) -> Path:
    """A VRT of `side` px square, 10 m pixels, of square RGB rasters each placed whole at (column,
    row) in it: (path, column, row, size) each, all of the first's CRS and type. Written
    here (GDAL's XML), so that the lab needs no GDAL command-line tools; an earlier run's (--keep)
    is kept, so that its index stays current."""
    if path.exists():
        return path
    with rasterio.open(placed[0][0]) as first:
        crs, gdal_type = first.crs, typename_fwd[dtype_rev[first.dtypes[0]]]
    bands = "".join(
        f'<VRTRasterBand dataType="{gdal_type}" band="{band}"><ColorInterp>{("Red", "Green", "Blue")[band - 1]}'
        "</ColorInterp>" + "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(source))}</SourceFilename>'
            f'<SourceBand>{band}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/>'
            f'<DstRect xOff="{col}" yOff="{row}" xSize="{size}" ySize="{size}"/></SimpleSource>'
            for source, col, row, size in placed) + "</VRTRasterBand>"
        for band in (1, 2, 3))
    path.write_text(f'<VRTDataset rasterXSize="{side}" rasterYSize="{side}"><SRS>{escape(crs.to_wkt())}</SRS>'
                    f"<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>{bands}</VRTDataset>")
    return path


def coarse_scan_seconds(tiles: int) -> float:
    """The exact coarse scan (placement_scan.coarse_peaks, the product's templates and 800
    peaks, a sketch of four lines) over one map of random cells of the area `tiles` tiles of
    224 px at 25% overlap cover: the fastest of 3."""
    drawing = Image.new("L", (224, 224), 255)
    ImageDraw.Draw(drawing).line([(10, 200), (80, 120), (150, 110), (214, 20)], fill=0, width=3)
    ImageDraw.Draw(drawing).line([(20, 30), (120, 60)], fill=0, width=3)
    sketch = prepare_sketch(drawing, 224)
    ranking = RankingConfig()
    templates = query_templates.build(sketch, ranking.sizes, ranking.angles, torch.device("cpu"))
    cells = int(np.sqrt(tiles) * SETTINGS.step) // edge_cells.CELL
    random = torch.rand(cells, cells, edge_cells.ORIENTATIONS, generator=torch.Generator().manual_seed(0)) ** 4
    blocks = edge_cells.block_map(random, edge_cells.COARSE, step=placement_scan.COARSE_STEP)
    batch = placement_scan.MapBatch(((0, 1),), blocks, torch.tensor([list(blocks.shape[2:])]))

    class OneMap:  # a scanner of this one map
        def coarse_batches(self, keys):
            return [batch]

    area, took = SearchArea([(0, 1)], {}, True), []
    for _ in range(4):
        started = time.perf_counter()
        placement_scan.coarse_peaks(OneMap(), templates, ranking, area, 800)
        took.append(time.perf_counter() - started)
    return min(took[1:])


def sheets_vrt(path: Path, sheets: int, side: int = 5000) -> Path:
    """A VRT of `sheets` sheets of `side` px on a square grid, 3 bands, as gdalbuildvrt writes it
    (ComplexSource, SourceProperties, SrcRect, DstRect, NODATA a sheet a band)."""
    across = math.isqrt(sheets - 1) + 1
    with open(path, "w") as out:
        out.write(f'<VRTDataset rasterXSize="{across * side}" rasterYSize="{across * side}">\n')
        for band in (1, 2, 3):
            out.write(f'<VRTRasterBand dataType="Byte" band="{band}">\n')
            for i in range(sheets):
                col, row = i % across * side, i // across * side
                out.write(f'<ComplexSource><SourceFilename relativeToVRT="1">sheets/{i}.tif</SourceFilename>'
                          f'<SourceBand>{band}</SourceBand><SourceProperties RasterXSize="{side}" '
                          f'RasterYSize="{side}" DataType="Byte" BlockXSize="256" BlockYSize="256" />'
                          f'<SrcRect xOff="0" yOff="0" xSize="{side}" ySize="{side}" /><DstRect xOff="{col}" '
                          f'yOff="{row}" xSize="{side}" ySize="{side}" /><NODATA>0</NODATA></ComplexSource>\n')
            out.write("</VRTRasterBand>\n")
        out.write("</VRTDataset>\n")
    return path


def sheets_row(folder: Path, sheets: int, placements: int = 300) -> str:
    """A table row (--sheets): the gone-sheet check's first read of a VRT of `sheets` sheets
    (parsed, its tree built), a search's check of `placements` random placements after it (a stat
    a sheet met), and two of the minute's looks at its sources (changed_beside)."""
    vrt = sheets_vrt(folder / f"sheets-{sheets}.vrt", sheets)
    (folder / "sheets").mkdir(exist_ok=True)
    for i in range(sheets):
        (folder / "sheets" / f"{i}.tif").touch()
    span = (math.isqrt(sheets - 1) + 1) * 5000
    raster = RasterInfo(str(vrt), 0, 0, span, span, "", (1, 0, 0, 0, 0, -1), (1, 2, 3), None, sources=(0, 0, 0))
    rng = np.random.default_rng(0)
    places = [Placement(raster, *rng.uniform(0, span, 2), rng.uniform(224, 2000), rng.uniform(-15, 15))
              for _ in range(placements)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    gone_sheets(places[:1])
    first = time.perf_counter() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    times = []
    for _ in range(5):
        started = time.perf_counter()
        gone_sheets(places)
        times.append(time.perf_counter() - started)
    held = resident_mb()
    started = time.perf_counter()
    with rasterio.open(vrt) as src:  # as indexed: after the gone-sheet check, whose peak memory GDAL's would hide
        opened, handle_mb = time.perf_counter() - started, resident_mb() - held
        raster = replace(raster, size=vrt.stat().st_size, mtime_ns=vrt.stat().st_mtime_ns,
                         transform=tuple(src.transform), crs_wkt=src.crs.to_wkt() if src.crs else "",
                         sources=sources_stamp(src))
    looks = []
    for _ in range(2):
        started = time.perf_counter()
        raster.changed_beside()
        looks.append(time.perf_counter() - started)
    return (f"| {sheets:,} | {vrt.stat().st_size / 1e6:.0f} MB | {first:.2f} s | {grown:.0f} MB | "
            f"{np.median(times) * 1e3:.1f} ms | {looks[0]:.2f} s | {looks[1]:.2f} s | {opened:.2f} s | "
            f"{handle_mb:.0f} MB |")


def resident_mb() -> float:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2 ** 20


def sources_vrt(path: Path, raster: Path, side: int) -> tuple[Path, int]:
    """A VRT of `raster`'s pixels as sources of `side` px a side, each reading its own block of
    it (SimpleSource), and its sources a band."""
    with rasterio.open(raster) as src:
        width, height, crs, geotransform = src.width, src.height, src.crs.to_wkt(), src.transform.to_gdal()
        colours, dtype = [c.name.capitalize() for c in src.colorinterp], typename_fwd[dtype_rev[src.dtypes[0]]]
    blocks = [(c, r, min(side, width - c), min(side, height - r))
              for r in range(0, height, side) for c in range(0, width, side)]
    with open(path, "w") as out:
        out.write(f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{escape(crs)}</SRS>'
                  f'<GeoTransform>{", ".join(map(str, geotransform))}</GeoTransform>\n')
        for band, colour in enumerate(colours, 1):
            out.write(f'<VRTRasterBand dataType="{dtype}" band="{band}"><ColorInterp>{colour}</ColorInterp>\n')
            for c, r, w, h in blocks:
                out.write(f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(raster))}</SourceFilename>'
                          f'<SourceBand>{band}</SourceBand><SrcRect xOff="{c}" yOff="{r}" xSize="{w}" ySize="{h}"/>'
                          f'<DstRect xOff="{c}" yOff="{r}" xSize="{w}" ySize="{h}"/></SimpleSource>\n')
            out.write("</VRTRasterBand>\n")
        out.write("</VRTDataset>\n")
    return path, len(blocks)


def sources_rows(folder: Path, model, side: int) -> list[str]:
    """Table rows (--sources-px): the scene's GeoTIFF and the VRT of its pixels, each opened by
    GDAL and indexed at scale 1 in this process."""
    scene = load_asset_paths()["s2_rgb"]
    vrt, sources = sources_vrt(folder / f"sources-{side}.vrt", scene, side)
    rows = []
    for name, raster, count in (("the scene's GeoTIFF", scene, 1), (f"a VRT of {side} px sources", vrt, sources)):
        started = time.perf_counter()
        with rasterio.open(raster):
            opened = time.perf_counter() - started
        index = folder / f"index-sources-{count}"
        shutil.rmtree(index, ignore_errors=True)
        started = time.perf_counter()
        IndexWriter(index, model, SETTINGS).build([raster], computer=LocalChunks(model, processes=0))
        indexed = time.perf_counter() - started
        rows.append(f"| {name} | {count:,} | {Path(raster).stat().st_size / 1e6:.1f} MB | {opened:.2f} s | "
                    f"{len(TileIndex.open(index)):,} | {indexed:.1f} s |")
    return rows


def row(name: str, index: TileIndex, latency: dict) -> str:
    return (f"| {name} | {len(index.maps):,} | {len(index):,} | {latency['p50']:.0f} | {latency['p95']:.0f} | "
            f"{latency['shortlist']:.0f} | "
            f"{latency['refine']:.0f} | {latency['verify']:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rasters", type=int, default=1000, help="small rasters (0: skip this run)")
    parser.add_argument("--vrt-side", type=int, default=0, help="the scene repeated K by K as one VRT (0: skip)")
    parser.add_argument("--scan-tiles", default="", help="coarse scan alone at these tile counts (e.g. 19000,50000)")
    parser.add_argument("--sheets", default="", help="the gone-sheet check over VRTs of these sheet counts")
    parser.add_argument("--sources-px", type=int, default=0, help="the scene indexed as a VRT of sources this size")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--keep", type=Path, default=None, help="build here and keep (else a temporary folder)")
    args = parser.parse_args()
    indexes = args.rasters or args.vrt_side or args.sources_px
    model = load_model(device="cpu", sketch_modules="none") if indexes else None
    work = args.keep or Path(tempfile.mkdtemp(prefix="mosaic-scale-"))
    print("| mosaic | level maps | tiles | search p50 ms | p95 | shortlist | refine | verify |\n"
          "|---|---|---|---|---|---|---|---|")
    try:
        if args.rasters:
            chips = small_rasters(work / f"chips-{args.rasters}", args.rasters)
            for name, inputs in ((f"{args.rasters:,} rasters of {CHIP} px", chips),
                                 ("the same pixels as one VRT", [chips_vrt(work / f"chips-{args.rasters}.vrt", chips)])):
                folder = work / (f"index-chips-{args.rasters}" + ("" if len(inputs) > 1 else "-vrt"))
                IndexWriter(folder, model, SETTINGS).build(inputs)
                index = TileIndex.open(folder)
                print(row(name, index, search_latency(index, model, sketches(index, model, args.queries),
                                                      RankingConfig(ann="off"))), flush=True)
        if args.vrt_side:
            folder = work / f"index-repeated-{args.vrt_side}"
            started = time.perf_counter()
            IndexWriter(folder, model, SETTINGS).build([repeated_scene(work / "repeated", args.vrt_side)])
            indexed = time.perf_counter()
            index = TileIndex.open(folder)
            ann.build(index)
            print(f"indexed in {indexed - started:.0f} s (0 when kept), its ANN shortlist built in "
                  f"{time.perf_counter() - indexed:.0f} s", flush=True)
            queries = sketches(index, model, args.queries)
            for mode in ("off", "on"):
                name = f"one VRT, {args.vrt_side}x{args.vrt_side} scenes, " + ("exact" if mode == "off" else "ANN")
                print(row(name, index, search_latency(index, model, queries, RankingConfig(ann=mode))), flush=True)
        for tiles in (int(n) for n in args.scan_tiles.split(",") if n):
            print(f"coarse scan alone over the area of {tiles:,} tiles: {coarse_scan_seconds(tiles):.2f} s", flush=True)
        counts = [int(n) for n in args.sheets.split(",") if n]
        if counts:
            print("\n| sheets | .vrt | gone-sheet check: first read | its peak RSS grew | a search's check "
                  "(300 places, p50) | sources looked at: first | next | GDAL opens it (each reading thread) | "
                  "its handle holds |\n|---|---|---|---|---|---|---|---|---|")
        for sheets in counts:
            print(sheets_row(work, sheets), flush=True)
        if args.sources_px:
            print("\n| raster | sources a band | file | GDAL opens it | tiles | index run |\n|---|---|---|---|---|---|")
            for line in sources_rows(work, model, args.sources_px):
                print(line, flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
