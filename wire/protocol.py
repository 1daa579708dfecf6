"""Messages between the worker and its clients (docs/protocol.md). Stdlib only.

A message is a multipart ZeroMQ message. Frame 0 is a UTF-8 JSON header
{"v": 1, "id": "...", "op": "...", ...fields}; binary payloads (a sketch PNG) ride in later
frames and are referred to by number ("sketch_frame": 1). Every request gets exactly one reply:
{"v": 1, "id": ..., "ok": true, ...} or {"v": 1, "id": ..., "ok": false,
"error": {"code": "...", "message": "..."}}. Job progress is published as [b"job.<id>", JSON].
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import (BAD_JSON, BAD_REQUEST, INTERNAL, UNKNOWN_OP, UNSUPPORTED_VERSION, ProtocolError,
                     WorkerError)

VERSION = 1
OPS = ("ping", "info", "list_indexes", "index", "job", "cancel", "search", "delete_index", "remove_rasters")
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
# the search's `top`: its default and limit (worker.app.SearchRequest checks them; clients show them)
DEFAULT_TOP = 10
MAX_TOP = 1000
# a search's strokes: enough for minutes of freehand drawing (QGIS sends every mouse move), few
# enough that one request's strokes cost a few MB in the worker
MAX_STROKES = 1000
MAX_STROKE_POINTS = 50_000  # over all strokes
MAX_ID_CHARS = 128  # a request id is echoed in its reply
# an `index` request's rasters: each entry is found on disk on the worker's loop thread, where 50,000
# took 4-8 s, no one answered meanwhile; a folder entry names any number of files
MAX_RASTER_ENTRIES = 10_000
# an index's tile size, in raster pixels (worker.tiling.TileSettings checks it; clients offer it)
MIN_TILE, MAX_TILE = 32, 4096
# the GDAL drivers a worker opens for its clients (worker.raster_access), so that a client offers
# no other (a GeoPackage's raster was ticked, and the worker refused the whole build)
CLIENT_DRIVERS = ("GTiff", "VRT", "JP2OpenJPEG", "HFA", "PNG", "JPEG", "ECW", "JP2ECW", "MrSID", "JP2MrSID",
                  "USGSDEM", "EHdr")
# the worker's log records on stderr (worker.cli), which a client that started it reads: a record
# says what the worker did (serving, it logs its jobs), not why it stopped
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
EXCERPT_CHARS = 200  # how much of a rejected value an error message quotes (a path fits)
PROGRESS_TOPIC = b"job."


def others_unfinished(paths) -> str:
    """An index's other rasters an earlier run left unfinished, as the end of a run that added
    rasters says them (the command line, the dock, Processing) and why its shortlist waits."""
    return f"{len(paths)} other raster(s) of the index not fully indexed (an earlier run stopped or failed)"


def new_id() -> str:
    return uuid.uuid4().hex[:16]


# -- requests ----------------------------------------------------------------------------------
def encode_request(op: str, request_id: Optional[str] = None, frames: tuple = (), **fields: Any) -> list:
    """A request's frames: the JSON header, then the binary payloads `frames`."""
    header = {"v": VERSION, "id": request_id or new_id(), "op": op, **fields}
    return [json.dumps(header).encode()] + list(frames)


def request_id_of(message: list) -> str:
    """The id of a request made by encode_request."""
    return json.loads(message[0])["id"]


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A value as an error message quotes it: its repr, cut to `limit` characters (a rejected
    value may be megabytes long, and replies echo messages)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def decode_header(frame: bytes) -> dict:
    """Frame 0 of a request or reply as a dict; ProtocolError(BAD_JSON) for anything else."""
    return _decode(frame, json.loads)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:EXCERPT_CHARS]} is out of range")
    return value


MAX_INT_DIGITS = 18  # integers a request may carry: within int64, and exact as a float's 2**53 or near it


