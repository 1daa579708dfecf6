"""A blocking client for the worker: pyzmq + stdlib only, so QGIS's Python can import it.

Reliability follows the zguide's Lazy Pirate: each request waits at most `timeout` seconds;
on silence the REQ socket is closed (it cannot be reused after a lost reply) and the request
is sent again on a fresh socket, `retries` times, before WorkerUnavailable is raised. A socket
monitor sees the connection drop (the worker stopped or was killed, its machine went silent
past ZeroMQ's heartbeat, it refused this client's keys), while a request waits or since the
last one, with no worker connected again since: no reply can come then, and ConnectionDropped
is raised at once (a Processing run waited 4 minutes on a killed worker). A search the caller
stops waiting for is cancelled on the worker too.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol
from .errors import ConnectionDropped, NotAWorker, ProtocolError, RequestCancelled, WorkerUnavailable
from .sockets import CONNECTION_EVENTS, HEARTBEAT_S, CurveKeys, connect, dropped_by

CANCEL_POLL_S = 0.1  # how often a request that can be cancelled looks whether it was
CANCEL_SEND_S = 1.0  # how long a search's `cancel` may take to leave before its socket is closed


class WorkerClient:
    def __init__(self, endpoint: str = protocol.DEFAULT_ENDPOINT, timeout: float = 30.0, retries: int = 2,
                 curve: Optional[CurveKeys] = None, context: Optional[zmq.Context] = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.curve = curve
        self._context = context or zmq.Context.instance()
        self._socket: Optional[zmq.Socket] = None
        self._monitor: Optional[zmq.Socket] = None
        self._dropped: Optional[ConnectionDropped] = None  # why the connection dropped, until it is made again

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            self._socket = connect(self._context, zmq.REQ, self.endpoint, self.curve, heartbeat_s=HEARTBEAT_S,
                                   monitor_events=CONNECTION_EVENTS)
            self._socket.setsockopt(zmq.REQ_RELAXED, 1)  # a search's `cancel` follows it unanswered
            self._monitor = self._socket.get_monitor_socket()
        return self._socket

    def _reset(self, linger_s: float = 0.0) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()  # before the socket closes: its own closing is no news
            self._monitor.close(linger=0)
            self._socket.close(linger=int(linger_s * 1000))
            self._socket = self._monitor = self._dropped = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, op: str, frames: tuple = (), timeout: Optional[float] = None,
                cancelled: Optional[Callable[[], bool]] = None, retries: Optional[int] = None, **fields: Any) -> dict:
        """Send one request and return its reply's fields; WorkerError on an error reply,
        WorkerUnavailable when no reply came after every retry (`retries`, else the client's),
        RequestCancelled as soon as `cancelled()` says so (a Processing run's Cancel: not after
        minutes of waiting on a worker that does not answer)."""
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        message = protocol.encode_request(op, frames=frames, **fields)
        request_id = protocol.request_id_of(message)
        for _ in range(retries + 1):
            sock = self._connect()
            try:
                self._raise_if_dropped(since_last=True)  # a worker killed since the last reply takes nothing
                sock.send_multipart(message)
                waits = self._reply_waits(sock, timeout, cancelled)
            except RequestCancelled:
                self._abandon(op, request_id)
                raise
            except ConnectionDropped:
                self._reset()
                raise
            if waits:
                try:
                    reply = protocol.decode_reply(sock.recv_multipart())
                except ProtocolError as exc:
                    self._reset()  # what sent it is no worker: nothing more is read from it
                    raise NotAWorker(self.endpoint, exc.message) from None
                if reply.id in (request_id, None):
                    return reply.result()
            # silence, or a stale reply: start over on a fresh socket. A search is cancelled where it
            # waits first: resent or given up, it ran on, and nobody waited for it (probe)
            self._abandon(op, request_id)
        raise WorkerUnavailable(self.endpoint, retries + 1, timeout)

    def _reply_waits(self, sock: zmq.Socket, timeout: float, cancelled: Optional[Callable[[], bool]]) -> bool:
        """Whether a reply is waiting within `timeout` seconds, looking at `cancelled` and at the
        connection meanwhile: RequestCancelled, or ConnectionDropped."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while cancelled is None or not cancelled():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready = dict(poller.poll(int(min(left, CANCEL_POLL_S if cancelled else left) * 1000)))
            if sock in ready:
                return True
            self._raise_if_dropped(since_last=False)
        raise RequestCancelled(f"stopped waiting for the worker at {self.endpoint}")

    def _raise_if_dropped(self, since_last: bool) -> None:
        """ConnectionDropped when the monitor saw the connection drop: `since_last`, before a
        request is sent, unless a worker has taken the connection again since (one restarted
        gets it); while a request waits, whatever came after, since the connection that took the
        request is gone."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._dropped = None if since_last else self._dropped
            elif self._dropped is None:  # the first cause stays: a refused handshake is followed by its disconnection
                self._dropped = dropped_by(event, self.endpoint, self.curve is not None)
        if self._dropped is not None:
            raise self._dropped

    def _abandon(self, op: str, request_id: str) -> None:
        """Stop waiting for a request (a reply that comes later is not read). A search is
        cancelled on the worker too, from the connection that sent it, as only that one may:
        abandoned, it ran to its end, and the user's next search waited behind it or was refused
        by the worker's full queue."""
        if op == "search":
            try:
                self._socket.send_multipart(protocol.encode_request("cancel", search=request_id), zmq.NOBLOCK)
            except zmq.ZMQError:  # no connection takes it: no worker holds the search
                pass
        self._reset(linger_s=CANCEL_SEND_S if op == "search" else 0.0)

    # -- ops ------------------------------------------------------------------------------------
    def ping(self, timeout: Optional[float] = None) -> dict:
        return self.request("ping", timeout=timeout)

    def info(self, cancelled: Optional[Callable[[], bool]] = None) -> dict:
        return self.request("info", cancelled=cancelled)

    def list_indexes(self) -> list:
        return self.request("list_indexes")["indexes"]

    def start_index(self, index: str, rasters: list, timeout: Optional[float] = None,
                    cancelled: Optional[Callable[[], bool]] = None, **settings: Any) -> dict:
        """Start (or join the running) indexing job for `index`; returns the job."""
        return self.request("index", timeout=timeout, cancelled=cancelled, index=index, rasters=rasters,
                            **settings)["job"]

    def job(self, job_id: str, timeout: Optional[float] = None, cancelled: Optional[Callable[[], bool]] = None) -> dict:
        return self.request("job", timeout=timeout, cancelled=cancelled, job=job_id)["job"]

    def cancel(self, job_id: str, timeout: Optional[float] = None) -> dict:
        return self.request("cancel", timeout=timeout, job=job_id)["job"]

    def search(self, index: str, sketch_png: Optional[bytes] = None, strokes: Optional[list] = None,
               strokes_crs: Optional[str] = None, timeout: Optional[float] = None,
               cancelled: Optional[Callable[[], bool]] = None, retries: Optional[int] = None, **options: Any) -> dict:
        """Hits as a GeoJSON FeatureCollection (reply field "hits") plus "timings_ms"."""
        if (sketch_png is None) == (strokes is None):
            raise ValueError("give exactly one of sketch_png or strokes")
        if sketch_png is not None:
            return self.request("search", frames=(sketch_png,), timeout=timeout, cancelled=cancelled, retries=retries,
                                index=index, sketch_frame=1, **options)
        return self.request("search", timeout=timeout, cancelled=cancelled, retries=retries, index=index,
                            strokes=strokes, strokes_crs=strokes_crs, **options)
