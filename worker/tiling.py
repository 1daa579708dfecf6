"""Rasters -> tiles: windows at several scales, footprints, and 8-bit RGB pixels for the model.

A tile is a value (raster, window, scale), never an index into a hidden list. Reading a tile
at scale s reads a window s times the tile size and lets GDAL decimate it to the tile size,
which uses overviews where the file has them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import shlex
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import rasterio.io
from rasterio.enums import ColorInterp, Resampling
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio._err import CPLE_BaseError  # GDAL's errors (rasterio.errors does not export it)
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window
from scipy import ndimage
from shapely.geometry import Polygon

from wire.protocol import MAX_TILE, MIN_TILE, excerpt
from worker.errors import InputError, RasterReadError, numbered
from worker.file_derived import FileDerived
from worker.raster_access import DRIVER_PREFIX, MAX_VRT_DEPTH, RasterAccess, is_vrt, local_file, source_path, vrt_sources

log = logging.getLogger(__name__)

RASTER_SUFFIXES = {".tif", ".tiff", ".jp2", ".vrt", ".img", ".png", ".jpg", ".jpeg", ".nc", ".hdf", ".ecw", ".sid", ".dem", ".bil"}
STRETCH_PERCENTILES = (2.0, 98.0)
EDGE_POINTS = 4  # points per footprint edge, so reprojected footprints follow curved edges
MAX_SCALE = 64  # a window of 64 tiles a side, read down to one tile
MAX_SCALES = 8


@dataclass(frozen=True)
class TileSettings:
    """How rasters are cut: recorded in the index manifest; an index is only extended alike."""

    tile: int = 224
    overlap: float = 0.25
    scales: tuple[int, ...] = (1, 2, 4)
    bands: tuple[int, ...] | None = None
    min_valid: float = 0.5  # tiles with less valid (non-nodata) area are skipped and counted

    def __post_init__(self) -> None:
        # said by what the setting is, the command line's option beside it: a plugin's user sets no options
        if not MIN_TILE <= self.tile <= MAX_TILE:
            raise InputError(f"tile size {excerpt(self.tile)} (--tile) must be {MIN_TILE} to {MAX_TILE} px")
        if not 0.0 <= self.overlap < 0.9:
            raise InputError(f"overlap {excerpt(self.overlap)} (--overlap) must be in [0, 0.9)")
        scales = list(self.scales)
        if not 1 <= len(scales) <= MAX_SCALES or len(set(scales)) != len(scales) or not all(
                1 <= s <= MAX_SCALE for s in scales):
            raise InputError(f"scales {excerpt(scales)} (--scales) must be 1 to {MAX_SCALES} different whole numbers "
                             f"between 1 and {MAX_SCALE} (e.g. 1,2,4)")
        if self.bands is not None and not (len(self.bands) in (1, 3) and all(b >= 1 for b in self.bands)):
            raise InputError(f"bands {excerpt(list(self.bands))} (--bands) must be 1 or 3 band numbers (R,G,B), "
                             "from 1")

    def to_json(self) -> dict:
        """As stored in manifests and job files (lists, not tuples, so stored and fresh compare equal)."""
        return {"tile": self.tile, "overlap": self.overlap, "scales": list(self.scales),
                "bands": list(self.bands) if self.bands else None, "min_valid": self.min_valid}

    @classmethod
    def from_json(cls, d: dict) -> "TileSettings":
        return cls(tile=d["tile"], overlap=d["overlap"], scales=tuple(d["scales"]),
                   bands=tuple(d["bands"]) if d["bands"] else None, min_valid=d["min_valid"])

    @property
    def step(self) -> int:
        return max(1, int(round(self.tile * (1.0 - self.overlap))))


@dataclass(frozen=True)
class RasterInfo:
    """What the index keeps about one raster: enough to read, locate and re-check it."""

    path: str
    size: int
    mtime_ns: int
    width: int
    height: int
    crs_wkt: str
    transform: tuple[float, ...]
    bands: tuple[int, ...]
    stretch: tuple[tuple[float, float], ...] | None  # per band (low, high); None for 8-bit of a wide range
    sources: tuple[int, ...] | None = None  # a VRT's: the files it reads (sources_stamp); None for other rasters
    palette: bool = False  # band 1 holds palette indices, read through its colour table (bands (1, 1, 1))

    def to_json(self) -> dict:
        out = {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns, "width": self.width,
               "height": self.height, "crs_wkt": self.crs_wkt, "transform": list(self.transform),
               "bands": list(self.bands), "stretch": [list(s) for s in self.stretch] if self.stretch else None}
        if self.sources:
            out["sources"] = list(self.sources)
        return {**out, "palette": True} if self.palette else out

    @classmethod
    def from_json(cls, d: dict) -> "RasterInfo":
        return cls(path=d["path"], size=d["size"], mtime_ns=d["mtime_ns"], width=d["width"], height=d["height"],
                   crs_wkt=d["crs_wkt"], transform=tuple(d["transform"]), bands=tuple(d["bands"]),
                   stretch=tuple(tuple(s) for s in d["stretch"]) if d["stretch"] else None,
                   sources=tuple(d["sources"]) if d.get("sources") else None, palette=bool(d.get("palette")))

    @property
    def read_bands(self) -> list[int]:
        """The bands a read asks of the file: a palette's one band once, others as drawn."""
        return [1] if self.palette else list(self.bands)

    @property
    def affine(self) -> rasterio.Affine:
        return rasterio.Affine(*self.transform[:6])

    @property
    def centre(self) -> tuple[float, float]:
        """Its middle in its CRS: where a point PROJ gives a world away belongs (geo.nearest_copy_x)."""
        return self.affine * (self.width / 2, self.height / 2)

    def file_changed(self) -> bool:
        """Whether the file itself (a VRT's .vrt) changed since it was described: one stat."""
        st = os.stat(self.path)
        return st.st_size != self.size or st.st_mtime_ns != self.mtime_ns

    def changed_beside(self) -> bool:
        """Whether what the file's own bytes do not hold changed since it was described: any file
        a VRT reads (not for VRTs recorded before their sources were), or the raster's grid (size,
        geotransform, CRS) where a side file can hold it (a worldfile, .prj or .aux.xml beside a
        PNG, JPEG or JPEG 2000: georeferenced again there, the raster was "unchanged", indexing
        it again did nothing, and its hits were drawn where it no longer lies). One GDAL open (a
        VRT's once for each state of its .vrt, a stat a source each time), none for a raster with
        no such file beside it; the side files' times are not looked at,
        since QGIS rewrites an .aux.xml when it shows a raster."""
        if self.sources is not None:  # a mosaic's .vrt read anew only once it changes: 2 s for 50,000 sheets
            files, (width, height, transform, crs) = _vrt_as_opened(self.path)
            return self._sources_differ(vrt_stamp(files)) or not self.same_grid(width, height, transform, crs)
        if not _georeferenced_beside(Path(self.path)):
            return False
        with rasterio.open(self.path) as src:  # no sources recorded: its grid alone
            return not self.same_grid(src.width, src.height, tuple(src.transform), src.crs)

    def changed_since(self, now: "RasterInfo") -> bool:
        """Whether the raster described `now` (opened afresh) differs from this description: its
        file, what a VRT reads, or its grid."""
        return ((now.size, now.mtime_ns) != (self.size, self.mtime_ns) or self._sources_differ(now.sources)
                or not self.same_grid(now.width, now.height, now.transform, CRS.from_wkt(now.crs_wkt)))

    def _sources_differ(self, now: tuple[int, ...] | None) -> bool:
        if self.sources is None:
            return False
        # two or three numbers: recorded before the digest, or before the nested VRTs' (vrt_stamp)
        return now is None or now[:len(self.sources)] != self.sources

    def same_grid(self, width: int, height: int, transform: tuple[float, ...], crs: CRS | None) -> bool:
        return ((width, height) == (self.width, self.height) and tuple(transform)[:6] == tuple(self.transform[:6])
                and crs is not None and crs == CRS.from_wkt(self.crs_wkt))

    def changed_on_disk(self) -> bool:
        """Whether the file, what a VRT reads, or the raster's grid changed since it was described."""
        return self.file_changed() or self.changed_beside()


