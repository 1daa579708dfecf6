"""Non-blocking requests to the worker from Qt's event loop.

A DEALER socket watched by a QSocketNotifier: the UI never waits on the network. ZeroMQ's
notification fd is edge-triggered, so every wake-up drains all queued messages, and a drain
is scheduled after each send. A request unanswered within its timeout fails with
WorkerUnavailable, and the socket is replaced by a fresh one (Lazy Pirate) once no other request
waits on it. A socket monitor sees the connection drop (the worker stopped or was killed, or,
by ZeroMQ's heartbeat, its machine went silent): the requests waiting on it fail at once, not
after their timeout, and the link says it is lost until the worker answers again.
Messages are made and read by the wire package, as the blocking client does.
"""

from __future__ import annotations

import traceback
from typing import Callable, Optional

import zmq
from qgis.PyQt.QtCore import QObject, QSocketNotifier, QTimer, pyqtSignal
from zmq.utils.monitor import recv_monitor_message

from .wire import protocol
from .wire.errors import (CLOSED, ConnectionClosed, ConnectionDropped, ProtocolError, WorkerError,
                          WorkerUnavailable)
from .wire.sockets import CONNECTION_EVENTS, HEARTBEAT_S, CurveKeys, connect, dialable, dropped_by, subscribe_progress

Callback = Callable[[Optional[dict], Optional[WorkerError]], None]



