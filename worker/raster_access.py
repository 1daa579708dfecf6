"""Which raster files a request may have the worker read.

The command line reads what its user names (RasterAccess() confines nothing). A client of the
service is confined to the worker's raster roots: a path it names, every file found in a folder
it names and every file a VRT reads (its sources, nested VRTs) must resolve, links followed,
inside a root; GDAL's virtual file systems (/vsicurl/, /vsis3/, ...), URLs and driver prefixes
are refused, so a request can make the worker neither read files elsewhere nor send network
requests; and only the formats in CLIENT_DRIVERS are opened, not those that point elsewhere by
design (WMS, tile indexes, HDF5 external links).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from wire.protocol import CLIENT_DRIVERS, excerpt
from worker.errors import ForbiddenError, InputError

MAX_PATH_CHARS = 4096
MAX_VRT_BYTES = 16 * 1024 * 1024
MAX_VRT_DEPTH = 8  # VRTs of VRTs
VRT_SNIFF_BYTES = 1024  # GDAL's VRT driver looks for "<VRTDataset" in a file's first bytes, whatever its name
DRIVER_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_]+:")  # GDAL's "NETCDF:file:var", "GTIFF_DIR:1:file"
SOURCE_TAGS = ("sourcefilename", "sourcedataset")  # where a VRT names what it reads (any case, as GDAL)
LEADING_INTEGER = re.compile(r"\s*([+-]?\d+)")  # what C's atoi, and so GDAL, reads of relativeToVRT


class OutsideRoots(ForbiddenError):
    """A raster outside the roots this worker serves: a worker started without the root that
    holds it keeps a job of it to try again (worker.service.jobs)."""


@dataclass(frozen=True)
class RasterAccess:
    """Unconfined (roots None: the command line) or confined to `roots` (a service client)."""

    roots: tuple[Path, ...] | None = None

    @property
    def drivers(self) -> tuple[str, ...] | None:
        """The GDAL drivers open_raster may use (None: any)."""
        return CLIENT_DRIVERS if self.roots is not None else None

    def resolve(self, name: str | Path) -> Path:
        """A raster path as the user wrote it -> the absolute path, links resolved. A client's
        is refused (ForbiddenError) unless it is a plain path inside a root."""
        text = str(name)
        if not text or len(text) > MAX_PATH_CHARS or any(ord(c) < 32 for c in text):
            raise InputError(f"raster path {excerpt(text)} must be a non-empty path of at most {MAX_PATH_CHARS} "
                             "characters without control characters")
        if self.roots is None:
            return Path(text).expanduser().resolve()
        if text.startswith("~"):
            raise ForbiddenError(f"raster path {excerpt(text)}: '~' is not expanded for clients; give the path "
                                 f"inside the raster roots ({self._roots_text()})")
        self._refuse_special(text, "raster path")
        return self.check_inside(Path(text).resolve(), text)

    def check_file(self, path: Path) -> Path:
        """A file found or named for indexing: inside a root, and so is everything it reads
        when it is a VRT. Returns its resolved path."""
        if self.roots is None:
            return path.resolve()
        resolved = self.check_inside(path.resolve(), str(path))
        self._check_vrt_sources(resolved, depth=0, passed={})
        return resolved

    def check_inside(self, resolved: Path, named: str) -> Path:
        assert self.roots is not None
        if not any(resolved.is_relative_to(root) for root in self.roots):
            shown = excerpt(named) if named == str(resolved) else f"{excerpt(named)} (resolves to {excerpt(str(resolved))})"
            raise OutsideRoots(f"raster {shown} is outside the raster roots this worker serves ({self._roots_text()})")
        return resolved

    def _roots_text(self) -> str:
        return ", ".join(str(r) for r in self.roots or ())

    @staticmethod
    def _refuse_special(text: str, what: str) -> None:
        """GDAL reads more than files: /vsicurl/ and friends, URLs, "DRIVER:..." connection strings."""
        if text.startswith("/vsi") or "://" in text or text.startswith("<") or DRIVER_PREFIX.match(text):
            raise ForbiddenError(f"{what} {excerpt(text)}: GDAL virtual file systems, URLs and driver prefixes are not "
                                 "served to clients; name a file inside the raster roots")

    def _check_vrt_sources(self, path: Path, depth: int, passed: dict[Path, int]) -> None:
        """Check what a VRT at `depth` reads, each file once: `passed` holds, for each file whose
        sources passed, the deepest it passed at (a pass there holds at any depth above it). A
        VRT naming the one below it 6 times (a mosaic of one sheet repeated, or 6 bands of one
        file), nested 7 deep, was parsed once for every path through the nesting: 56,000
        parses, 22 s on the service's loop, which answered no one meanwhile."""
        if passed.get(path, -1) >= depth or not is_vrt(path):
            return
        if depth >= MAX_VRT_DEPTH:
            raise InputError(f"{path}: VRTs nest more than {MAX_VRT_DEPTH} deep")
        for source in dict.fromkeys(vrt_sources(path)):
            self._check_vrt_source(path, source, depth, passed)
        passed[path] = depth

    def _check_vrt_source(self, vrt: Path, source: tuple[str, bool], depth: int, passed: dict[Path, int]) -> None:
        name, relative = source
        self._refuse_special(name, f"{vrt}: source")
        if any(ord(c) < 32 for c in name):
            raise InputError(f"{vrt}: source {excerpt(name)} has control characters")
        resolved = source_path(vrt, name, relative)
        self.check_inside(resolved, f"{name} (a source of {vrt})")
        if resolved.is_file():
            self._check_vrt_sources(resolved, depth + 1, passed)