# where GDAL finds a raster's grid or CRS beside it: its .aux.xml, a .prj, a worldfile (.wld, or
# the suffix's first and last letters and "w": .tfw, .pgw, .jgw, .j2w; or the suffix and "w")
def _georeferenced_beside(path: Path) -> bool:
    """Whether a file beside `path` can hold its grid or CRS (a few stats: a folder of 10,000
    sheets is not listed for each)."""
    suffix = path.suffix.lower()
    ends = [".prj", ".wld"] + ([suffix[:2] + suffix[-1] + "w", suffix + "w"] if len(suffix) > 2 else [])
    names = [path.name + ".aux.xml"] + [path.stem + end for end in ends] + [path.stem + end.upper() for end in ends]
    return any(os.path.exists(path.parent / name) for name in names)


SOURCES_RECHECK_S = 60.0  # how long what lies beside a raster found unchanged is not looked at again
_checked_beside: dict[RasterInfo, tuple[float, bool]] = {}  # a raster as described -> (when, changed)


def changed_lately(raster: RasterInfo) -> bool:
    """RasterInfo.changed_on_disk, the answer of changed_beside kept SOURCES_RECHECK_S while the
    file itself is unchanged (a stat each search; a mosaic's sources are every file of it)."""
    if raster.file_changed():
        return True
    when, changed = _checked_beside.get(raster, (-SOURCES_RECHECK_S, False))
    if time.monotonic() - when >= SOURCES_RECHECK_S:
        changed = raster.changed_beside()
        _checked_beside[raster] = (time.monotonic(), changed)
    return changed


def disk_state(raster: RasterInfo) -> str:
    """A raster's file (a VRT's sources, its grid) against what was indexed (changed_lately):
    "unchanged", "changed" (searched by the old pixels' features, placed by the old grid, until
    indexed again) or "unreadable" (its file gone or moved, a VRT that cannot be opened now)."""
    try:
        return "changed" if changed_lately(raster) else "unchanged"
    except (OSError, rasterio.errors.RasterioError):
        return "unreadable"


def sources_stamp(src: rasterio.DatasetReader) -> tuple[int, ...] | None:
    """A VRT's sources (a mosaic's files) as vrt_stamp; None for other rasters (their side
    files, such as the .aux.xml QGIS rewrites when it shows a raster, are not pixels)."""
    return vrt_stamp(src.files[1:]) if src.driver == "VRT" else None


def vrt_stamp(files: Sequence[str]) -> tuple[int, ...] | None:
    """files_stamp of the files a VRT reads (as GDAL lists them), and, where VRTs are among them,
    a fourth number: the digest of what they name, down to MAX_VRT_DEPTH VRTs (a file gone
    there is a change, not an error). GDAL lists a nested VRT, not what it reads: a sheet
    written over under a mosaic of VRTs (gdalbuildvrt over each sheet's gdalwarp -of VRT, to mix
    CRSs; over zones' VRTs) left the mosaic "unchanged", its old place found with the new pixels
    (a probe's). A stamp recorded before has three numbers and is compared on them
    (RasterInfo._sources_differ); a mosaic of no VRTs keeps three, as older workers read them."""
    own = files_stamp(files)
    if own is None:
        return None
    inner = [named for name in files if local_file(name) and may_be_vrt(name) for named in vrt_names(name)[1]]
    return (*own, _names_digest(inner)) if inner else own


def _names_digest(names: list[str]) -> int:
    """_stats_digest of the files; a file gone, or that cannot be looked at, counts as such."""
    stats = []
    for name in names:
        try:
            st = os.stat(name)
            stats.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((name, -1, -1))
    return _stats_digest(stats)


def _stats_digest(stats: list[tuple[str, int, int]]) -> int:
    """A digest of files' (path, size, modification time), in any order."""
    return int.from_bytes(hashlib.blake2b(json.dumps(sorted(stats)).encode(), digest_size=6).digest(), "big")


def _names_under(vrt: str) -> tuple[tuple[list[str], list[str]], list[str]]:
    """The local files a VRT names itself, and those it and the VRTs it names name, down to
    MAX_VRT_DEPTH VRTs, and the VRTs read, for vrt_names to keep until one of those changes:
    read from their XML, for a mosaic of 50,000 sheets' VRTs, which GDAL would open one by one."""
    read: list[str] = []
    own = _named_in(vrt, read)
    return (own, own + _named_below(own, MAX_VRT_DEPTH - 1, read)), read


def _named_in(vrt: str, read: list[str]) -> list[str]:
    """The local files one VRT names (added to `read`), once each. A VRT that cannot be read
    names nothing: its own stat says so."""
    read.append(vrt)
    try:
        at = Path(os.path.realpath(vrt))  # a link's sources lie beside its target, as GDAL reads them
        named = [str(source_path(at, name, relative)) for name, relative in vrt_sources(at) if local_file(name)]
    except (OSError, InputError, LookupError, ValueError):  # gone, not a VRT, too large, code, an unknown encoding
        return []
    return list(dict.fromkeys(named))


def _named_below(named: list[str], depth: int, read: list[str]) -> list[str]:
    """What the VRTs among `named` name, and theirs, down to `depth` VRTs; each VRT read once
    (one naming itself, or another many times, was read again for each name)."""
    below: list[str] = []
    for name in named if depth >= 1 else []:
        if name not in read and may_be_vrt(name):
            own = _named_in(name, read)
            below += own + _named_below(own, depth - 1, read)
    return below


vrt_names = FileDerived(_names_under)  # path -> (the files it names itself, every file it and its VRTs name)


def may_be_vrt(path: str) -> bool:
    """Whether a VRT's source is a VRT: one named .vrt, or of no other raster format's name and
    holding one (raster_access.is_vrt, as GDAL tells; kept per file until it changes). A
    country's 50,000 .tif sheets are not read for it: on a shared disk that would cost more
    than the check is worth."""
    suffix = os.path.splitext(path)[1].lower()
    return suffix == ".vrt" or (suffix not in RASTER_SUFFIXES and _holds_a_vrt(path))


