"""Tiling real rasters: windows, footprints in both CRSs, bands, 16-bit stretch, nodata, bad files,
and what a tile's line drawing leaves out (nodata, featureless water)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.warp
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.warp import transform_bounds
from rasterio.windows import bounds as window_bounds

from conftest import write_raster
from worker.errors import InputError
from worker.geo import bounds_wgs84
from worker.line_drawing import TILE_EDGE_SIGMA, edge_map, tile_line_drawings
from lab.pseudo_sketch import has_lines
from worker.tiling import Tile, TileReader, TileSettings, find_rasters, open_raster, open_rasters, plan_tiles


def test_tiles_cover_the_raster_and_footprints_match_rasterio(assets):
    info = open_raster(assets["s2_rgb"], None)
    tiles = plan_tiles(info, TileSettings(scales=(1, 2)))
    ones = [t for t in tiles if t.scale == 1]
    assert max(t.col_off + t.width for t in ones) == info.width  # flush with the far edge
    assert max(t.row_off + t.height for t in ones) == info.height
    with rasterio.open(assets["s2_rgb"]) as src:
        for tile in tiles[:: max(1, len(tiles) // 7)]:
            expected = window_bounds(tile.window, src.transform)
            assert np.allclose(tile.footprint().bounds, expected)
            lon_lat = transform_bounds(src.crs, "EPSG:4326", *expected, densify_pts=21)
            assert np.allclose(bounds_wgs84([tile])[0], lon_lat, atol=1e-6)


def test_natural_colour_bands_come_from_colour_interpretation(assets):
    assert open_raster(assets["s2_rgb"], None).bands == (1, 2, 3)


def test_single_band_float_raster_is_replicated_and_stretched_without_nodata(assets):
    info = open_raster(assets["lsat7_10"], None)
    assert info.bands == (1, 1, 1)
    (lo, hi), = set(info.stretch)
    assert -99999.0 < lo < hi  # the nodata value -99999 did not enter the percentiles


def test_multiband_raster_without_colour_interpretation_needs_bands(tmp_path, assets):
    """Refused, saying both ways in: --bands for an index of such rasters, and, beside rasters of
    other bands (an index keeps its bands: --bands alone was a dead end there), its colours named
    in it (as gdal_edit.py does: here with rasterio, which every machine running this has), which is
    then enough."""
    import re
    import shlex

    from rasterio.enums import ColorInterp

    with rasterio.open(assets["s2_rgb"]) as src:
        data = src.read(window=((0, 64), (0, 64)))
        profile = {"crs": src.crs, "transform": src.transform}
    path = write_raster(tmp_path / "four.tif", np.concatenate([data, data[:1]]), **profile)
    with pytest.raises(InputError, match="--bands R,G,B") as refused:
        open_raster(path, None)
    assert open_raster(path, (3, 2, 1)).bands == (3, 2, 1)
    advice = re.search(r"gdal_edit.py -colorinterp_R red -colorinterp_G green -colorinterp_B blue (\S+)",
                       str(refused.value))
    assert advice and shlex.split(advice.group(1)) == [str(path)], str(refused.value)
    with rasterio.open(path, "r+") as named:
        named.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
    assert open_raster(path, None).bands == (3, 2, 1)
    with pytest.raises(InputError, match="band\\(s\\) \\[7\\]"):
        open_raster(path, (7, 2, 1))


def test_a_two_band_raster_is_read_as_grey_when_its_first_band_is_named_grey(tmp_path, assets, caplog):
    """Grey and a band of its own ([gray, undefined]: a quality band, SAR's second polarisation):
    it was refused, and a folder's whole run with it, told to name red, green and blue in it,
    which two bands cannot (a probe's). Its first band is read as grey, saying so; two bands of
    no colour are refused, told to name the first one grey, which is then enough."""
    import re
    import shlex

    from rasterio.enums import ColorInterp

    with rasterio.open(assets["s2_rgb"]) as src:
        data = src.read(window=((0, 64), (0, 64)))[:2]
        profile = {"crs": src.crs, "transform": src.transform}
    path = write_raster(tmp_path / "two.tif", data, **profile)
    with rasterio.open(path, "r+") as named:
        named.colorinterp = [ColorInterp.gray, ColorInterp.undefined]
    assert open_raster(path, None).bands == (1, 1, 1)
    assert "two.tif: 2 bands, the first named grey: read as grey, band 2 (undefined) not drawn" in caplog.text
    bands = "".join(f'<VRTRasterBand dataType="UInt16" band="{b}"><ColorInterp>Undefined</ColorInterp><SimpleSource>'
                    f'<SourceFilename relativeToVRT="1">two.tif</SourceFilename><SourceBand>{b}</SourceBand>'
                    '</SimpleSource></VRTRasterBand>' for b in (1, 2))
    vrt = tmp_path / "two.vrt"  # a GeoTIFF's first band of two reads as grey: named otherwise in a VRT
    vrt.write_text(f'<VRTDataset rasterXSize="64" rasterYSize="64"><SRS>{profile["crs"].to_wkt()}</SRS>'
                   f'<GeoTransform>{", ".join(map(str, profile["transform"].to_gdal()))}</GeoTransform>{bands}</VRTDataset>')
    with pytest.raises(InputError, match="cannot tell which of its 2 bands") as refused:
        open_raster(vrt, None)
    advice = re.search(r"gdal_edit.py -colorinterp_1 gray (\S+)$", str(refused.value))
    assert advice and shlex.split(advice.group(1)) == [str(vrt)], str(refused.value)
    with rasterio.open(vrt, "r+") as named:  # as that advice does
        named.colorinterp = [ColorInterp.gray, ColorInterp.undefined]
    assert open_raster(vrt, None).bands == (1, 1, 1)


def test_a_paletted_raster_is_read_through_its_colour_table(tmp_path, assets):
    """A palette's band holds indices of colours (a scanned map, a classification, an image
    stored with a palette): drawn as greys its colours were lost, and it was refused. It is read
    through its table: a tile and a searched place look as the image does, colours are never
    mixed by averaging indices (the mean of two classes' numbers is a third class), and an entry
    of alpha 0 is no data. Bands asked for are read as they are."""
    from PIL import Image

    from worker.placement import Placement

    with rasterio.open(assets["rmnp_rgb"]) as src:
        rgb, profile = src.read(), {"crs": src.crs, "transform": src.transform}
    quantized = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).quantize(64)
    indices, table = np.asarray(quantized), np.asarray(quantized.getpalette()[:192], np.uint8).reshape(64, 3)
    clear = int(np.bincount(indices.ravel()).argmax())  # the commonest colour: no data (a PNG's palette has alpha)
    paletted = write_raster(tmp_path / "paletted.png", indices[None], driver="PNG", **profile)
    with rasterio.open(paletted, "r+") as dst:
        dst.write_colormap(1, {i: (*map(int, c), 0 if i == clear else 255) for i, c in enumerate(table)})
    info, natural = open_raster(paletted, None), open_raster(assets["rmnp_rgb"], None)
    assert (info.palette, info.bands, info.stretch) == (True, (1, 1, 1), None)
    colours = {tuple(c) for i, c in enumerate(table) if i != clear}
    for col, row, side, scale in ((0, 0, 224, 1), (130, 70, 448, 2)):
        with TileReader(info, 224) as reader, TileReader(natural, 224) as original:
            (image, valid), (seen, _) = (r.read(Tile(r.raster, col, row, side, side, scale)) for r in (reader, original))
        assert {tuple(c) for c in image[valid]} <= colours, "only the table's colours, none averaged"
        if scale == 1:
            assert np.array_equal(valid, indices[row:row + side, col:col + side] != clear), "alpha 0 is no data"
        assert np.abs(image[valid].astype(int) - seen[valid]).mean() < 25, "the image's colours (its indices as greys: about 70 off)"
    place = dict(cx=300.5, cy=260.0, side=300.0, angle=10.0)
    (image, valid), (seen, _) = (Placement(r, **place).read(224) for r in (info, natural))
    assert valid.mean() > 0.3 and np.abs(image[valid].astype(int) - seen[valid]).mean() < 12
    assert not open_raster(paletted, (1,)).palette
    no_table = tmp_path / "no_table.vrt"  # a band said to be paletted, with no colour table: read as grey
    no_table.write_text(f"""<VRTDataset rasterXSize="{info.width}" rasterYSize="{info.height}">
  <SRS>{info.crs_wkt.replace('"', '&quot;')}</SRS><GeoTransform>{", ".join(map(str, info.affine.to_gdal()))}</GeoTransform>
  <VRTRasterBand dataType="Byte" band="1"><ColorInterp>Palette</ColorInterp>
    <SimpleSource><SourceFilename>{paletted}</SourceFilename><SourceBand>1</SourceBand></SimpleSource>
  </VRTRasterBand></VRTDataset>""")
    grey = open_raster(no_table, None)
    assert (grey.palette, grey.bands) == (False, (1, 1, 1))
    with TileReader(grey, 224) as reader:
        image, _ = reader.read(Tile(grey, 0, 0, 224, 224, 1))
    assert np.array_equal(image[..., 0], image[..., 1])


def test_grey_with_alpha_is_read_as_grey(tmp_path, assets):
    """Grey with an alpha band is grey, the alpha its mask."""
    with rasterio.open(assets["rmnp_rgb"]) as src:
        grey, profile = src.read(1)[None], {"crs": src.crs, "transform": src.transform}
    with_alpha = write_raster(tmp_path / "grey_alpha.tif", np.concatenate([grey, np.full_like(grey, 255)]), **profile)
    with rasterio.open(with_alpha, "r+") as dst:
        dst.colorinterp = [ColorInterp.gray, ColorInterp.alpha]
    assert open_raster(with_alpha, None).bands == (1, 1, 1)


def test_rasters_opened_together_refuse_as_one_at_a_time_would_and_all_at_once(tmp_path, assets):
    """Opened in threads, a run's rasters describe themselves as one at a time would, and every
    one refused is said in the order given, in one error (a folder of sheets with three bad
    files took three runs to find them)."""
    from worker.errors import MAX_SAID

    with rasterio.open(assets["rmnp_rgb"]) as src:
        data, transform = src.read(), src.transform
    no_crs = write_raster(tmp_path / "nocrs.tif", data, transform=transform)
    missing, fake = tmp_path / "missing.tif", tmp_path / "fake.tif"
    fake.write_text("not a raster")
    good = [assets["s2_rgb"], assets["rmnp_rgb"], assets["osbs_rgb"]]
    assert open_rasters(good, None, threads=3) == [open_raster(p, None) for p in good]
    with pytest.raises(InputError, match="nocrs.tif.*has no CRS") as one:
        open_rasters([*good, no_crs], None, threads=4)
    assert "refused" not in str(one.value), "one refusal: said as it is"
    with pytest.raises(InputError, match=r"^3 of the 6 rasters are refused, so none was indexed: \(1\) .*missing.tif.*"
                                         r" \(2\) .*fake.tif.* \(3\) .*nocrs.tif.*has no CRS"):
        open_rasters([missing, good[0], fake, *good[1:], no_crs], None, threads=4)
    gone = [tmp_path / f"gone-{i}.tif" for i in range(MAX_SAID + 2)]
    with pytest.raises(InputError, match=f"gone-{MAX_SAID - 1}.tif[^;]*; and 2 more$"):
        open_rasters(gone, None, threads=2)


def test_crs_less_raster_is_refused_with_what_to_do(tmp_path, assets):
    from PIL import Image
    from rasterio.control import GroundControlPoint

    with rasterio.open(assets["rmnp_rgb"]) as src:
        data, transform, crs = src.read(), src.transform, src.crs
    path = write_raster(tmp_path / "nocrs.tif", data, transform=transform)
    with pytest.raises(InputError, match="has no CRS.*gdal_edit"):
        open_raster(path, None)
    # a PNG placed by a world file, a .prj beside it: gdal_edit.py fails on a PNG ("does not support update
    # access"), and GDAL does not read the .prj
    picture = tmp_path / "scan.png"
    Image.fromarray(data.transpose(1, 2, 0)).save(picture)
    (tmp_path / "scan.pgw").write_text("\n".join(map(str, [transform.a, 0, 0, transform.e, transform.c, transform.f])))
    (tmp_path / "scan.prj").write_text(crs.to_wkt())
    with pytest.raises(InputError, match=r"has no CRS.*cannot write one into a PNG file \(GDAL does not read the CRS "
                                         r"of scan.prj beside it\): make a GeoTIFF copy that has one \(gdal_translate "
                                         r"-a_srs EPSG:XXXX .*scan.png copy.tif\)"):
        open_raster(picture, None)
    gcps = [GroundControlPoint(row, col, *(transform * (col, row))) for row, col in ((0, 0), (0, 200), (200, 0))]
    placed = write_raster(tmp_path / "gcps.tif", data, gcps=gcps, crs=crs)  # a scene as delivered: no map grid yet
    with pytest.raises(InputError, match="ground control points.*gdalwarp"):
        open_raster(placed, None)


def test_a_raster_whose_crs_does_not_fit_its_coordinates_is_refused_with_what_to_do(tmp_path, assets):
    """A CRS assigned in error: a UTM grid in metres tagged as lon/lat (its hits would lie at
    latitude 4,500,000, outside every map view), or a grid past where its projection is
    defined. Lon/lat past 180 (0..360 grids) or half a pixel past a pole is fine."""
    from rasterio.transform import from_origin

    pixels = np.zeros((3, 40, 40), np.uint8)
    pixels[:, 10:30, 10:30] = 200
    wgs84, utm = CRS.from_epsg(4326), CRS.from_epsg(32613)
    metres_as_degrees = write_raster(tmp_path / "a.tif", pixels, crs=wgs84, transform=from_origin(400_000, 4_500_000, 30, 30))
    with pytest.raises(InputError, match="not longitudes and latitudes.*gdal_edit"):
        open_raster(metres_as_degrees, None)
    beyond = write_raster(tmp_path / "b.tif", pixels, crs=utm, transform=from_origin(1e12, 4_500_000, 30, 30))
    with pytest.raises(InputError, match="outside where its CRS is defined.*gdal_edit"):
        open_raster(beyond, None)
    for name, transform in (("pacific", from_origin(170.0, -10.0, 0.5, 0.5)), ("pole", from_origin(-180.05, 90.05, 0.1, 0.1))):
        open_raster(write_raster(tmp_path / f"{name}.tif", pixels, crs=wgs84, transform=transform), None)
    # the whole world in Mollweide: its corners lie in the blank beyond the Earth, its centre on it
    world = from_origin(-18_040_095, 9_020_047, 902_004.75, 451_002.35)
    open_raster(write_raster(tmp_path / "world.tif", pixels, crs=CRS.from_string("ESRI:54009"), transform=world), None)


def test_a_grid_turned_or_mirrored_against_its_map_is_refused_with_what_to_do(tmp_path, assets):
    """South up (columns running north), east-west flipped and transposed (said as south up: the
    probe's), turned a quarter, tilted 20 degrees: a sketch drawn on the north-up map never met
    the place in such a grid. A grid turned half a degree is taken as it
    is, a north-up VRT of a refused one, as the message advises, is indexable, and a grid in a
    CRS whose axes run west and south is judged by where they run."""
    import rasterio.shutil
    from rasterio.transform import Affine
    from rasterio.vrt import WarpedVRT

    with rasterio.open(assets["rmnp_rgb"]) as src:
        pixels, crs, (x, y), r = src.read(), src.crs, (src.transform.c, src.transform.f), src.transform.a
    south_up = Affine(r, 0, x, 0, r, y - r * pixels.shape[1])
    mirrored = "mirrored: its rows run {} and its columns {} \\(north up: east and south\\)"
    turned = {"south_up": (south_up, mirrored.format("east", "north")),
              "east_west": (Affine(-r, 0, x + r * pixels.shape[2], 0, -r, y), mirrored.format("west", "south")),
              "transposed": (Affine(0, r, x, -r, 0, y), mirrored.format("south", "east")),
              "quarter": (Affine(0, -r, x, -r, 0, y), "turned -90.0"),
              "tilted": (Affine.translation(x, y) * Affine.rotation(20) * Affine.scale(r, -r), "turned 20.0"),
              # said "turned 0.0 degrees": the rows' angle, where the columns' is the one past the limit
              "sheared": (Affine.translation(x, y) * Affine.shear(10, 0) * Affine.scale(r, -r),
                          "sheared \\(its rows run 0.0 degrees from east, its columns -?10.0 from south\\)")}
    for name, (transform, how) in turned.items():
        path = write_raster(tmp_path / f"{name}.tif", pixels, crs=crs, transform=transform)
        with pytest.raises(InputError, match=f"{how} degrees against its map.*gdalwarp -of VRT" if "turned" in how
                           else f"{how}.*gdalwarp -of VRT"):
            open_raster(path, None)
    slightly = Affine.translation(x, y) * Affine.rotation(0.5) * Affine.scale(r, -r)
    open_raster(write_raster(tmp_path / "slightly.tif", pixels, crs=crs, transform=slightly), None)
    lo19 = CRS.from_epsg(2048)  # South African Lo19: x grows west, y south; north up is x falling, y growing
    (x0,), (y0,) = rasterio.warp.transform(CRS.from_epsg(4326), lo19, [18.9], [-33.9])
    open_raster(write_raster(tmp_path / "lo19.tif", pixels, crs=lo19, transform=Affine(-30, 0, x0, 0, 30, y0)), None)
    with pytest.raises(InputError, match="turned"):  # the same grid turned half round on the ground
        turned = Affine(30, 0, x0, 0, -30, y0)
        open_raster(write_raster(tmp_path / "lo19_turned.tif", pixels, crs=lo19, transform=turned), None)
    with rasterio.open(tmp_path / "south_up.tif") as src, WarpedVRT(src) as north_up:
        rasterio.shutil.copy(north_up, tmp_path / "north_up.vrt", driver="VRT")
    assert open_raster(tmp_path / "north_up.vrt", None).width == pixels.shape[2]


def test_crs_without_epsg_code_is_indexable(assets):
    info = open_raster(assets["lsat7_10"], None)
    assert CRS.from_wkt(info.crs_wkt).to_epsg(confidence_threshold=100) is None  # "unnamed" projection
    tile = plan_tiles(info, TileSettings(scales=(1,)))[0]
    assert np.isfinite(bounds_wgs84([tile])).all()


def test_corrupt_raster_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(InputError, match="not a readable raster"):
        open_raster(path, None)
    with pytest.raises(InputError, match="raster not found: [^ ]*missing.tif'$"):
        find_rasters([tmp_path / "missing.tif"])


def test_a_raster_whose_name_is_not_utf8_is_refused_saying_so(tmp_path, assets):
    """A Latin-1 file name (from an old share or archive): rasterio hands GDAL names as UTF-8,
    and an index run of its folder failed with a UnicodeEncodeError traceback (a probe's
    finding). It is refused as the others are, named by its bytes, with what to do."""
    folder = tmp_path / "sheets"
    folder.mkdir()
    latin1 = os.fsdecode(bytes(folder) + b"/K\xfcste.tif")  # "Küste" in Latin-1
    shutil.copy(assets["rmnp_rgb"], latin1)
    with pytest.raises(InputError) as refused:
        open_rasters(find_rasters([folder]), None)
    assert str(refused.value) == (f"{folder}/K\\xfcste.tif: its name is not UTF-8, which GDAL reads names as: rename "
                                  "the file or folder (e.g. convmv -f latin1 -t utf-8 --notest NAME)")


def test_a_pattern_that_matched_nothing_and_a_folder_without_rasters_are_said(tmp_path, assets, caplog):
    """A shell passes on a pattern that matched no file as it is ('raster not found: zzz*.tif'),
    and a folder given beside rasters that holds none was left out without a word."""
    with pytest.raises(InputError, match=r"zzz\*.tif. \(a pattern that matched no file\?\)"):
        find_rasters([tmp_path / "zzz*.tif"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no rasters here")
    assert find_rasters([assets["rmnp_rgb"], tmp_path / "notes"]) == [assets["rmnp_rgb"]]
    assert any(f"'{tmp_path / 'notes'}' holds no raster files" in r.message for r in caplog.records)


def test_16bit_with_nodata_skips_empty_tiles_and_stretches_the_rest(tmp_path, assets):
    with rasterio.open(assets["s2_rgb"]) as src:
        data = src.read(window=((0, 448), (0, 448)))
        profile = {"crs": src.crs, "transform": src.transform}
    data[:, :, 224:] = 0  # right half: nodata
    path = write_raster(tmp_path / "nodata.tif", data, nodata=0, **profile)
    info = open_raster(path, None)
    assert info.stretch is not None and all(lo < hi for lo, hi in info.stretch)
    tiles = plan_tiles(info, TileSettings(overlap=0.0, scales=(1,)))
    with TileReader(info, 224) as reader:
        valid = {(t.col_off, t.row_off): reader.read(t)[1].mean() for t in tiles}
        image, _ = reader.read(tiles[0])
    assert valid[(0, 0)] == 1.0 and valid[(224, 0)] == 0.0
    assert image.dtype == np.uint8 and image.std() > 10  # real contrast after the stretch


def test_a_dark_8bit_raster_is_stretched_and_drawn_with_its_places_lines(tmp_path, assets):
    """8-bit pixels put into 30 + v/4 (a dark scene, 58 levels): drawn as they were, most of its
    lines fell under the drawing's contrast floor (a third of the full-range scene's lines were
    drawn, and recall@5 fell from 1.00 to 0.66: lab/narrow_range). It is stretched as 16-bit data
    is, and draws most of them (0.83); the full-range scene is drawn as before, unstretched."""
    from scipy import ndimage

    with rasterio.open(assets["rmnp_rgb"]) as src:
        data, profile = src.read(), {"crs": src.crs, "transform": src.transform}
    full = open_raster(assets["rmnp_rgb"], None)
    dark = open_raster(write_raster(tmp_path / "dark.tif", np.round(data * 0.25 + 30).astype(np.uint8), **profile),
                       None)
    assert full.stretch is None and dark.stretch is not None and all(30 <= lo < hi <= 94 for lo, hi in dark.stretch)
    darker = np.round(data * 0.25 + 30).astype(np.uint8)
    darker[:, :, :300] = 0  # a nodata collar over its west, in a striped file (a strip spans the raster)
    collar = open_raster(write_raster(tmp_path / "collar.tif", darker, nodata=0, **profile), None)
    assert collar.stretch is not None, "its windows lay in the collar, at the strips' start"
    tiles = plan_tiles(full, TileSettings(tile=128, overlap=0.0, scales=(1,)))

    def lines(info):
        with TileReader(info, 224) as reader:
            reads = [reader.read(t) for t in tiles]
        return tile_line_drawings(np.stack([i for i, _ in reads]), np.stack([v for _, v in reads]))[..., 0] < 128

    seen, drawn = lines(full), lines(dark)
    kept = [(ndimage.binary_dilation(d, iterations=2) & s).sum() / s.sum() for s, d in zip(seen, drawn)]
    assert np.median(kept) >= 0.7 and drawn.sum() >= 0.7 * seen.sum(), (np.median(kept), drawn.sum() / seen.sum())


def test_a_dark_8bit_raster_cut_short_opens_and_an_indexed_one_keeps_its_recorded_stretch(tmp_path, assets):
    """A dark 8-bit GeoTIFF cut short (a bad copy): its windows told it narrow, and the stretch's
    read over the whole raster met the damage, so the raster, and a folder or mosaic holding it,
    was refused whole (a probe's); its damage is met where its tiles are read, as any raster's.
    A raster an index recorded, unchanged since, takes the record's stretch and is not read for
    it again (every index run opens every raster it is given)."""
    from dataclasses import replace

    from worker.errors import RasterReadError

    with rasterio.open(assets["rmnp_rgb"]) as src:
        dark = np.tile(np.round(src.read() * 0.25 + 30).astype(np.uint8), (1, 4, 4))
        profile = {"crs": src.crs, "transform": src.transform}
    path = write_raster(tmp_path / "dark.tif", dark, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                        **profile)
    whole = open_raster(path, None)
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * 0.95))
    cut = open_raster(path, None)
    assert cut.stretch is not None and np.allclose(cut.stretch, whole.stretch, atol=2)
    with pytest.raises(RasterReadError):  # the damage, where the tiles are read
        with TileReader(cut, 224) as reader:
            for tile in plan_tiles(cut, TileSettings(scales=(1,))):
                reader.read(tile)
    recorded = replace(cut, stretch=((1.0, 2.0),) * 3)
    assert open_raster(path, None, recorded=recorded).stretch == recorded.stretch
    changed = replace(recorded, mtime_ns=recorded.mtime_ns - 1)  # the file written since it was recorded
    assert open_raster(path, None, recorded=changed).stretch == cut.stretch


def test_a_narrow_8bit_raster_whose_windows_hold_a_sliver_of_data_is_stretched_from_the_whole(tmp_path):
    """Data from 30 to 90 between the sample windows' columns, and a strip of 6 px of 30 inside
    one of them (a collar's edge): the windows' few pixels gave a stretch of (30, 31), and the
    raster was drawn saturated for the life of its index (a review's)."""
    from rasterio.transform import from_origin

    data = np.zeros((1, 512, 2048), np.uint8)  # nodata 0; windows of 256 px start at 0, 597, 1194 and 1792
    data[0, :, 256:590] = np.linspace(30, 90, 334).round().astype(np.uint8)
    data[0, :, 250:256] = 30
    path = write_raster(tmp_path / "sliver.tif", data, nodata=0, crs="EPSG:32632",
                        transform=from_origin(500_000, 5_000_000, 10, 10))
    (low, high), = set(open_raster(path, None).stretch)
    assert low == pytest.approx(31, abs=1.5) and high == pytest.approx(89, abs=1.5)


def test_where_the_data_ends_is_not_drawn_as_a_line(tmp_path, assets):
    """A tilted nodata collar, as Landsat scenes have: the tile's drawing keeps the land's lines
    and draws nothing along the collar (nodata was drawn as a black shore before)."""
    with rasterio.open(assets["s2_rgb"]) as src:
        data = src.read(window=((600, 824), (600, 824)))
        profile = {"crs": src.crs, "transform": src.transform}
    rows, cols = np.mgrid[:224, :224]
    collar = cols > 150 - 0.3 * rows
    data[:, collar] = 0
    path = write_raster(tmp_path / "collar.tif", data, nodata=0, **profile)
    info = open_raster(path, None)
    with TileReader(info, 224) as reader:
        image, valid = reader.read(plan_tiles(info, TileSettings(scales=(1,)))[0])
    assert np.array_equal(valid, ~collar)
    ink = tile_line_drawings(image[None], valid[None])[0, ..., 0] < 128
    blind = tile_line_drawings(np.where(valid[..., None], image, 0)[None])[0, ..., 0] < 128
    distance_to_collar = np.abs(cols - (150 - 0.3 * rows)) / np.hypot(1, 0.3)
    near = distance_to_collar < 4
    assert blind[near].mean() > 0.3  # black fill without the mask: a line along the collar
    assert ink[near].mean() < 0.1  # only the lines that run into the collar (measured 0.055)
    assert ink[valid & ~near].mean() > 0.01  # the land is still drawn


def test_open_water_is_not_drawn_but_land_keeps_its_lines(assets):
    """Canny's quantile thresholds draw a tenth of any tile's pixels as edges, so open water drew
    its sun glint as lines and matched every sketch a little. The contrast floor leaves it blank.
    Two windows of the real Sentinel-2 scene: open water (measured 5.2% edge pixels without the
    floor, 0.01% with it) and fields and roads (4.2% either way)."""
    info = open_raster(assets["s2_rgb"], None)
    with TileReader(info, 224) as reader:
        water, water_valid = reader.read(Tile(info, 1232, 1008, 224, 224, 1))
        land, land_valid = reader.read(Tile(info, 112, 448, 224, 224, 1))
    assert edge_map(water, TILE_EDGE_SIGMA, water_valid, floor=0).mean() > 0.03
    assert edge_map(water, TILE_EDGE_SIGMA, water_valid).mean() < 0.002
    assert not has_lines(water, water_valid) and has_lines(land, land_valid)
    before = edge_map(land, TILE_EDGE_SIGMA, land_valid, floor=0)
    after = edge_map(land, TILE_EDGE_SIGMA, land_valid)
    assert after.mean() > 0.03 and (after & before).sum() > 0.9 * before.sum()


def _real_tiles(assets, names=("s2_rgb", "lsat7_rgb", "osbs_rgb", "rmnp_rgb"), per_raster=6):
    """(B, 224, 224, 3) tiles and their valid masks from several real rasters, nodata included."""
    images, masks = [], []
    for name in names:
        info = open_raster(assets[name], None)
        tiles = plan_tiles(info, TileSettings(scales=(1,)))
        with TileReader(info, 224) as reader:
            for tile in tiles[:: max(1, len(tiles) // per_raster)][:per_raster]:
                image, valid = reader.read(tile)
                images.append(image)
                masks.append(valid)
    return np.stack(images), np.stack(masks)


def test_batched_drawing_draws_what_scikit_images_canny_draws(assets):
    """The batched torch Canny follows scikit-image's rules, so its edges are scikit-image's
    up to float rounding: measured 8 of about 90,000 edge pixels differ over 57 tiles."""
    from scipy import ndimage
    from skimage.feature import canny
    from skimage.morphology import skeletonize

    from worker.line_drawing import CONTRAST_FLOOR, CONTRAST_SIGMA, EDGE_QUANTILES, edge_maps

    images, masks = _real_tiles(assets)
    drawn = edge_maps(images, TILE_EDGE_SIGMA, masks)
    greys = images.astype(np.float32).mean(-1) / 255
    reference = np.stack([
        skeletonize(canny(grey, sigma=TILE_EDGE_SIGMA, low_threshold=EDGE_QUANTILES[0],
                          high_threshold=EDGE_QUANTILES[1], use_quantiles=True, mask=None if valid.all() else valid)
                    & (ndimage.gaussian_gradient_magnitude(grey, CONTRAST_SIGMA) >= CONTRAST_FLOOR))
        for grey, valid in zip(greys, masks)])
    assert reference.sum() > 0.02 * reference.size  # real lines to compare
    assert (drawn != reference).sum() <= 1e-3 * reference.sum()
    whole = masks.all(axis=(1, 2))
    assert 0 < whole.sum() < len(whole)  # tiles with nodata and tiles without
    alone = edge_maps(images[whole], TILE_EDGE_SIGMA, masks[whole])  # a batch without nodata: one normaliser
    assert (alone != reference[whole]).sum() <= 1e-3 * reference[whole].sum()


def test_a_place_across_the_antimeridian_keeps_its_footprint(tmp_path):
    """A raster across 180 degrees (here in EPSG:3832, Mercator centred on the Pacific): a hit's
    footprint in lon/lat or web Mercator stays the small square it is, not a band round the world
    (its western corners are moved one world east, where GIS software draws them)."""
    from rasterio.transform import from_origin

    from worker.geo import reproject_rings
    from worker.placement import Placement

    pacific = CRS.from_epsg(3832)
    x180 = float(rasterio.warp.transform(CRS.from_epsg(4326), pacific, [180.0], [-17.0])[0][0])
    data = np.random.default_rng(0).integers(0, 255, (3, 200, 200), dtype=np.uint8)
    path = write_raster(tmp_path / "fiji.tif", data, crs=pacific, transform=from_origin(x180 - 50_000, -1_900_000, 500, 500))
    across = Placement(open_raster(path, None), cx=100.0, cy=100.0, side=100.0)  # 50 km, on the antimeridian
    wgs84, mercator = reproject_rings([across], CRS.from_epsg(4326))[0], reproject_rings([across], CRS.from_epsg(3857))[0]
    assert wgs84.is_valid and wgs84.bounds[0] < 180 < wgs84.bounds[2] and wgs84.bounds[2] - wgs84.bounds[0] < 1
    assert mercator.is_valid and mercator.bounds[2] - mercator.bounds[0] < 100_000


def test_footprints_of_many_placements_are_each_ones_own(assets):
    """Rings computed for many placements at once (a search reprojects hundreds) are each one's
    own: turned about its own centre and placed by its own raster's affine, whichever rasters
    share the list; an empty list has none."""
    import math
    from dataclasses import replace

    from worker.placement import Placement
    from worker.tiling import EDGE_POINTS

    a = open_raster(assets["rmnp_rgb"], None)
    b = replace(a, transform=(30.0, 0.0, 5000.0, 0.0, -30.0, 9000.0, *a.transform[6:]))
    placements = [Placement(r, 100.0 + 17 * i, 80.0 + 9 * i, 60.0 + 11 * i, angle)
                  for i, (r, angle) in enumerate([(a, 0.0), (b, 12.5), (a, -9.0), (b, 90.0), (a, 3.0)])]
    rings = Placement.rings(placements)
    for p, ring in zip(placements, rings):
        h, t = p.side / 2, math.radians(p.angle)
        corners = [(p.cx + u * math.cos(t) + v * math.sin(t), p.cy - u * math.sin(t) + v * math.cos(t))
                   for u, v in ((-h, -h), (h, -h), (h, h), (-h, h))]
        steps = np.arange(EDGE_POINTS) / EDGE_POINTS
        pixels = [np.add(corners[k], np.subtract(corners[(k + 1) % 4], corners[k]) * s) for k in range(4) for s in steps]
        cols, rows = np.array(pixels + [corners[0]]).T
        np.testing.assert_allclose(ring, np.column_stack(p.raster.affine * (cols, rows)), rtol=0, atol=1e-6)
    assert Placement.rings([]).shape == (0, 4 * EDGE_POINTS + 1, 2)


def test_tiles_drawn_in_one_batch_are_drawn_as_each_alone(assets):
    """Hysteresis and the skeleton run over the whole batch at once: no line may cross from one
    tile into its neighbour in the batch, nor a tile's quantiles depend on the others."""
    images, masks = _real_tiles(assets, per_raster=3)
    together = tile_line_drawings(images, masks)
    alone = np.concatenate([tile_line_drawings(images[i:i + 1], masks[i:i + 1]) for i in range(len(images))])
    assert np.array_equal(together, alone)


def test_a_sparse_band_the_first_overview_misses_is_stretched_from_a_finer_one(tmp_path):
    """A 6000 px 16-bit raster whose data is a strip of 4 rows that the 1024 px overview's rows
    pass between: before, the raster was refused ("no valid pixels"); an empty one must not stop
    a run, and a placeholder stretch would draw this strip saturated. A finer look finds it; an
    empty raster gets the placeholder."""
    from rasterio.transform import from_origin

    from worker.tiling import STRETCH_READ_PX, _valid_values, robust_stretch

    data = np.zeros((1, 6000, 6000), np.uint16)
    data[0, 2998:3002] = np.linspace(1000, 3000, 6000).astype(np.uint16)
    profile = {"crs": "EPSG:32617", "transform": from_origin(500000, 4000000, 1, 1), "nodata": 0,
               "compress": "deflate", "tiled": True}
    strip = write_raster(tmp_path / "strip.tif", data, **profile)
    empty = write_raster(tmp_path / "empty.tif", np.zeros_like(data), **profile)
    with rasterio.open(strip) as src:
        assert _valid_values(src, 1, STRETCH_READ_PX)[0].size == 0, "the strip lies between the overview's rows"
        (low, high), = robust_stretch(src, (1,))
    assert 1000 <= low < high <= 3000
    with rasterio.open(empty) as src:
        assert robust_stretch(src, (1,)) == ((0.0, 1.0),)


def test_a_folder_s_pictures_without_georeferencing_are_left_out_and_named_ones_refused(tmp_path, assets):
    """A delivery folder with its preview: the CRS-less thumbnail.png stopped the whole run ("has
    no CRS"), and only naming every other file got round it. A PNG or JPEG found in a folder
    with nothing beside it to place it (worldfile, .aux.xml, .prj) is left out, with a warning;
    one with a worldfile is indexed; one named on its own is still refused with what to do."""
    import shutil

    from PIL import Image

    folder = tmp_path / "delivery"
    folder.mkdir()
    scene = Path(shutil.copy(assets["rmnp_rgb"], folder / "scene.tif"))
    Image.new("RGB", (64, 64), "grey").save(folder / "thumbnail.png")
    Image.new("RGB", (64, 64), "grey").save(folder / "preview.JPG")
    with rasterio.open(scene) as src:
        profile = {"driver": "PNG", "width": src.width, "height": src.height, "count": 3, "dtype": "uint8",
                   "crs": src.crs, "transform": src.transform}
        with rasterio.open(folder / "placed.png", "w", WORLDFILE="YES", **profile) as dst:
            dst.write(src.read())
    assert find_rasters([folder]) == [(folder / "placed.png").resolve(), scene.resolve()]
    with pytest.raises(InputError, match="has no CRS"):
        open_raster(find_rasters([folder / "thumbnail.png"])[0], None)
    (folder / "scene.tif").unlink()
    (folder / "placed.png").unlink()
    with pytest.raises(InputError, match=r"no raster files in .*2 picture\(s\) without georeferencing left out"):
        find_rasters([folder])


def test_a_raster_in_a_local_engineering_crs_is_refused_as_such(tmp_path):
    """A site grid (LOCAL_CS) was told its corners lie outside where its CRS is defined."""
    path = write_raster(tmp_path / "site.tif", np.full((3, 64, 64), 100, np.uint8),
                        crs=CRS.from_wkt('LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],'
                                         'AXIS["Northing",NORTH]]'),
                        transform=rasterio.Affine(1, 0, 1000, 0, -1, 2000))
    with pytest.raises(InputError, match="local .engineering. one, not a map's.*the map CRS it was surveyed in"):
        open_raster(path, None)
