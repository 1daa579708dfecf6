"""A VRT mosaic of two sheets of one real raster, and a sketch of a place on its eastern sheet,
for the searches of a mosaic missing a sheet (tests/test_search.py, tests/qgis/test_plugin.py).
The QGIS tests' Python has no rasterio: they run it as a script,
`python tests/two_sheets.py RASTER FOLDER`, which prints the mosaic's and the sketch's paths."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio

EAST_PLACE = ((150, 262), (320, 432))  # rows, cols of the raster: a place on the eastern sheet


def write_two_sheets(raster: Path, folder: Path) -> tuple[Path, Path]:
    """FOLDER/mosaic.vrt reading the western half of FOLDER/west.tif and the eastern half of
    FOLDER/east.tif (each a copy of `raster`), and FOLDER/sketch.png, a line drawing of a place
    on the eastern half."""
    from lab.pseudo_sketch import pseudo_sketch

    with rasterio.open(raster) as src:
        width, height, crs, geotransform = src.width, src.height, src.crs.to_wkt(), src.transform.to_gdal()
        place = src.read(window=EAST_PLACE)
    half = width // 2
    for sheet in ("west.tif", "east.tif"):
        shutil.copy(raster, folder / sheet)
    sources = "".join(f"""<SimpleSource><SourceFilename relativeToVRT="1">{name}</SourceFilename>
        <SourceBand>{{b}}</SourceBand><SrcRect xOff="{x}" yOff="0" xSize="{w}" ySize="{height}"/>
        <DstRect xOff="{x}" yOff="0" xSize="{w}" ySize="{height}"/></SimpleSource>"""
                      for x, w, name in ((0, half, "west.tif"), (half, width - half, "east.tif")))
    bands = "".join(f"""<VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{name}</ColorInterp>
        {sources.replace("{b}", str(b))}</VRTRasterBand>""" for b, name in ((1, "Red"), (2, "Green"), (3, "Blue")))
    mosaic = folder / "mosaic.vrt"
    mosaic.write_text(f"""<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{escape(crs)}</SRS>
        <GeoTransform>{", ".join(map(str, geotransform))}</GeoTransform>{bands}</VRTDataset>""")
    sketch = folder / "sketch.png"
    pseudo_sketch(np.moveaxis(place, 0, -1), "canny").save(sketch)
    return mosaic, sketch


if __name__ == "__main__":
    print(*write_two_sheets(Path(sys.argv[1]), Path(sys.argv[2])))