_holds_a_vrt = FileDerived(lambda path: (is_vrt(Path(path)), [path]))


def _open_vrt(path: str) -> tuple[tuple[tuple[str, ...], tuple], list[str]]:
    """The files a VRT reads, as GDAL names them, and its grid (width, height, transform, CRS),
    for _vrt_as_opened to keep until its file changes: a VRT holds them itself (no side file),
    and GDAL took 2.1 s and 500 MB to open one of 50,000 sheets, a search's every minute
    (changed_lately). A nested VRT is one of them (vrt_stamp reads what it names)."""
    with rasterio.open(path) as src:
        return (tuple(src.files[1:]), (src.width, src.height, tuple(src.transform), src.crs)), [path]


_vrt_as_opened = FileDerived(_open_vrt)


def files_stamp(files: Sequence[str]) -> tuple[int, int, int] | None:
    """A VRT's sources (a mosaic's files) as their total size, latest modification time and a
    digest of each file's path, size and modification time: its own file does not change when
    they do, and a source replaced by another of its size with an older time (copied back from a
    backup with cp -p or rsync -t) changed neither total. None when it reads no local file. A
    source file that is gone raises FileNotFoundError: the VRT cannot be read."""
    stats = []
    for name in files:
        if local_file(name):  # /vsi paths, URLs and a driver's NAME:path have no stat here
            st = os.stat(name)
            stats.append((name, st.st_size, st.st_mtime_ns))
    if not stats:
        return None
    return sum(s[1] for s in stats), max(s[2] for s in stats), _stats_digest(stats)


def pixel_to_crs(rasters: list[RasterInfo], cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pixel coordinates (n, k) of n footprints, each in its own raster of `rasters`, in the
    rasters' CRSs: (n, k, 2), computed as the affine transform computes them."""
    a, b, c, d, e, f = np.array([r.transform[:6] for r in rasters], np.float64).reshape(-1, 6).T[:, :, None]
    return np.stack([cols * a + rows * b + c, cols * d + rows * e + f], axis=-1)


def footprint_rings(corners: np.ndarray, rasters: list[RasterInfo]) -> np.ndarray:
    """Closed rings (n, 4 * EDGE_POINTS + 1, 2), each in its raster's CRS, of n quadrilaterals
    given by their corners in raster pixels (n, 4, 2); every edge densified, so that a
    reprojected footprint follows curved edges (tiles and placements alike)."""
    t = np.linspace(0.0, 1.0, EDGE_POINTS, endpoint=False)[None, None, :, None]
    edges = corners[:, :, None] + (np.roll(corners, -1, axis=1) - corners)[:, :, None] * t  # n, 4 sides, EDGE_POINTS, 2
    pts = np.concatenate([edges.reshape(len(corners), 4 * EDGE_POINTS, 2), corners[:, :1]], axis=1)
    return pixel_to_crs(rasters, pts[..., 0], pts[..., 1])


@dataclass(frozen=True)
class Tile:
    """One tile: a native-resolution window of a raster, read down to the tile size."""

    raster: RasterInfo
    col_off: int
    row_off: int
    width: int
    height: int
    scale: int

    @property
    def window(self) -> Window:
        return Window(self.col_off, self.row_off, self.width, self.height)

    def ring(self) -> np.ndarray:
        """Footprint ring in the raster CRS, (4 * EDGE_POINTS + 1, 2), closed."""
        return Tile.rings([self])[0]

    @staticmethod
    def rings(tiles: list["Tile"]) -> np.ndarray:
        """Footprint rings of tiles, each in its raster's CRS: (n, 4 * EDGE_POINTS + 1, 2), closed;
        in one pass of array arithmetic (a search reprojects hundreds)."""
        windows = np.array([(t.col_off, t.row_off, t.width, t.height) for t in tiles], np.float64).reshape(-1, 4)
        c0, r0 = windows[:, 0], windows[:, 1]
        c1, r1 = c0 + windows[:, 2], r0 + windows[:, 3]
        corners = np.stack([np.stack(corner, axis=-1) for corner in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))], axis=1)
        return footprint_rings(corners, [t.raster for t in tiles])

    def footprint(self) -> Polygon:
        return Polygon(self.ring())

    def footprint_pixels(self) -> Polygon:
        """The window in its raster's pixel coordinates (col, row)."""
        return Polygon([(self.col_off, self.row_off), (self.col_off + self.width, self.row_off),
                        (self.col_off + self.width, self.row_off + self.height), (self.col_off, self.row_off + self.height)])


def find_rasters(inputs: list[str | Path], access: RasterAccess = RasterAccess()) -> list[Path]:
    """Files, directories (searched recursively for raster suffixes) and VRTs -> sorted files,
    each one (and each VRT's sources) allowed by `access`."""
    found: list[Path] = []
    pictures: list[Path] = []  # in a folder, with nothing to place them on a map
    searched: set[Path] = set()
    for item in dict.fromkeys(map(str, inputs)):  # one entry given many times, or by aliases, is found once
        path = access.resolve(item)
        if path in searched:
            continue
        searched.add(path)
        if path.is_dir():
            before = len(found)
            for file in files_under(path):
                if _plain_picture(file):
                    pictures.append(file)
                else:
                    found.append(access.check_file(file))
            if len(found) == before and len(inputs) > 1:  # said alone, below: nothing to index
                log.warning("%s holds no raster files: nothing of it is indexed", excerpt(str(item)))
        elif path.is_file():
            found.append(access.check_file(path))
        elif str(item).startswith("/vsi"):
            raise InputError(f"{excerpt(str(item))}: GDAL virtual paths are not indexed (a search reads the raster "
                             "again for every hit); copy or extract it to a folder first")
        else:
            pattern = any(c in str(item) for c in "*?[")  # a shell passes on a pattern that matched no file as it is
            raise RasterMissing(f"raster not found: {excerpt(str(item))}"
                                + (" (a pattern that matched no file?)" if pattern else ""))
    if pictures:
        log.warning("%d picture(s) in the folders given hold no georeferencing (no worldfile or .aux.xml beside "
                    "them: previews, thumbnails) and are left out: %s%s", len(pictures),
                    ", ".join(p.name for p in pictures[:3]), ", ..." if len(pictures) > 3 else "")
    if not found:
        left = f" ({len(pictures)} picture(s) without georeferencing left out)" if pictures else ""
        # a folder on a drive not plugged in is an empty mount point
        raise RasterMissing(f"no raster files in {excerpt(', '.join(map(str, inputs)))}{left}")
    return _not_read_through_a_vrt(list(dict.fromkeys(found)))


PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg"}  # formats that hold no georeferencing of their own


def _plain_picture(path: Path) -> bool:
    """A PNG or JPEG with no file beside it to place it on a map: a folder's preview or
    thumbnail, which stopped the whole run ("has no CRS"). Named on its own, it is still refused
    with what to do."""
    return path.suffix.lower() in PICTURE_SUFFIXES and not _georeferenced_beside(path)