def _bounded_int(text: str) -> int:
    """An integer of at most MAX_INT_DIGITS digits: a 400-digit one overflowed every float it met
    (a bbox, a weight), an `internal` error."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer {text[:EXCERPT_CHARS]}... has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a request may carry")


def decode_request(frame: bytes) -> dict:
    """Frame 0 of a request as a dict, its numbers finite (no NaN, Infinity, 1e400 or integers of
    hundreds of digits); ProtocolError(BAD_JSON) for anything else, too deeply nested or too long a
    number included."""
    return _decode(frame, lambda text: json.loads(text, parse_float=_finite, parse_int=_bounded_int,
                                                  parse_constant=_no_constant))


def _decode(frame: bytes, loads: Callable[[str], Any]) -> dict:
    try:
        header = loads(frame.decode("utf-8"))
    except RecursionError:
        raise ProtocolError(BAD_JSON, "frame 0 is nested too deeply to read") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and numbers over Python's digit limit
        raise ProtocolError(BAD_JSON, f"frame 0 must be a UTF-8 JSON object ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise ProtocolError(BAD_JSON, "frame 0 must be a JSON object")
    return header


def check_request(header: dict) -> str:
    """Validate the fields every request has; returns the op."""
    version = header.get("v")
    if type(version) is not int or version != VERSION:  # true and 1.0 equal 1 in Python, not on the wire
        raise ProtocolError(UNSUPPORTED_VERSION, f"protocol version {excerpt(version)} not supported "
                                                 f"(this worker speaks {VERSION})")
    request_id = header.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_CHARS:
        raise ProtocolError(BAD_REQUEST, f"field 'id' must be a non-empty string of at most {MAX_ID_CHARS} characters")
    op = header.get("op")
    if op not in OPS:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {excerpt(op)}; known: {', '.join(OPS)}")
    return op


def field(header: dict, name: str, kind: Any, default: Any = ..., check: Optional[Callable[[Any], bool]] = None) -> Any:
    """A typed request field; ProtocolError(BAD_REQUEST) names the field and what was expected.
    An absent (or null) field gives `default`, or is an error when there is none."""
    if name not in header or header[name] is None:
        if default is ...:
            raise ProtocolError(BAD_REQUEST, f"field {name!r} is required")
        return default
    value = header[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(BAD_REQUEST, f"field {name!r} must be {_kind_name(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise ProtocolError(BAD_REQUEST, f"field {name!r} must be {_kind_name(kinds)}, got {type(value).__name__}")
    if check is not None and not check(value):
        raise ProtocolError(BAD_REQUEST, f"field {name!r} has an invalid value {excerpt(value)}")
    return value


def _kind_name(kinds: tuple) -> str:
    return " or ".join(k.__name__ for k in kinds)


# -- replies -----------------------------------------------------------------------------------
def ok_reply(request_id: Optional[str], **fields: Any) -> list:
    return [json.dumps({"v": VERSION, "id": request_id, "ok": True, **fields}).encode()]


def error_reply(request_id: Optional[str], code: str, message: str) -> list:
    return [json.dumps({"v": VERSION, "id": request_id, "ok": False,
                        "error": {"code": code, "message": message}}).encode()]


@dataclass(frozen=True)
class Reply:
    """One reply as a client reads it: the id of its request, and its fields or the worker's error."""

    id: Optional[str]
    fields: dict
    error: Optional[WorkerError]

    def result(self) -> dict:
        """The reply's fields; raises the worker's error for an error reply."""
        if self.error is not None:
            raise self.error
        return self.fields


def decode_reply(frames: list) -> Reply:
    """A reply as received on a REQ or DEALER socket (an echoed empty envelope frame is skipped);
    ProtocolError(BAD_JSON) when its header cannot be read."""
    header = decode_header(frames[1] if len(frames) > 1 and frames[0] == b"" else frames[0])
    request_id = header.get("id") if isinstance(header.get("id"), str) else None
    if header.get("ok"):
        return Reply(request_id, header, None)
    error = header.get("error") if isinstance(header.get("error"), dict) else {}
    return Reply(request_id, header, WorkerError(str(error.get("code", INTERNAL)),
                                                 str(error.get("message", "error reply without a message"))))


# -- progress ----------------------------------------------------------------------------------
def progress_event(job: dict) -> list:
    """A PUB message: the topic b"job.<id>", then the job as JSON."""
    return [PROGRESS_TOPIC + job["id"].encode(), json.dumps({"v": VERSION, "event": "job", "job": job}).encode()]


def decode_progress(frames: list) -> Optional[dict]:
    """The job of a progress message, or None for a message that is not one."""
    if len(frames) != 2 or not frames[0].startswith(PROGRESS_TOPIC):
        return None
    try:
        job = json.loads(frames[1].decode("utf-8")).get("job")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return job if isinstance(job, dict) else None
