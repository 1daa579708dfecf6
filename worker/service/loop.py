"""The service's loop: one ROUTER for requests, one PUB for job progress, a pool for searches.

The main thread owns both sockets (one socket per thread, as the zguide says). Quick ops are
answered inline; searches run in a small thread pool under a server-side time limit; indexing
jobs run in their own threads. Finished work and job events wake the loop through a pipe.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import time

import zmq

from wire import protocol
from wire.errors import BAD_REQUEST, TIMEOUT, TOO_LARGE, ProtocolError
from worker.errors import InputError, error_object
from worker.service.config import AUTHORIZED_CLIENTS, SERVER_SECRET_KEY, ServiceConfig
from worker.service.handlers import Handlers
from worker.service.indexes import OpenIndexes
from worker.service.jobs import JobManager

log = logging.getLogger(__name__)
HARD_LIMIT_FACTOR = 4  # ZeroMQ drops peers sending more than this times the answerable limit


def reply_for(request_id: str | None, exc: Exception) -> list[bytes]:
    """The error reply for an exception raised while answering a request; a bug is logged."""
    if not isinstance(exc, (ProtocolError, InputError)):
        log.error("request %s failed", request_id, exc_info=exc)
    return protocol.error_reply(request_id, **error_object(exc))


class Service:
    def __init__(self, config: ServiceConfig, model, context: zmq.Context | None = None):
        self.config = config
        self.context = context or zmq.Context.instance()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._pending: dict[cf.Future, tuple[list[bytes], str | None, float]] = {}  # envelope, id, deadline
        self._events: queue.Queue = queue.Queue()
        self.jobs = JobManager(model, publish=self._queue_event)
        self.handlers = Handlers(config, model, self.jobs, OpenIndexes(model))
        self.pool = cf.ThreadPoolExecutor(config.search_threads, thread_name_prefix="search")
        self.stopping = False
        self.auth = None

    # -- sockets ------------------------------------------------------------------------------
    def _secure(self, sock: zmq.Socket) -> None:
        if self.config.curve_keys is None:
            return
        import zmq.auth

        public, secret = zmq.auth.load_certificate(str(self.config.curve_keys / SERVER_SECRET_KEY))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def open(self) -> None:
        self.config.check_security()
        if self.config.curve_keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.context)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(self.config.curve_keys / AUTHORIZED_CLIENTS))
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes * HARD_LIMIT_FACTOR)
        self._secure(self.router)
        self.router.bind(self.config.bind)
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self._secure(self.pub)
        self.pub.bind(self.config.pub)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # the pipe is full (the loop wakes anyway) or closed (stopping)
            pass

    def _queue_event(self, job: dict) -> None:
        self._events.put(job)
        self._wake()

    # -- main loop ----------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self.stopping:
            events = dict(poller.poll(self._next_deadline_ms()))
            if self._wake_r in events:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            self._flush_events()
            self._flush_done()
            self._expire()
            if self.router in events:
                while self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._handle(self.router.recv_multipart(zmq.NOBLOCK))
        self._shutdown()

    def _next_deadline_ms(self) -> int:
        if not self._pending:
            return 1000
        soonest = min(deadline for _, _, deadline in self._pending.values())
        return max(0, int((soonest - time.monotonic()) * 1000))

    def _send(self, envelope: list[bytes], reply: list[bytes]) -> None:
        try:
            self.router.send_multipart(envelope + reply, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer went away: nothing to deliver to
            log.info("reply not delivered: %s", exc)

    def _flush_events(self) -> None:
        while True:
            try:
                job = self._events.get_nowait()
            except queue.Empty:
                return
            self.pub.send_multipart(protocol.progress_event(job))

    def _flush_done(self) -> None:
        for future in [f for f in self._pending if f.done()]:
            envelope, request_id, _ = self._pending.pop(future)
            try:
                reply = protocol.ok_reply(request_id, **future.result())
            except Exception as exc:  # answered with its code; a bug is logged
                reply = reply_for(request_id, exc)
            self._send(envelope, reply)

    def _expire(self) -> None:
        now = time.monotonic()
        for future, (envelope, request_id, deadline) in list(self._pending.items()):
            if now >= deadline and not future.done():
                del self._pending[future]
                future.cancel()
                self._send(envelope, protocol.error_reply(
                    request_id, TIMEOUT, f"search took longer than the {self.config.search_timeout:g} s limit"))

    def _handle(self, frames: list[bytes]) -> None:
        # ROUTER envelope: identity, then an empty delimiter for REQ peers (none for DEALER)
        if len(frames) < 2:
            return
        split = 2 if len(frames) >= 3 and frames[1] == b"" else 1
        envelope, body = frames[:split], frames[split:]
        request_id = None
        try:
            if not body:
                raise ProtocolError(BAD_REQUEST, "message has no header frame")
            size = sum(len(f) for f in body)
            if size > self.config.max_message_bytes:
                raise ProtocolError(TOO_LARGE, f"message of {size} bytes exceeds the "
                                               f"{self.config.max_message_bytes} byte limit")
            header = protocol.decode_header(body[0])
            request_id = header.get("id") if isinstance(header.get("id"), str) else None
            op = protocol.check_request(header)
            if op in Handlers.POOLED:
                future = self.pool.submit(self.handlers, op, header, body[1:])
                future.add_done_callback(lambda _: self._wake())
                self._pending[future] = (envelope, request_id, time.monotonic() + self.config.search_timeout)
                return
            reply = protocol.ok_reply(request_id, **self.handlers(op, header, body[1:]))
        except Exception as exc:  # answered with its code; a bug is logged and the loop keeps serving
            reply = reply_for(request_id, exc)
        self._send(envelope, reply)

    # -- shutdown -------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self.stopping = True
        self._wake()

    def _shutdown(self) -> None:
        log.info("stopping: letting indexing jobs commit and finishing searches")
        self.jobs.shutdown()
        self.pool.shutdown(wait=True)
        self._flush_done()
        self._flush_events()
        self.router.close(linger=0)
        self.pub.close(linger=100)
        if self.auth is not None:
            self.auth.stop()
        os.close(self._wake_r)
        os.close(self._wake_w)