def _not_read_through_a_vrt(found: list[Path]) -> list[Path]:
    """`found` less the files that a mosaic VRT among them reads (one reading two files or more:
    map sheets, or a scene's bands as files): a folder of map sheets with the mosaic built over
    them (gdalbuildvrt) was indexed twice, as sheets and as the mosaic, and every place came
    back twice. Through the mosaic alone a place across a sheet's edge is found, which no sheet
    holds whole. A VRT of one file (a clip, a band, a warp) leaves it be: it is not all of it."""
    read = set()
    for vrt in (p for p in found if is_vrt(p)):
        try:
            sources = {source_path(vrt, name, relative) for name, relative in vrt_sources(vrt)} - {vrt}
        except InputError:  # one the command line reads whole (a mosaic over 16 MiB): open_raster decides
            continue
        if len(sources) >= 2:
            read |= sources
    through = [p for p in found if p in read]
    if through:
        log.warning("%d of the rasters found are read by a mosaic VRT found with them, and are indexed through it only "
                    "(%s%s); those an index already holds stay in it (python -m worker remove takes them out)",
                    len(through), ", ".join(p.name for p in through[:3]), ", ..." if len(through) > 3 else "")
    return [p for p in found if p not in read]


def files_under(folder: Path) -> list[Path]:
    """Raster files in a folder and its subfolders, sorted; linked folders are not entered
    (a link to a file is returned as found, for the caller to resolve and check)."""
    files = []
    for parent, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        files += [Path(parent) / n for n in names if Path(n).suffix.lower() in RASTER_SUFFIXES]
    return sorted(p for p in files if p.is_file())


class RasterMissing(InputError):
    """A raster a run names that is not there (moved, or on a drive not plugged in now): a
    worker that cannot resume a job for it keeps the job, to try again (worker.service.jobs)."""


class BandsUnknown(InputError):
    """A raster whose red, green and blue bands neither its colour interpretation nor the
    request names. What to do depends on what was asked: `base` is the finding alone. An index
    keeps the bands it was built with, so --bands alone left a folder of such a raster beside an
    RGB one, or an index holding RGB ones, with no way in (a probe's): naming its colours in it
    does, as the 3-band warning says."""

    def __init__(self, base: str, path: str, count: int):
        # two bands have no red, green and blue to name: its first, named grey, is read as grey (choose_bands)
        name_them = (f"name its first band grey in it: gdal_edit.py -colorinterp_1 gray {shlex.quote(path)}"
                     if count < 3 else
                     "name its colours in it: gdal_edit.py -colorinterp_R red -colorinterp_G green -colorinterp_B blue "
                     f"{shlex.quote(path)} (R, G and B its band numbers)")
        pass_bands = ("--bands R,G,B for a new index of such rasters (one band as grey: --bands 1)" if count >= 3 else
                      "--bands 1 (or 2) for a new index of such rasters, read as grey")
        super().__init__(f"{base}; pass {pass_bands}, or, to index it beside rasters of other bands, {name_them}")
        self.base = base
        self.count = count  # the raster's bands


def colour_bands(path: Path, drivers: tuple[str, ...] | None = None) -> tuple[bool, int]:
    """Whether a raster's colour interpretation names its red, green and blue, and how many
    bands it has (a raster that cannot be opened, by `drivers` where given: (False, 0), for
    open_raster to say why)."""
    try:
        with _open_with(path, drivers) as src:
            return _names_rgb(src.colorinterp), src.count
    except RasterioIOError:
        return False, 0


def _names_rgb(interp) -> bool:
    """Whether a raster's colour interpretation names red, green and blue bands."""
    return all(c in interp for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue))


def choose_bands(src: rasterio.DatasetReader, requested: tuple[int, ...] | None) -> tuple[int, ...]:
    """Natural colour from the colour interpretation, else the requested bands, else an error."""
    name = src.name
    if requested:
        bad = [b for b in requested if not 1 <= b <= src.count]
        if bad:
            raise InputError(f"{name}: band(s) {bad} asked for, but the raster has {src.count} band(s)")
        if len(requested) not in (1, 3):
            raise InputError(f"--bands needs 1 or 3 band numbers (R,G,B), got {list(requested)}")
        return tuple(requested) * (3 if len(requested) == 1 else 1)
    interp = list(src.colorinterp)
    if _names_rgb(interp):
        return tuple(interp.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue))
    if _paletted(src, requested):  # read through its colour table (natural_colour)
        return (1, 1, 1)
    if src.count == 1 or (src.count == 2 and interp[1] == ColorInterp.alpha):  # grey, or grey and its alpha mask
        return (1, 1, 1)
    if src.count == 2 and interp[0] == ColorInterp.gray:  # grey and a band of its own (a quality band, SAR's VH)
        # it was refused, and the whole run with it, told to name red, green and blue among two bands (a probe's)
        log.warning("%s: 2 bands, the first named grey: read as grey, band 2 (%s) not drawn (to draw it instead, "
                    "index with --bands 2)", name, interp[1].name)
        return (1, 1, 1)
    if src.count == 3:
        # an example's raster too, which a search reads with no --bands: its colours named in it work for both
        log.warning("%s: 3 bands without RGB colour interpretation, read as R,G,B = 1,2,3 (to choose otherwise, "
                    "index with --bands, or name its colours: gdal_edit.py -colorinterp_1 red -colorinterp_2 green "
                    "-colorinterp_3 blue %s)", name, shlex.quote(name))
        return (1, 2, 3)
    raise BandsUnknown(f"{name}: cannot tell which of its {src.count} bands are red, green, blue "
                       f"(colour interpretation {[c.name for c in interp]})", name, src.count)


# formats gdal_edit.py writes a CRS into; others (PNG, JPEG, GIF...) GDAL opens read-only
CRS_WRITABLE_DRIVERS = frozenset({"GTiff", "COG", "VRT", "HFA", "ENVI", "GPKG"})


def _how_to_assign_a_crs(path: Path, src: rasterio.DatasetReader) -> str:
    """What to do about a raster without a CRS (said to an example search too: not "index it
    again"). gdal_edit.py, which was advised for every raster, fails on a PNG or JPEG ("does not
    support update access"), and a .prj beside one is not read by GDAL (a probe's)."""
    name = shlex.quote(str(path))
    if src.driver in CRS_WRITABLE_DRIVERS:
        return f"assign one (e.g. gdal_edit.py -a_srs EPSG:XXXX {name}) and use it again"
    prj = [p for p in (path.with_suffix(".prj"), path.with_suffix(".PRJ")) if p.exists()]
    unread = f" (GDAL does not read the CRS of {prj[0].name} beside it)" if prj else ""
    return (f"GDAL cannot write one into a {src.driver} file{unread}: make a GeoTIFF copy that has one "
            f"(gdal_translate -a_srs EPSG:XXXX {name} copy.tif) and use that")


def _paletted(src: rasterio.DatasetReader, requested: tuple[int, ...] | None) -> bool:
    """Whether the raster is read through its colour table: its first band is paletted and no
    bands were asked for (asked for, band numbers are read as they are). Drawn as greys, a
    palette's indices lost its colours: a scanned map's or a classification's classes, an image
    stored with a palette. A band said to be paletted without a colour table (a hand-written
    VRT) is read as grey."""
    if requested or src.colorinterp[0] != ColorInterp.palette:
        return False
    try:
        return bool(src.colormap(1))
    except ValueError:  # rasterio's "NULL color table"
        return False