def is_vrt(path: Path) -> bool:
    """Whether GDAL would read `path` as a VRT (by its content, as GDAL does, not its name)."""
    try:
        with open(path, "rb") as f:
            return b"<vrtdataset" in f.read(VRT_SNIFF_BYTES).lower()  # any case: checked rather than missed
    except OSError:
        return False


def source_path(vrt: Path, name: str, relative: bool) -> Path:
    """Where a VRT's source (vrt_sources) lies, resolved: beside the VRT when it is relative to it."""
    return ((vrt.parent / name) if relative and not Path(name).is_absolute() else Path(name)).resolve()


def vrt_sources(path: Path) -> list[tuple[str, bool]]:
    """Every file a VRT names, with whether it is relative to the VRT's folder; refuses Python
    pixel functions (code the VRT would have the worker run). Names are matched as GDAL matches
    them: in any case, whatever their XML namespace, as elements or as attributes
    (`<sourcefilename>`, a `xmlns` on the root and `<SimpleSource SourceFilename="...">` read
    files as well)."""
    if path.stat().st_size > MAX_VRT_BYTES:
        raise InputError(f"{path}: a VRT of more than {MAX_VRT_BYTES} bytes")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputError(f"{path}: not a readable VRT ({exc})") from exc
    sources = []
    for element in root.iter():
        tag = _xml_name(element.tag)
        attributes = _attributes(element)
        # GDAL finds a name as a child element or as an attribute: <SimpleSource SourceFilename="...">
        language = attributes.get("pixelfunctionlanguage", element.text if tag == "pixelfunctionlanguage" else "")
        if tag == "pixelfunctioncode" or "pixelfunctioncode" in attributes or (language or "").strip().lower() == "python":
            raise ForbiddenError(f"{path}: VRT pixel functions in Python are not run for clients")
        if tag in SOURCE_TAGS:
            sources.append(((element.text or "").strip(), _relative_to_vrt(attributes)))
        sources += [(value.strip(), False) for name, value in attributes.items() if name in SOURCE_TAGS]
    return sources


def local_file(name: str) -> bool:
    """Whether a VRT's source is a file on a local disk (not /vsi, a URL or NETCDF:"x.nc":v)."""
    return not name.startswith("/vsi") and "://" not in name and not DRIVER_PREFIX.match(name)


def vrt_sheets(path: Path) -> list[tuple[str, tuple[float, float, float, float]]]:
    """The local files a VRT reads, named as GDAL opens them (joined to the VRT's folder, not
    resolved), and the pixel box (col0, row0, col1, row1) each fills (its DstRect; the whole
    raster without one): a mosaic's sheets. Sources of every band, as vrt_sources finds them (any
    case, any namespace, element or attribute). Read as a stream, each source let go once read:
    a country's VRT of 50,000 sheets is 56 MB: parsed whole, its first read took 7.3 s and 377 MB
    more at its peak; streamed, 2.4 s and 44 MB (lab/mosaic_scale --sheets)."""
    sheets: dict[tuple[str, tuple[float, float, float, float]], None] = {}  # each band names them again
    for _, element in ET.iterparse(path):
        if isinstance(element.tag, str) and element.tag.lower().endswith("source"):
            sheet = _sheet(path, element)
            element.clear()
            if sheet is not None:
                sheets[sheet] = None
    return list(sheets)


def _sheet(vrt: Path, source: ET.Element) -> tuple[str, tuple[float, float, float, float]] | None:
    """A VRT source element's local file and the box it fills (vrt_sheets); None for another kind
    of source (/vsi, a URL, a driver's connection string) or one naming none."""
    fields = {_xml_name(child.tag): child for child in source}
    named = fields.get("sourcefilename")
    if named is not None:
        name = (named.text or "").strip()
        relative = _relative_to_vrt(_attributes(named))
    else:
        name = _attributes(source).get("sourcefilename", "").strip()
        relative = False
    if not name or not local_file(name):
        return None
    box = (0.0, 0.0, float("inf"), float("inf"))
    if "dstrect" in fields:
        rect = {_xml_name(k): float(v) for k, v in fields["dstrect"].attrib.items()}
        x, y = rect.get("xoff", 0.0), rect.get("yoff", 0.0)
        box = (x, y, x + rect.get("xsize", float("inf")), y + rect.get("ysize", float("inf")))
    return (os.path.join(os.path.dirname(vrt), name) if relative else name), box


def _relative_to_vrt(attributes: dict[str, str]) -> bool:
    """Whether a source's name is relative to the VRT's folder: its relativeToVRT read as GDAL
    reads it (a leading integer, not 0: "1", " 1abc")."""
    number = LEADING_INTEGER.match(attributes.get("relativetovrt", "0"))
    return bool(number and int(number.group(1)))


def _attributes(element: ET.Element) -> dict[str, str]:
    """An XML element's attributes by their names as GDAL compares them (_xml_name)."""
    return {_xml_name(k): v for k, v in element.attrib.items()}


def _xml_name(name: object) -> str:
    """An XML tag or attribute name as GDAL compares it: lower case, without its namespace
    (comments and processing instructions have none: "")."""
    return name.rsplit("}", 1)[-1].lower() if isinstance(name, str) else ""
