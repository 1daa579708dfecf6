"""What the dock asks the controller for, as values: a worker to connect to, an index to build,
a search. The dock fills them from its widgets; the controller turns them into requests."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, replace
from typing import Optional

import zmq

from .wire.sockets import CurveKeys


@dataclass(frozen=True)
class Tiling:
    """How an index cuts its rasters (the worker's TileSettings, as the `index` op takes them)."""

    tile: int
    overlap: float
    scales: tuple
    bands: Optional[tuple] = None  # None: natural colour from the rasters' colour interpretation
    min_valid: float = 0.5

    @classmethod
    def from_json(cls, d: dict) -> "Tiling":
        """From a `tiling` or `tiling_defaults` object of the worker's replies."""
        return cls(tile=int(d["tile"]), overlap=float(d["overlap"]), scales=tuple(d["scales"]),
                   bands=tuple(d["bands"]) if d.get("bands") else None, min_valid=float(d.get("min_valid", 0.5)))

    def fields(self) -> dict:
        """The `index` request's fields for these settings."""
        return {"tile": self.tile, "overlap": self.overlap, "scales": list(self.scales),
                "bands": list(self.bands) if self.bands else None, "min_valid": self.min_valid}


@dataclass(frozen=True)
class IndexBuild:
    """An index to build, or to extend with more rasters (then with the tiling it was built with)."""

    name: str
    rasters: tuple
    tiling: Optional[Tiling] = None  # None: the worker's defaults

    def fields(self) -> dict:
        return {"index": self.name, "rasters": list(self.rasters), **(self.tiling.fields() if self.tiling else {})}


def endpoint_problem(endpoint: str) -> Optional[str]:
    """Why ZeroMQ cannot dial `endpoint` (`localhost:5555`, a typo), said for the user; None when
    it can (whether a worker answers there is another matter). Asked before the endpoint is
    used or saved, so that nothing else a socket raises is blamed on how it is written."""
    port = endpoint.rsplit(":", 1)[-1] if endpoint.startswith("tcp://") else ""
    if port.isdigit() and not 0 < int(port) < 65536:  # ZeroMQ takes tcp://127.0.0.1:99999, then nothing answers
        return f"Cannot connect to “{endpoint}”: a port is 1 to 65535, e.g. tcp://127.0.0.1:5555."
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        return f"Cannot connect to “{endpoint}” ({exc}): an endpoint is written tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555."
    finally:
        sock.close(linger=0)
        context.term()
    return None


@dataclass(frozen=True)
class Connection:
    """A worker to connect to; both key files (paths) for a remote worker, neither for a local one."""

    endpoint: str
    server_key: str = ""  # the worker's public key (server.key)
    client_key: str = ""  # this client's secret key (client.key_secret), authorised on the worker

    def curve_keys(self) -> Optional[CurveKeys]:
        """The CURVE keys, or None; ValueError or OSError says what is wrong with them."""
        if not self.server_key and not self.client_key:
            return None
        if not (self.server_key and self.client_key):
            raise ValueError("give both the server's public key and your client secret key, or neither")
        return CurveKeys.from_files(self.server_key, self.client_key)


@dataclass(frozen=True)
class SearchQuery:
    """One search as the user set it up: exactly one of a sketch image, strokes or an example
    place ({raster, bbox, crs}: a rectangle of a raster, in its CRS), and optionally the marks
    of an earlier search's hits ({positive: [ids], negative: [ids]})."""

    index: str
    top: int
    crs: str  # of the hits (the project's)
    sketch_png: Optional[bytes] = None
    strokes: Optional[list] = None  # [[[x, y], ...], ...]
    strokes_crs: Optional[str] = None  # a CRS, or "pixel" for the pad (y down)
    strokes_frame: Optional[list] = None  # [x0, y0, x1, y1]: the pad the strokes were drawn in
    bbox: Optional[list] = None  # the search area, in bbox_crs
    bbox_crs: Optional[str] = None
    example: Optional[dict] = None
    feedback: Optional[dict] = None

    def message(self) -> tuple:
        """(payload frames, fields) of the search request."""
        fields = {"index": self.index, "top": self.top, "crs": self.crs}
        frames: tuple = ()
        if self.sketch_png is not None:
            frames, fields["sketch_frame"] = (self.sketch_png,), 1
        elif self.example is not None:
            fields["example"] = self.example
        else:
            fields.update(strokes=self.strokes, strokes_crs=self.strokes_crs)
            if self.strokes_frame is not None:
                fields["strokes_frame"] = self.strokes_frame
        if self.bbox is not None:
            fields.update(bbox=self.bbox, bbox_crs=self.bbox_crs)
        if self.feedback is not None:
            fields["feedback"] = self.feedback
        return frames, fields

    def with_feedback(self, positive: list, negative: list) -> "SearchQuery":
        """The same search with these marks (None when there are none)."""
        marks = {"positive": list(positive), "negative": list(negative)} if positive or negative else None
        return replace(self, feedback=marks)

    def to_json(self) -> str:
        """The query as saved with its results layer (the sketch image as base64)."""
        d = asdict(self)
        if self.sketch_png is not None:
            d["sketch_png"] = base64.b64encode(self.sketch_png).decode("ascii")
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "SearchQuery":
        """A saved query; ValueError when it is not one."""
        try:
            d = json.loads(text)
            if d.get("sketch_png") is not None:
                d["sketch_png"] = base64.b64decode(d["sketch_png"])
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a saved sketch search ({exc})") from None