STRETCH_READ_PX = 1024  # the long side of the decimated read a stretch is taken from
SPARSE_READ_PX = 4096  # a finer look where that read found no valid pixel: data sparser than it missed


# An 8-bit raster is drawn as it is, unless the widest of its bands' 2nd-98th percentile spans is
# under this many levels: then it is stretched as 16-bit data is. The line drawing's contrast floor
# (worker.line_drawing.CONTRAST_FLOOR) is in grey levels, so a dark or flat 8-bit raster lost most
# of its lines: the benchmark's 8-bit scene put into 30 + v/4 (58 levels) was found at recall@5
# 0.66 drawn as it was, 0.94 stretched, 1.00 at full range (90 sketches; scripts/lab narrow_range,
# docs/benchmarks/quality.md). Every 8-bit scene of the benchmark spans 160 levels or more, and
# is drawn as before.
NARROW_8BIT_SPAN = 128
# Whether an 8-bit raster is narrow is told, and a narrow one stretched, from this many windows a
# side, of up to 256 px, spread over it: the decimated read a 16-bit stretch is taken from
# decompresses every block of a raster without overviews (0.65 s for an 8-bit GeoTIFF of 8,000 px
# a side), and met damage the windows missed; 16 windows took 0.04-0.08 s. A raster an index
# recorded is not looked at again (open_raster's `recorded`).
NARROW_SAMPLE_WINDOWS = 4
# Fewer valid pixels than this a band in those windows (a sliver of data at a collar's edge) and
# the decimated read decides: 6,144 pixels of one edge gave a stretch of (30, 31) to a raster of
# 30 to 90, drawn saturated for the life of its index (a review's)
NARROW_SAMPLE_MIN = 16_384


def robust_stretch(src: rasterio.DatasetReader, bands: tuple[int, ...]) -> tuple[tuple[float, float], ...] | None:
    """Per-band 2nd/98th percentiles of valid pixels; None for 8-bit bands of a range wide enough
    (NARROW_8BIT_SPAN). 16-bit and float bands are read decimated; a band with no valid pixel in
    it is looked at once more, finer; with none there either (an empty sheet of a tiled
    delivery) it gets a placeholder and its tiles are skipped as nodata: one empty sheet in a
    folder stopped the whole run. Narrow 8-bit bands are stretched from the windows that told
    them narrow: the decimated read met a damaged block those missed, and a folder holding a
    cut-short dark sheet, or a mosaic of dark sheets one of them cut short, was refused whole."""
    unique = tuple(dict.fromkeys(bands))
    if all(src.dtypes[b - 1] == "uint8" for b in bands):
        narrow = _narrow_8bit(src, unique)
        if narrow is None:
            return None
        table = dict(zip(unique, map(_percentile_stretch, narrow)))
    else:
        table = {b: _band_stretch(src, b) for b in unique}
    return tuple(table[b] for b in bands)


def _narrow_8bit(src: rasterio.DatasetReader, bands: tuple[int, ...]) -> list[np.ndarray] | None:
    """The valid values of each of `bands` in windows spread over the raster, or, where a band
    has few in them (NARROW_SAMPLE_MIN: a wide nodata collar), in the decimated read a stretch
    is taken from, when the widest band spans fewer than NARROW_8BIT_SPAN levels (2nd to 98th
    percentile); else None. A read that fails is passed over: a damaged block is met, and said,
    where its tiles or places are read (an 8-bit raster cut short was refused whole at its
    opening, and a folder or mosaic with it)."""
    try:
        values = _sampled_values(src, bands)
    except RasterioIOError:
        return None
    if any(v.size < NARROW_SAMPLE_MIN for v in values):
        try:
            values = [_valid_values(src, b, STRETCH_READ_PX)[0] for b in bands]
        except RasterioIOError:  # damage the windows missed: they decide, where they hold any
            pass
    if any(v.size == 0 for v in values):
        return None
    spans = [np.subtract(*np.percentile(v, STRETCH_PERCENTILES[::-1])) for v in values]
    return values if max(spans) < NARROW_8BIT_SPAN else None


