"""A blocking client for the worker: pyzmq + stdlib only, so QGIS's Python can import it.

Reliability follows the zguide's Lazy Pirate: each request waits at most `timeout` seconds;
on silence the REQ socket is closed (it cannot be reused after a lost reply) and the request
is sent again on a fresh socket, `retries` times, before WorkerUnavailable is raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from . import protocol


class WorkerError(Exception):
    """The worker answered with an error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class WorkerUnavailable(WorkerError):
    """No reply within the time limit after every retry: the worker is down or unreachable."""

    def __init__(self, endpoint: str, attempts: int, timeout: float):
        super().__init__("unavailable", f"no reply from {endpoint} after {attempts} attempt(s) of {timeout:g} s")


@dataclass(frozen=True)
class CurveKeys:
    """Keys for an encrypted, authenticated connection to a remote worker (zmq.auth files)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_public_file: Path | str, client_secret_file: Path | str) -> "CurveKeys":
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(str(server_public_file))
        client_public, client_secret = zmq.auth.load_certificate(str(client_secret_file))
        if client_secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key")
        return cls(server_public, client_public, client_secret)

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.client_public
        socket.curve_secretkey = self.client_secret


class WorkerClient:
    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout: float = 30.0, retries: int = 2,
                 curve: CurveKeys | None = None, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.curve = curve
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve:
                self.curve.apply(sock)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, op: str, frames: tuple[bytes, ...] = (), timeout: float | None = None, **fields: Any) -> dict:
        """Send one request and return its reply; WorkerError on an error reply."""
        timeout = self.timeout if timeout is None else timeout
        message = protocol.encode_request(op, frames=frames, **fields)
        request_id = json.loads(message[0])["id"]
        for _ in range(self.retries + 1):
            sock = self._connect()
            sock.send_multipart(message)
            if sock.poll(int(timeout * 1000), zmq.POLLIN):
                reply = protocol.decode_header(sock.recv_multipart()[0])
                if reply.get("id") not in (request_id, None):
                    self._reset()
                    continue
                if not reply.get("ok"):
                    err = reply.get("error") or {}
                    raise WorkerError(err.get("code", protocol.INTERNAL), err.get("message", "error reply without message"))
                return reply
            self._reset()
        raise WorkerUnavailable(self.endpoint, self.retries + 1, timeout)

    # -- ops ------------------------------------------------------------------------------------
    def ping(self, timeout: float | None = None) -> dict:
        return self.request("ping", timeout=timeout)

    def info(self) -> dict:
        return self.request("info")

    def list_indexes(self) -> list[dict]:
        return self.request("list_indexes")["indexes"]

    def start_index(self, index: str, rasters: list[str], **settings: Any) -> dict:
        """Start (or join the running) indexing job for `index`; returns the job."""
        return self.request("index", index=index, rasters=rasters, **settings)["job"]

    def job(self, job_id: str) -> dict:
        return self.request("job", job=job_id)["job"]

    def cancel(self, job_id: str) -> dict:
        return self.request("cancel", job=job_id)["job"]

    def search(self, index: str, sketch_png: bytes | None = None, strokes: list | None = None,
               strokes_crs: str | None = None, timeout: float | None = None, **options: Any) -> dict:
        """Hits as a GeoJSON FeatureCollection (reply field "hits") plus "timings_ms"."""
        if (sketch_png is None) == (strokes is None):
            raise ValueError("give exactly one of sketch_png or strokes")
        if sketch_png is not None:
            return self.request("search", frames=(sketch_png,), timeout=timeout, index=index, sketch_frame=1, **options)
        return self.request("search", timeout=timeout, index=index, strokes=strokes, strokes_crs=strokes_crs, **options)


def subscribe_progress(endpoint: str, context: zmq.Context | None = None, curve: CurveKeys | None = None) -> zmq.Socket:
    """A SUB socket receiving job progress events (topic b"job.<id>", then JSON)."""
    sock = (context or zmq.Context.instance()).socket(zmq.SUB)
    if curve:
        curve.apply(sock)
    sock.setsockopt(zmq.SUBSCRIBE, b"job.")
    sock.connect(endpoint)
    return sock
