"""A blocking client for the worker: pyzmq + stdlib only, so QGIS's Python can import it.

Reliability follows the zguide's Lazy Pirate: each request waits at most `timeout` seconds;
on silence the REQ socket is closed (it cannot be reused after a lost reply) and the request
is sent again on a fresh socket, `retries` times, before WorkerUnavailable is raised.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import zmq

from . import protocol
from .errors import RequestCancelled, WorkerUnavailable
from .sockets import CurveKeys, connect

CANCEL_POLL_S = 0.1  # how often a request that can be cancelled looks whether it was


class WorkerClient:
    def __init__(self, endpoint: str = protocol.DEFAULT_ENDPOINT, timeout: float = 30.0, retries: int = 2,
                 curve: Optional[CurveKeys] = None, context: Optional[zmq.Context] = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.curve = curve
        self._context = context or zmq.Context.instance()
        self._socket: Optional[zmq.Socket] = None

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            self._socket = connect(self._context, zmq.REQ, self.endpoint, self.curve)
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, op: str, frames: tuple = (), timeout: Optional[float] = None,
                cancelled: Optional[Callable[[], bool]] = None, **fields: Any) -> dict:
        """Send one request and return its reply's fields; WorkerError on an error reply,
        WorkerUnavailable when no reply came after every retry, RequestCancelled as soon as
        `cancelled()` says so (a Processing run's Cancel: not after minutes of waiting on a
        worker that does not answer)."""
        timeout = self.timeout if timeout is None else timeout
        message = protocol.encode_request(op, frames=frames, **fields)
        request_id = protocol.request_id_of(message)
        for _ in range(self.retries + 1):
            sock = self._connect()
            sock.send_multipart(message)
            if self._reply_waits(sock, timeout, cancelled):
                reply = protocol.decode_reply(sock.recv_multipart())
                if reply.id in (request_id, None):
                    return reply.result()
            self._reset()  # silence, or a stale reply: start over on a fresh socket
        raise WorkerUnavailable(self.endpoint, self.retries + 1, timeout)

    def _reply_waits(self, sock: zmq.Socket, timeout: float, cancelled: Optional[Callable[[], bool]]) -> bool:
        """Whether a reply is waiting within `timeout` seconds, looking at `cancelled` meanwhile."""
        if cancelled is None:
            return bool(sock.poll(int(timeout * 1000), zmq.POLLIN))
        deadline = time.monotonic() + timeout
        while not cancelled():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if sock.poll(int(min(left, CANCEL_POLL_S) * 1000), zmq.POLLIN):
                return True
        self._reset()  # a reply that comes later is not read
        raise RequestCancelled(f"stopped waiting for the worker at {self.endpoint}")

    # -- ops ------------------------------------------------------------------------------------
    def ping(self, timeout: Optional[float] = None) -> dict:
        return self.request("ping", timeout=timeout)

    def info(self) -> dict:
        return self.request("info")

    def list_indexes(self) -> list:
        return self.request("list_indexes")["indexes"]

    def start_index(self, index: str, rasters: list, cancelled: Optional[Callable[[], bool]] = None,
                    **settings: Any) -> dict:
        """Start (or join the running) indexing job for `index`; returns the job."""
        return self.request("index", cancelled=cancelled, index=index, rasters=rasters, **settings)["job"]

    def job(self, job_id: str, timeout: Optional[float] = None, cancelled: Optional[Callable[[], bool]] = None) -> dict:
        return self.request("job", timeout=timeout, cancelled=cancelled, job=job_id)["job"]

    def cancel(self, job_id: str, timeout: Optional[float] = None) -> dict:
        return self.request("cancel", timeout=timeout, job=job_id)["job"]

    def search(self, index: str, sketch_png: Optional[bytes] = None, strokes: Optional[list] = None,
               strokes_crs: Optional[str] = None, timeout: Optional[float] = None,
               cancelled: Optional[Callable[[], bool]] = None, **options: Any) -> dict:
        """Hits as a GeoJSON FeatureCollection (reply field "hits") plus "timings_ms"."""
        if (sketch_png is None) == (strokes is None):
            raise ValueError("give exactly one of sketch_png or strokes")
        if sketch_png is not None:
            return self.request("search", frames=(sketch_png,), timeout=timeout, cancelled=cancelled, index=index,
                                sketch_frame=1, **options)
        return self.request("search", timeout=timeout, cancelled=cancelled, index=index, strokes=strokes,
                            strokes_crs=strokes_crs, **options)