def _sampled_values(src: rasterio.DatasetReader, bands: tuple[int, ...]) -> list[np.ndarray]:
    """The valid values of each band in NARROW_SAMPLE_WINDOWS by NARROW_SAMPLE_WINDOWS windows of
    up to 256 px spread over the raster, each starting on a block where blocks are narrower than
    the raster (fewer to decompress; a striped file's strip spans it, and snapped to it every
    window lay at its left edge)."""
    side = min(256, src.width, src.height)
    block_rows, block_cols = src.block_shapes[0]

    def starts(length: int, block: int) -> list[int]:
        at = np.linspace(0, length - side, NARROW_SAMPLE_WINDOWS)
        return list(dict.fromkeys((at // block * block if block < length else at).astype(int).tolist()))

    reads = [src.read(list(bands), window=Window(c, r, side, side), masked=True).reshape(len(bands), -1)
             for r in starts(src.height, block_rows) for c in starts(src.width, block_cols)]
    return [values.compressed().astype(np.float64) for values in np.ma.concatenate(reads, axis=1)]


def _band_stretch(src: rasterio.DatasetReader, band: int) -> tuple[float, float]:
    """A band's 2nd and 98th percentiles from a decimated read (robust_stretch)."""
    values, shape = _valid_values(src, band, STRETCH_READ_PX)
    if values.size == 0 and max(src.width, src.height) > STRETCH_READ_PX:
        values, shape = _valid_values(src, band, SPARSE_READ_PX)
    if values.size == 0:
        log.warning("%s: band %d has no valid pixels in a %d by %d px overview: read as empty, its tiles are "
                    "skipped as nodata (data sparser than that overview would be drawn unstretched)", src.name, band,
                    shape[1], shape[0])
        return 0.0, 1.0
    return _percentile_stretch(values)


def _percentile_stretch(values: np.ndarray) -> tuple[float, float]:
    """The 2nd and 98th percentiles of valid values, the second above the first."""
    lo, hi = np.percentile(values, STRETCH_PERCENTILES)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _valid_values(src: rasterio.DatasetReader, band: int, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The valid, finite values of a band read down to `side` px on its long side, and the shape read."""
    scale = max(1.0, max(src.width, src.height) / side)
    shape = (max(1, int(src.height / scale)), max(1, int(src.width / scale)))
    values = src.read(band, out_shape=shape, resampling=Resampling.nearest, masked=True).compressed()
    values = values.astype(np.float64)
    return values[np.isfinite(values)], shape


def _open_with(path: Path, drivers: tuple[str, ...] | None) -> rasterio.DatasetReader:
    """`path` opened by any GDAL driver, or only by one of `drivers` (rasterio.open takes one
    driver name; its reader takes GDAL's list of allowed drivers)."""
    _check_name(path)
    if not drivers:
        return rasterio.open(path)
    with rasterio.Env():
        return rasterio.io.DatasetReader(path, driver=list(drivers))


def _check_name(path: Path) -> None:
    """Refuse a name rasterio cannot hand GDAL: it encodes names as UTF-8, and one in another
    encoding (a Latin-1 name from an old share or archive, whose bytes Python keeps as
    surrogates) failed an index run or a search by example with a traceback, `internal` over the
    protocol."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # its bytes
        except UnicodeEncodeError:  # a surrogate no file name's byte gives (sent in JSON)
            shown = str(path).encode("utf-8", "backslashreplace").decode()
        raise InputError(f"{shown}: its name is not UTF-8, which GDAL reads names as: rename the file or folder "
                         "(e.g. convmv -f latin1 -t utf-8 --notest NAME)") from None


def open_raster(path: Path, bands: tuple[int, ...] | None, drivers: tuple[str, ...] | None = None,
                recorded: RasterInfo | None = None) -> RasterInfo:
    """Check a raster can be indexed and describe it; every refusal says what to do. With
    `drivers`, only those GDAL drivers may read it (a service client's raster). `recorded`: the
    raster as an index recorded it; unchanged since, its stretch is the record's, not read again
    (an index run opens every raster it is given, done or not: a Sentinel-2 scene's stretch took
    0.1 s, an 8-bit raster's look at its range 0.05-0.15 s, and a folder of 10,000 sheets paid it
    on each run)."""
    try:
        src = _open_with(path, drivers)
    except RasterioIOError as exc:
        if drivers:
            raise InputError(f"{path}: not a raster this worker reads for clients (formats: {', '.join(drivers)}; "
                             f"convert it with gdal_translate) or not readable ({gdal_reason(exc)[:200]})") from exc
        raise InputError(f"{path}: not a readable raster ({gdal_reason(exc)})") from exc
    with src:
        if src.transform.is_identity and (src.gcps[0] or src.rpcs):  # a scene as delivered, not yet on a map grid
            raise InputError(f"{path}: placed by {'ground control points' if src.gcps[0] else 'RPCs'}, not on a map "
                             "grid; warp it first (gdalwarp -t_srs EPSG:XXXX"
                             f"{' -rpc' if not src.gcps[0] else ''} in.tif out.tif) and use the result")
        if src.crs is None or not src.crs.to_wkt():
            raise InputError(f"{path}: has no CRS, so its places cannot be put on a map; {_how_to_assign_a_crs(path, src)}")
        if src.transform.is_identity:
            raise InputError(f"{path}: has no geotransform (pixel grid not georeferenced)")
        _check_north_up(path, src.transform, src.crs)
        _check_sources(path, src)
        _check_on_earth(path, src)
        if any(np.dtype(src.dtypes[b - 1]).kind == "c" for b in range(1, src.count + 1)):
            raise InputError(f"{path}: complex-valued bands are not imagery")
        chosen, paletted = choose_bands(src, bands), _paletted(src, bands)
        st = os.stat(path)
        info = RasterInfo(path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, width=src.width,
                          height=src.height, crs_wkt=src.crs.to_wkt(), transform=tuple(src.transform)[:6],
                          bands=chosen, stretch=None, sources=sources_stamp(src), palette=paletted)
        if (recorded is not None and (recorded.bands, recorded.palette) == (chosen, paletted)
                and not recorded.changed_since(info)):
            return replace(info, stretch=recorded.stretch)
        try:
            return replace(info, stretch=None if paletted else robust_stretch(src, chosen))
        except RasterioIOError as exc:
            raise InputError(f"{path}: cannot read its pixels ({gdal_reason(exc)})") from exc


def open_rasters(paths: Sequence[Path], bands: tuple[int, ...] | None, drivers: tuple[str, ...] | None = None,
                 threads: int = 1, recorded: dict[str, RasterInfo] | None = None) -> list[RasterInfo]:
    """open_raster of each path, `threads` at a time (GDAL's reads and numpy release the GIL:
    opening a Sentinel-2 scene, its stretch statistics included, took 101-119 ms alone and 54-61
    ms a file in 2 threads here). Every refusal is said at once, in the paths' order (a folder of
    sheets with three bad files took three runs to find them, one a run). `recorded`: the
    rasters by path as an index recorded them (open_raster)."""
    def opened(path: Path) -> RasterInfo | InputError:
        try:
            return open_raster(path, bands, drivers, (recorded or {}).get(str(path)))
        except InputError as exc:
            return exc

    if threads <= 1 or len(paths) <= 1:
        infos = [opened(p) for p in paths]
    else:
        with ThreadPoolExecutor(min(threads, len(paths)), thread_name_prefix="open-raster") as pool:
            infos = list(pool.map(opened, paths))
    refused = [info for info in infos if isinstance(info, InputError)]
    if len(refused) == 1:
        raise refused[0]
    if refused:
        not_there = all(isinstance(e, RasterMissing) for e in refused)  # a drive not plugged in: said as one
        raise (RasterMissing if not_there else InputError)(
            f"{len(refused)} of the {len(paths)} rasters are refused, so none was indexed: "
            + numbered([str(e) for e in refused]))
    return infos


def _check_sources(path: Path, src: rasterio.DatasetReader) -> None:
    """Refuse a VRT whose source files are missing, naming them: GDAL opens it, and the first
    tile over a missing file failed midway through indexing with "Read failed"."""
    if src.driver != "VRT":
        return
    missing = [name for name in src.files[1:] if local_file(name) and not os.path.exists(name)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise RasterMissing(f"{path}: its source {missing[0]}{more} is missing; put it back, or build the VRT "
                            "again from the files there are (gdalbuildvrt)")


MAX_GRID_TURN_DEG = 1.0  # a pixel grid turned this much against its map is still taken as north up


def _check_north_up(path: Path, transform: rasterio.Affine, crs: CRS) -> None:
    """Refuse a pixel grid turned or mirrored against its map (rotation terms, or south up: rows
    running north). A user sketches on a map shown north up, and the search compares the sketch
    with the rasters' pixel grids as they are: in such a grid the place is turned or mirrored
    against the sketch, and was never found (a south-up copy of the sample scene: IoU 0 in the
    top 5, where the north-up one had it at rank 1)."""
    axis = crs.to_dict().get("axis", "enu")  # x east and y north, or, e.g. "wsu", west and south
    east, north = (-1.0 if axis[0] == "w" else 1.0), (-1.0 if axis[1:2] == "s" else 1.0)
    a, b, d, e = east * transform.a, east * transform.b, north * transform.d, north * transform.e  # east, north
    rows_turn = math.degrees(math.atan2(d, a))  # where a row runs, against east
    columns_turn = math.degrees(math.atan2(b, -e))  # where a column runs, against south
    mirrored = a * e - b * d > 0
    if mirrored or max(abs(rows_turn), abs(columns_turn)) > MAX_GRID_TURN_DEG:
        how = (f"mirrored: its rows run {_heading(a, d)} and its columns {_heading(b, e)} (north up: east and south)"
               if mirrored else f"turned {rows_turn:.1f} degrees"
               if abs(rows_turn - columns_turn) <= MAX_GRID_TURN_DEG else  # a shear was said "turned 0.0 degrees"
               f"sheared (its rows run {rows_turn:.1f} degrees from east, its columns {columns_turn:.1f} from south)")
        raise InputError(f"{path}: its pixel grid is {how} against its map, so a sketch drawn on the map would "
                         "not meet it; make a north-up grid of it, e.g. gdalwarp -of VRT in.tif north_up.vrt "
                         "(a VRT: no pixels copied), and use that (to index, or to cut an example from)")


def _heading(east: float, north: float) -> str:
    """Where a pixel step (its east and north parts) runs: the nearest of the four points."""
    if abs(east) >= abs(north):
        return "east" if east > 0 else "west"
    return "north" if north > 0 else "south"


def _check_on_earth(path: Path, src: rasterio.DatasetReader) -> None:
    """InputError when the raster lies nowhere on Earth in its CRS: a CRS assigned in error
    (metres labelled as degrees: a UTM grid tagged EPSG:4326 put its hits at latitude 4,500,000
    and its tiles outside every map view). A projected raster is refused only when neither its
    centre nor a corner reaches lon/lat (a whole-world raster in Mollweide has its corners in
    the blank beyond the Earth)."""
    cols, rows = [0, src.width, 0, src.width, src.width / 2], [0, 0, src.height, src.height, src.height / 2]
    xs, ys = src.transform * (np.array(cols, float), np.array(rows, float))
    if not (src.crs.is_geographic or src.crs.is_projected):  # was told its corners lie outside its CRS
        raise InputError(f"{path}: its CRS is a local (engineering) one, not a map's, so its hits could not be placed "
                         "on Earth; assign the map CRS it was surveyed in (gdal_edit.py -a_srs EPSG:XXXX) and index "
                         "it again")
    fix = "assign the CRS its coordinates are in (gdal_edit.py -a_srs EPSG:XXXX) and index it again"
    corners = f"its corners run x {min(xs):.6g} to {max(xs):.6g}, y {min(ys):.6g} to {max(ys):.6g}"
    if src.crs.is_geographic:
        if not (-90 - abs(src.transform.e) <= min(ys) and max(ys) <= 90 + abs(src.transform.e)
                and -360 <= min(xs) and max(xs) <= 540):
            raise InputError(f"{path}: {corners}, which are not longitudes and latitudes, as its CRS says; {fix}")
        return
    reached = []
    for x, y in zip(xs, ys):
        try:
            lon, lat = warp_transform(src.crs, CRS.from_epsg(4326), [x], [y])
        except Exception:  # PROJ refuses a point outright: its errors have no common type
            continue
        reached.append(np.isfinite(lon[0]) and np.isfinite(lat[0]))
    if not any(reached):
        raise InputError(f"{path}: {corners}, which lie outside where its CRS is defined; {fix}")


@dataclass(frozen=True)
class TilePlan(Sequence[Tile]):
    """All tiles of one raster in a fixed order (scale, row, column), resumable by position. A
    tile is made when asked for: as objects a plan's tiles took 176 bytes each and 10 s a million,
    and a continental raster has tens of millions. Small to pickle for a cluster's chunk."""

    raster: RasterInfo
    tile: int
    step: int
    scales: tuple[int, ...]  # those with something to see (a window at most twice the raster's side)

    def _grid(self, scale: int) -> tuple[int, int, int]:
        """A scale's window side in raster px and its tile rows and columns."""
        size = self.tile * scale
        return size, _offset_count(self.raster.height, size, self.step * scale), \
            _offset_count(self.raster.width, size, self.step * scale)

    def __len__(self) -> int:
        return sum(rows * cols for _, rows, cols in map(self._grid, self.scales))

    def __getitem__(self, position):
        if isinstance(position, slice):
            start, stop, stride = position.indices(len(self))
            if stride != 1:
                return [self[i] for i in range(start, stop, stride)]
            return list(self._tiles(start, stop))
        i = position + len(self) if position < 0 else position
        if not 0 <= i < len(self):
            raise IndexError(f"tile {position} of a plan of {len(self)}")
        return next(self._tiles(i, i + 1))

    def __iter__(self) -> Iterator[Tile]:
        return self._tiles(0, len(self))

    def _tiles(self, start: int, stop: int) -> Iterator[Tile]:
        """The tiles at positions start to stop (0 <= start <= stop <= len), in order."""
        first = 0  # the position of the scale's first tile
        for scale in self.scales:
            size, rows, cols = self._grid(scale)
            step = self.step * scale
            for i in range(max(start, first), min(stop, first + rows * cols)):
                row, col = divmod(i - first, cols)
                yield Tile(self.raster, _offset(col, self.raster.width, size, step),
                           _offset(row, self.raster.height, size, step), size, size, scale)
            first += rows * cols


def _offset_count(length: int, window: int, step: int) -> int:
    """How many windows cover `length`: a step apart, the last flush with the far edge."""
    return 1 if length <= window else -(-(length - window) // step) + 1


def _offset(k: int, length: int, window: int, step: int) -> int:
    """The k-th window's start (_offset_count): k steps in, or flush with the far edge."""
    return min(k * step, max(0, length - window))


def plan_tiles(raster: RasterInfo, settings: TileSettings) -> TilePlan:
    """All tiles of one raster in a fixed order (scale, row, column): TilePlan. A scale whose
    window is over twice the raster's side is left out: mostly outside it, nothing to see."""
    seen = tuple(s for s in settings.scales if s == 1 or settings.tile * s <= 2 * max(raster.width, raster.height))
    return TilePlan(raster, settings.tile, settings.step, seen)


class LayoutChanged(OSError):
    """A raster's file no longer has the bands its index reads: written over with fewer bands,
    or with a colour table added or gone. Read as indexed, it failed with an IndexError or
    rasterio's "NULL color table" (a probe's): an OSError, it is said as any changed file is."""


def check_layout(src: rasterio.DatasetReader, raster: RasterInfo) -> None:
    """LayoutChanged when the open `src` cannot be read as `raster` was indexed: other bands, a
    colour table lost, or 8-bit now where it was wider or the other way round (its stretch, or
    none, no longer fits its values). Its colour interpretation is read only for a paletted
    raster: read from a file cut short, it fails with GDAL's error, which the read that follows
    says better."""
    if max(raster.read_bands) > src.count:
        raise LayoutChanged(f"it has {src.count} band(s) now, and was indexed reading band(s) "
                            f"{list(raster.read_bands)}")
    eight_bit = all(src.dtypes[b - 1] == "uint8" for b in raster.read_bands)
    if raster.stretch is None and not raster.palette and not eight_bit:  # read as 8-bit: clipped to white
        raise LayoutChanged(f"it is {src.dtypes[raster.read_bands[0] - 1]} now, and was indexed as 8-bit")
    top = max(high for _, high in raster.stretch) if raster.stretch else None
    if eight_bit and top is not None and top > 255:  # its stretch would read it black
        raise LayoutChanged(f"it is 8-bit now, and was indexed with values up to {top:g}")
    if raster.palette:
        try:
            paletted = _paletted(src, None)
        except CPLE_BaseError:
            return
        if not paletted:
            raise LayoutChanged("it has no colour table now, and was indexed through one")


def natural_colour(data: np.ma.MaskedArray, raster: RasterInfo) -> tuple[np.ndarray, np.ndarray]:
    """The raster's bands as read (bands, h, w), masked where there is no data, as an (h, w, 3)
    uint8 image (nodata filled from its nearest valid pixel) and its (h, w) valid-pixel mask."""
    valid = ~np.ma.getmaskarray(data).any(axis=0) & np.isfinite(data.filled(0)).all(axis=0)
    if raster.palette:
        colours, opaque = palette_table(raster.path, raster.mtime_ns)
        indices = np.clip(data[0].filled(0).astype(np.int64), 0, len(colours) - 1)
        image, valid = colours[indices], valid & opaque[indices]
    else:
        image = stretch_to_uint8(data, raster.stretch).transpose(1, 2, 0)
    return fill_from_nearest_valid(image, valid), valid


def resampling_for(raster: RasterInfo, down: bool, up: Resampling = Resampling.nearest) -> Resampling:
    """How a read `down` to fewer pixels (averaged), or `up` to as many or more, resamples the
    raster; palette indices are never mixed: the mean of two classes' numbers is a third class."""
    return Resampling.nearest if raster.palette else Resampling.average if down else up


@functools.lru_cache(maxsize=64)
def palette_table(path: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """A paletted raster's colour table as an (N, 3) uint8 lookup and the (N,) opacity of each
    entry (an entry of alpha 0 is no data). An index the table lacks is black: indices past its
    end are read as its last entry, black. Read once per file as it was indexed (`mtime_ns`)."""
    with rasterio.open(path) as src:
        table = src.colormap(1)
    size = max(256, max(table, default=0) + 2)
    colours, opaque = np.zeros((size, 3), np.uint8), np.ones(size, bool)
    for index, (r, g, b, a) in table.items():
        colours[index], opaque[index] = (r, g, b), a > 0
    return colours, opaque


def stretch_to_uint8(data: np.ma.MaskedArray, stretch: tuple[tuple[float, float], ...] | None) -> np.ndarray:
    arr = data.filled(0).astype(np.float32)
    if stretch is None:
        return np.clip(arr, 0, 255).astype(np.uint8)
    lo = np.array([s[0] for s in stretch], np.float32)[:, None, None]
    hi = np.array([s[1] for s in stretch], np.float32)[:, None, None]
    arr = np.nan_to_num((arr - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def gdal_reason(exc: BaseException) -> str:
    """What GDAL said about a failed open or read. Rasterio's error of a failed read says only
    "Read failed. See previous exception for details."; GDAL's words (a file cut short: "got 0
    bytes, expected 85801") are at the end of its cause chain."""
    if "See previous exception" not in str(exc):
        return str(exc)
    reason = exc
    while reason.__cause__ is not None:
        reason = reason.__cause__
    return str(reason)


def unopenable(path: str, exc: Exception) -> RasterReadError:
    """The error of a raster that cannot be opened to read its tiles: opened when a run planned
    it, it may be gone or damaged by the time its tiles are read."""
    return RasterReadError(path, f"{path}: cannot open it to read tiles ({gdal_reason(exc)})")


@dataclass
class TileReader:
    """Reads tiles of one raster as (S, S, 3) uint8 plus their (S, S) valid-pixel mask; keep it open per raster."""

    raster: RasterInfo
    tile_size: int
    _src: rasterio.DatasetReader | None = field(default=None, init=False)

    def __enter__(self) -> "TileReader":
        try:
            self._src = rasterio.open(self.raster.path)
        except RasterioIOError as exc:
            raise unopenable(self.raster.path, exc) from exc
        return self

    def __exit__(self, *exc) -> None:
        if self._src is not None:
            self._src.close()

    def read(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        assert self._src is not None, "use TileReader as a context manager"
        return read_tile(self._src, self.raster, tile, self.tile_size)


def read_tile(src: rasterio.DatasetReader, raster: RasterInfo, tile: Tile, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One tile of `raster`, open as `src`, as (S, S, 3) uint8 (nodata filled from its nearest
    valid pixel) and its (S, S) valid-pixel mask."""
    inside = (tile.col_off >= 0 and tile.row_off >= 0 and tile.col_off + tile.width <= src.width
              and tile.row_off + tile.height <= src.height)
    out_shape = (len(raster.read_bands), tile_size, tile_size)
    try:
        data = src.read(raster.read_bands, window=tile.window, out_shape=out_shape,
                        resampling=resampling_for(raster, tile.scale > 1), masked=True, boundless=not inside)
    except RasterioIOError as exc:
        raise RasterReadError(raster.path, f"{raster.path}: cannot read window {tile.window} "
                                           f"({gdal_reason(exc)})") from exc
    return natural_colour(data, raster)


def read_reaching_past(src: rasterio.DatasetReader, bands: list[int], col0: int, row0: int, col1: int, row1: int,
                       out_shape: tuple[int, int], resampling: Resampling) -> np.ma.MaskedArray:
    """The window [col0, col1) x [row0, row1) of an open raster at `out_shape` (rows, cols), masked
    wherever it reaches past the raster: (bands, rows, cols). Only the output pixels wholly inside
    are read, through a window of fractional offsets (the values of those pixels in the whole
    window read at once, to GDAL's rounding: at most 1 apart when averaging); a pixel the edge
    cuts is masked too. GDAL's boundless read builds a VRT at every call: 5.8-22 ms against
    0.1-3 ms for the same window inside (measured on the demo raster), and most of a small
    raster's searched places reach past an edge. Tiles keep GDAL's boundless read (TileReader),
    so that indexes stay as they were built."""
    out_h, out_w = out_shape
    (i0, i1), (top, bottom) = _inside(row0, row1, out_h, src.height)
    (j0, j1), (left, right) = _inside(col0, col1, out_w, src.width)
    if j1 <= j0 or i1 <= i0:
        return np.ma.masked_all((len(bands), out_h, out_w), src.dtypes[bands[0] - 1])
    inside = src.read(bands, window=Window(left, top, right - left, bottom - top), out_shape=(len(bands), i1 - i0, j1 - j0),
                      resampling=resampling, masked=True)
    if (i0, j0, i1, j1) == (0, 0, out_h, out_w):
        return inside
    out = np.ma.masked_all((len(bands), out_h, out_w), inside.dtype)
    out[:, i0:i1, j0:j1] = inside
    return out


def _inside(start: int, end: int, out: int, extent: int) -> tuple[tuple[int, int], tuple[float, float]]:
    """Along one axis, of a span [start, end) of raster pixels read as `out` pixels, the output
    pixels [first, last) lying wholly within [0, extent), and the raster span they cover (the
    span's own ends where nothing is cut)."""
    step = (end - start) / out
    first, last = max(0, math.ceil(-start / step - 1e-9)), min(out, math.floor((extent - start) / step + 1e-9))
    return (first, last), (start if first == 0 else start + first * step, end if last == out else start + last * step)


def fill_from_nearest_valid(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Nodata pixels take the value of the nearest valid pixel, so that where the data ends (a
    scene's collar, masked bright pixels) is not drawn as a line in sketches of the tile."""
    if valid.all() or not valid.any():
        return np.ascontiguousarray(image)
    _, (rows, cols) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return np.ascontiguousarray(image[rows, cols])
