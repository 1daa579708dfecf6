"""The wire protocol between the QGIS plugin (or any client) and the worker. Stdlib only.

A message is a multipart ZeroMQ message. Frame 0 is a UTF-8 JSON header
{"v": 1, "id": "...", "op": "...", ...fields}; binary payloads (a sketch PNG) ride in later
frames and are referred to by index ("sketch_frame": 1). Every request gets exactly one reply:
{"v": 1, "id": ..., "ok": true, ...} or {"v": 1, "id": ..., "ok": false,
"error": {"code": "...", "message": "..."}}. See docs/protocol.md.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

VERSION = 1
OPS = ("ping", "info", "list_indexes", "index", "job", "cancel", "search")

# error codes: what the client should do differs per code
BAD_JSON = "bad_json"  # frame 0 is not a UTF-8 JSON object
BAD_REQUEST = "bad_request"  # a field is missing or of the wrong type
UNKNOWN_OP = "unknown_op"
UNSUPPORTED_VERSION = "unsupported_version"
TOO_LARGE = "too_large"
BAD_INPUT = "bad_input"  # a raster, sketch or value the worker cannot use
NOT_FOUND = "not_found"
INDEX_MISMATCH = "index_mismatch"
FORBIDDEN = "forbidden"  # a path outside the allowed roots
TIMEOUT = "timeout"  # the server-side time limit passed
INTERNAL = "internal"  # a bug in the worker; details in its log


class ProtocolError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def encode_request(op: str, request_id: str | None = None, frames: tuple[bytes, ...] = (), **fields: Any) -> list[bytes]:
    header = {"v": VERSION, "id": request_id or new_id(), "op": op, **fields}
    return [json.dumps(header).encode()] + list(frames)


def decode_header(frame: bytes) -> dict:
    """Frame 0 of a request or reply as a dict; ProtocolError(BAD_JSON) for anything else."""
    try:
        header = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(BAD_JSON, f"frame 0 must be a UTF-8 JSON object ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(BAD_JSON, "frame 0 must be a JSON object")
    return header


def check_request(header: dict) -> str:
    """Validate the fields every request has; returns the op."""
    if header.get("v") != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f"protocol version {header.get('v')!r} not supported (this worker speaks {VERSION})")
    if not isinstance(header.get("id"), str) or not header["id"]:
        raise ProtocolError(BAD_REQUEST, "field 'id' must be a non-empty string")
    op = header.get("op")
    if op not in OPS:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {op!r}; known: {', '.join(OPS)}")
    return op


def field(header: dict, name: str, kind: type | tuple[type, ...], default: Any = ..., check=None) -> Any:
    """A typed request field; ProtocolError(BAD_REQUEST) names the field and what was expected."""
    if name not in header or header[name] is None:
        if default is ...:
            raise ProtocolError(BAD_REQUEST, f"field {name!r} is required")
        return default
    value = header[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(BAD_REQUEST, f"field {name!r} must be {kind}, got a boolean")
    if not isinstance(value, kind):
        raise ProtocolError(BAD_REQUEST, f"field {name!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    if check is not None and not check(value):
        raise ProtocolError(BAD_REQUEST, f"field {name!r} has an invalid value {value!r}")
    return value


def ok_reply(request_id: str | None, **fields: Any) -> list[bytes]:
    return [json.dumps({"v": VERSION, "id": request_id, "ok": True, **fields}).encode()]


def error_reply(request_id: str | None, code: str, message: str) -> list[bytes]:
    return [json.dumps({"v": VERSION, "id": request_id, "ok": False,
                        "error": {"code": code, "message": message}}).encode()]


def progress_event(job: dict) -> list[bytes]:
    """A PUB message: topic frame b"job.<id>", then the job as JSON."""
    return [f"job.{job['id']}".encode(), json.dumps({"v": VERSION, "event": "job", "job": job}).encode()]