class WorkerLink(QObject):
    job_event = pyqtSignal(dict)  # a job progress event from the worker's PUB socket
    answered = pyqtSignal()  # a reply came: the worker answers (again)
    callback_failed = pyqtSignal(str)  # a reply handler raised: reported, never allowed to abort QGIS
    lost = pyqtSignal()  # the connection to the worker dropped: it stopped, was killed or went silent
    back = pyqtSignal()  # connected again after `lost` (a worker started again at the endpoint)

    def __init__(self, endpoint: str, curve: Optional[CurveKeys] = None, timeout_s: float = 60.0,
                 parent: Optional[QObject] = None):
        super().__init__(parent)
        self.endpoint = dialable(endpoint, endpoint)  # a worker here bound to every interface: at 127.0.0.1
        self.curve = curve
        self.timeout_s = timeout_s
        # a private context, destroyed on close: an open socket on the global context makes
        # zmq_ctx_term (at interpreter exit) wait forever, and QGIS would hang on quit
        self._context = zmq.Context()
        self._pending: dict = {}  # request id -> (callback, timer, op)
        self._sock = self._notifier = self._monitor = self._monitor_notifier = None
        self._sub = self._sub_notifier = None
        self._lost: Optional[WorkerError] = None  # why, since the connection dropped, until a worker takes one again
        self._open()

    # -- sockets ------------------------------------------------------------------------------
    def _open(self) -> None:
        self._sock = connect(self._context, zmq.DEALER, self.endpoint, self.curve, heartbeat_s=HEARTBEAT_S,
                             monitor_events=CONNECTION_EVENTS)
        self._notifier = QSocketNotifier(self._sock.getsockopt(zmq.FD), QSocketNotifier.Read, self)
        self._notifier.activated.connect(self._drain)
        self._monitor = self._sock.get_monitor_socket()
        self._monitor_notifier = QSocketNotifier(self._monitor.getsockopt(zmq.FD), QSocketNotifier.Read, self)
        self._monitor_notifier.activated.connect(self._watch)
        QTimer.singleShot(0, self._watch)  # an event before the notifier was made

    def _close_socket(self) -> None:
        for notifier in (self._notifier, self._monitor_notifier):
            if notifier is not None:
                notifier.setEnabled(False)
                notifier.deleteLater()
        if self._monitor is not None:
            self._sock.disable_monitor()  # before the socket closes: its own closing is no news
            self._monitor.close(linger=0)
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._notifier = self._monitor = self._monitor_notifier = None

    @property
    def subscribed(self) -> bool:
        """Whether job progress events arrive (job_event)."""
        return self._sub is not None

    def subscribe(self, pub_endpoint: str) -> None:
        """Receive job progress from the worker's PUB endpoint (the `pub` of its info reply; one
        bound to every interface is dialled at the host the requests go to)."""
        if self._sub is not None:
            return
        self._sub = subscribe_progress(dialable(pub_endpoint, self.endpoint), self._context, self.curve)
        self._sub_notifier = QSocketNotifier(self._sub.getsockopt(zmq.FD), QSocketNotifier.Read, self)
        self._sub_notifier.activated.connect(self._drain_events)

    def close(self, tell_waiting: bool = True) -> None:
        """Close the sockets; each request still waiting gets ConnectionClosed when `tell_waiting`,
        so that whoever waits for it (a search's disabled button) is told."""
        waiting, self._pending = self._pending, {}
        for _, timer, _ in waiting.values():
            timer.stop()
        self._close_socket()
        if self._sub is not None:
            self._sub_notifier.setEnabled(False)
            self._sub.close(linger=0)
            self._sub = None
        self._context.destroy(linger=0)
        for callback, _, _ in waiting.values() if tell_waiting else ():
            self._call(callback, None, ConnectionClosed(self.endpoint))

    # -- requests -------------------------------------------------------------------------------
    def request(self, op: str, callback: Callback, frames: tuple = (), timeout_s: Optional[float] = None,
                **fields) -> str:
        """Send a request; `callback(reply, None)` or `callback(None, error)` runs exactly once."""
        message = protocol.encode_request(op, frames=frames, **fields)
        request_id = protocol.request_id_of(message)
        if self._lost is not None:  # not sent: taken by a worker started again later, it would run for no one
            lost = self._lost
            QTimer.singleShot(0, lambda: self._call(callback, None, lost))  # the socket kept: its monitor waits
            return request_id
        timeout_s = timeout_s or self.timeout_s
        timer = QTimer(self)
        timer.setSingleShot(True)
        timer.timeout.connect(lambda: self._expire(request_id, timeout_s))
        timer.start(int(1000 * timeout_s))
        self._pending[request_id] = (callback, timer, op)
        try:  # never blocking QGIS: a send with no connection to take it waited for good
            self._sock.send_multipart(message, flags=zmq.NOBLOCK)
        except zmq.Again:
            QTimer.singleShot(0, lambda: self._refused(request_id))
        QTimer.singleShot(0, self._drain)
        return request_id

    def _refused(self, request_id: str) -> None:
        """A request no connection would take: the worker dropped this client's (a worker that
        serves only clients with its keys does so to one without them, a second or so after it
        connects), and ZeroMQ does not dial it again. A blocking send froze QGIS for good."""
        self._fail(request_id, ConnectionDropped.keys_refused(self.endpoint, self.curve is not None))

    def _watch(self, *_: object) -> None:
        """What the socket monitor saw: a handshake refused fails the waiting requests as
        _refused does; a connection dropped fails them at once, and those sent until a worker
        takes the connection again (a killed worker answered nothing for a search's whole
        timeout, 70 s, while the light said connected)."""
        monitor = self._monitor
        while monitor is not None and self._monitor is monitor and monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._lost is not None:
                    self._lost = None
                    self.back.emit()
                continue
            if self._lost is None:  # the first cause stays: a refused handshake is followed by its disconnection
                self._lost = dropped_by(event, self.endpoint, self.curve is not None)
                self.lost.emit()
            for request_id in list(self._pending):  # the last one failed replaces the socket and its monitor
                self._fail(request_id, self._lost)

    def _expire(self, request_id: str, timeout_s: float) -> None:
        self._fail(request_id, WorkerUnavailable(self.endpoint, 1, timeout_s))

    def _fail(self, request_id: str, error: WorkerError) -> None:
        """End a request the worker did not answer with `error`. A REQ-less DEALER could keep
        going, but a silent worker may have lost our message, one restarted would still be sent
        what queued, and one that dropped the connection is not dialled again: start over on a
        fresh socket, as the Lazy Pirate does, once no other request waits for its reply on this one."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        entry[1].stop()
        if not self._pending:
            self._close_socket()
            self._open()
        self._call(entry[0], None, error)

    def cancel(self, request_id: str, why: str) -> None:
        """Stop waiting for a request: its callback gets a `closed` error saying `why` now, and a
        late reply is dropped. A search is cancelled on the worker too, so that the next one does
        not wait behind it (a worker before `cancel` took `search` answers `bad_request`, dropped
        here, and runs it to its end)."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        entry[1].stop()
        if entry[2] == "search":
            self.request("cancel", lambda reply, error: None, search=request_id)
        self._call(entry[0], None, WorkerError(CLOSED, why))

    def _call(self, callback: Callback, reply: Optional[dict], error: Optional[WorkerError]) -> None:
        # PyQt aborts the whole application on an exception escaping a slot
        try:
            callback(reply, error)
        except Exception:
            self.callback_failed.emit(traceback.format_exc())

    def _drain(self, *_: object) -> None:
        sock = self._sock
        while sock is not None and not sock.closed and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                reply = protocol.decode_reply(sock.recv_multipart(zmq.NOBLOCK))
            except ProtocolError:
                continue  # not a reply this client can read
            entry = self._pending.pop(reply.id, None)  # None: a late answer to a request that timed out
            if entry is not None:
                callback, timer, _ = entry
                timer.stop()
                self._call(callback, None if reply.error else reply.fields, reply.error)
            if self._sock is sock:  # the link not closed by what the reply did
                self.answered.emit()

    def _drain_events(self, *_: object) -> None:
        while self._sub is not None and self._sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            job = protocol.decode_progress(self._sub.recv_multipart(zmq.NOBLOCK))
            if job is not None:
                self.job_event.emit(job)
