"""Non-blocking requests to the worker from Qt's event loop.

A DEALER socket watched by a QSocketNotifier: the UI never waits on the network. ZeroMQ's
notification fd is edge-triggered, so every wake-up drains all queued messages, and a drain
is scheduled after each send. A request unanswered within its timeout fails with
WorkerUnavailable and the socket is replaced by a fresh one (Lazy Pirate).
"""

from __future__ import annotations

import json
import traceback
from typing import Callable

import zmq
from qgis.PyQt.QtCore import QObject, QSocketNotifier, QTimer, pyqtSignal

from .worker_client import protocol
from .worker_client.client import CurveKeys, WorkerError, WorkerUnavailable

Callback = Callable[[dict | None, WorkerError | None], None]


class WorkerLink(QObject):
    job_event = pyqtSignal(dict)  # a job progress event from the worker's PUB socket
    callback_failed = pyqtSignal(str)  # a reply handler raised: reported, never allowed to abort QGIS

    def __init__(self, endpoint: str, pub_endpoint: str | None = None, curve: CurveKeys | None = None,
                 timeout_s: float = 60.0, parent: QObject | None = None):
        super().__init__(parent)
        self.endpoint = endpoint
        self.curve = curve
        self.timeout_s = timeout_s
        # a private context, destroyed on close: an open socket on the global context makes
        # zmq_ctx_term (at interpreter exit) wait forever, and QGIS would hang on quit
        self._context = zmq.Context()
        self._pending: dict[str, tuple[Callback, QTimer]] = {}
        self._sock = self._notifier = None
        self._sub = self._sub_notifier = None
        self._open()
        if pub_endpoint:
            self.subscribe(pub_endpoint)

    # -- sockets ------------------------------------------------------------------------------
    def _open(self) -> None:
        self._sock = self._context.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if self.curve:
            self.curve.apply(self._sock)
        self._sock.connect(self.endpoint)
        self._notifier = QSocketNotifier(self._sock.getsockopt(zmq.FD), QSocketNotifier.Read, self)
        self._notifier.activated.connect(self._drain)

    def _close_socket(self) -> None:
        if self._notifier is not None:
            self._notifier.setEnabled(False)
            self._notifier.deleteLater()
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._notifier = None

    def subscribe(self, pub_endpoint: str) -> None:
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        if self.curve:
            self.curve.apply(self._sub)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"job.")
        self._sub.connect(pub_endpoint)
        self._sub_notifier = QSocketNotifier(self._sub.getsockopt(zmq.FD), QSocketNotifier.Read, self)
        self._sub_notifier.activated.connect(self._drain_events)

    def close(self) -> None:
        for request_id in list(self._pending):
            _, timer = self._pending.pop(request_id)
            timer.stop()
        self._close_socket()
        if self._sub is not None:
            self._sub_notifier.setEnabled(False)
            self._sub.close(linger=0)
            self._sub = None
        self._context.destroy(linger=0)

    # -- requests -------------------------------------------------------------------------------
    def request(self, op: str, callback: Callback, frames: tuple[bytes, ...] = (), timeout_s: float | None = None,
                **fields) -> str:
        """Send a request; `callback(reply, None)` or `callback(None, error)` runs exactly once."""
        message = protocol.encode_request(op, frames=frames, **fields)
        request_id = json.loads(message[0])["id"]
        timer = QTimer(self)
        timer.setSingleShot(True)
        timer.timeout.connect(lambda: self._expire(request_id))
        timer.start(int(1000 * (timeout_s or self.timeout_s)))
        self._pending[request_id] = (callback, timer)
        self._sock.send_multipart(message)
        QTimer.singleShot(0, self._drain)
        return request_id

    def _expire(self, request_id: str) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        # a REQ-less DEALER could keep going, but a silent worker may have lost our message:
        # start over on a fresh socket, as the Lazy Pirate does
        self._close_socket()
        self._open()
        self._call(entry[0], None, WorkerUnavailable(self.endpoint, 1, self.timeout_s))

    def _call(self, callback: Callback, reply: dict | None, error: WorkerError | None) -> None:
        # PyQt aborts the whole application on an exception escaping a slot
        try:
            callback(reply, error)
        except Exception:
            self.callback_failed.emit(traceback.format_exc())

    def _drain(self, *_: object) -> None:
        sock = self._sock
        while sock is not None and not sock.closed and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart(zmq.NOBLOCK)
            try:
                reply = protocol.decode_header(frames[-1] if frames[0] == b"" else frames[0])
            except protocol.ProtocolError:
                continue
            entry = self._pending.pop(reply.get("id"), None)
            if entry is None:
                continue  # the answer to a request that already timed out
            callback, timer = entry
            timer.stop()
            if reply.get("ok"):
                self._call(callback, reply, None)
            else:
                err = reply.get("error") or {}
                self._call(callback, None, WorkerError(err.get("code", "internal"), err.get("message", "")))

    def _drain_events(self, *_: object) -> None:
        while self._sub is not None and self._sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            _, body = self._sub.recv_multipart(zmq.NOBLOCK)
            try:
                self.job_event.emit(json.loads(body)["job"])
            except (ValueError, KeyError):
                continue
