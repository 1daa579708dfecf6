"""The service's loop: one ROUTER for requests, one PUB for job progress, a pool for searches.

The main thread owns both sockets (one socket per thread, as the zguide says). Quick ops are
answered inline; searches and listings (which may open large indexes) are read and checked
inline too, then run in threads of their own (searches `--search-threads` at once, listings one
at a time) under a server-side time limit counted from their arrival; indexing jobs run in their own
threads. Finished work and job events wake the loop through a pipe.

What one client can make the loop hold is bounded (worker.service.config.Limits): a message
over max_message_bytes, or a header over max_header_bytes, is answered `too_large`; at most
max_queued_searches searches wait or run at once and more are answered `busy` at once; a
queued search keeps its checked request and its sketch, not the message it came in. A search
past its deadline is answered `timeout`, and one its client cancels (`cancel` with `search`)
`cancelled`; either stops at its next stage (worker.cancellation), so its thread is soon free
for the next one (a cancelled search still waiting is dropped at once).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import os
import queue
import time
from dataclasses import dataclass
from typing import Callable

import zmq

from wire import protocol
from wire.errors import BAD_REQUEST, BUSY, CANCELLED, TIMEOUT, TOO_LARGE, ProtocolError
from worker.app import ModelOptions
from worker.cancellation import SearchStopped, StopCheck, telling_why_slow
from worker.distributed import Cluster
from worker.errors import InputError, error_object
from worker.service.config import ServiceConfig
from worker.service.handlers import Handlers
from worker.service.indexes import OpenIndexes
from worker.service.jobs import JobManager
from worker.service.listening import Listening

log = logging.getLogger(__name__)
IDLE_POLL_MS = 1000


def reply_for(request_id: str | None, exc: Exception) -> list[bytes]:
    """The error reply for an exception raised while answering a request; a bug is logged."""
    if not isinstance(exc, (ProtocolError, InputError)):
        log.error("request %s failed", request_id, exc_info=exc)
    return protocol.error_reply(request_id, **error_object(exc))


@dataclass
class PendingRequest:
    """A search or listing in the pool, not yet answered: where its reply goes and when it is due."""

    envelope: list[bytes]
    request_id: str | None
    op: str
    deadline: float  # time.monotonic() of its arrival plus the search time limit
    ignored: dict  # the reply's `ignored` member, or nothing (FieldsRead.ignored)
    work: "QueuedWork"  # what it runs


class QueuedWork:
    """A slow request's work as its pool queues it, which can be abandoned: answered already
    (its time limit, its client's cancel), it stops at its next stage if it runs, and lets go of
    its request and sketch if it waits. A future cancelled before it ran stays in the pool's queue
    until a thread takes it off, and its work with it (a client sending searches of 8 MB sketches
    and cancelling them grew the worker by 3.4 GB while its one search thread was busy)."""

    def __init__(self, work: Callable[[StopCheck], dict]):
        self._work: Callable[[StopCheck], dict] | None = work
        self.abandoned = False
        self.slow_because: str | None = None  # what the work said made it slow (worker.cancellation.say_why_slow)

    def __call__(self, should_stop: StopCheck) -> dict:
        work, self._work = self._work, None
        if work is None:
            raise SearchStopped("its work", "dropped before it ran")
        with telling_why_slow(lambda why: setattr(self, "slow_because", why)):
            return work(lambda: self.abandoned or should_stop())

    def abandon(self) -> None:
        self.abandoned = True
        self._work = None


class FieldsRead(dict):
    """A request's header that remembers which of its fields the handler looked at: the others
    were ignored, and the reply names them. A typo (`bboxcrs` for `bbox_crs`) was dropped without
    a word, and the search fell back to the default; refusing unknown fields would refuse a newer
    client's."""

    def __init__(self, header: dict):
        super().__init__(header)
        self.looked_at: set[str] = set()

    def __contains__(self, name: object) -> bool:
        self.looked_at.add(name)  # type: ignore[arg-type]
        return super().__contains__(name)

    def __getitem__(self, name: str):
        self.looked_at.add(name)
        return super().__getitem__(name)

    def get(self, name: str, default=None):
        self.looked_at.add(name)
        return super().get(name, default)

    def ignored(self) -> dict:
        """{"ignored": [names]} for the fields no one looked at; {} when there are none."""
        names = sorted(set(self) - self.looked_at)
        return {"ignored": names[:MAX_IGNORED_NAMED]} if names else {}


MAX_IGNORED_NAMED = 32  # fields named in a reply's `ignored`: a request of thousands of made-up fields is not echoed


class Service:
    """Serves requests on `listening`'s sockets (bound before the model loaded) until stopped."""

    def __init__(self, listening: Listening, model, model_options: ModelOptions | None = None):
        config = listening.config
        self.limits = config.limits
        self.listening = listening
        self.router, self.pub = listening.router, listening.pub
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._pending: dict[cf.Future, PendingRequest] = {}
        # answered `timeout` or `cancelled`, still running until their next stage: why, for the log
        self._abandoned: dict[cf.Future, str] = {}
        self._events: queue.Queue = queue.Queue()
        cluster = Cluster(config.cluster, model_options or ModelOptions()) if config.cluster is not None else None
        self.jobs = JobManager(model, publish=self._queue_event, access=config.paths.raster_access,
                               max_jobs=self.limits.max_jobs, max_queued=self.limits.max_queued_jobs, cluster=cluster)
        self.handlers = Handlers(config, model, self.jobs, OpenIndexes(model, self.limits.partial_maps_bytes))
        # listing runs no torch op: a thread of its own, so that it never waits behind a search
        self.pools = {"search": cf.ThreadPoolExecutor(self.limits.search_threads, thread_name_prefix="search"),
                      "list_indexes": cf.ThreadPoolExecutor(1, thread_name_prefix="list"),
                      "index": cf.ThreadPoolExecutor(1, thread_name_prefix="index-request")}
        self.stopping = False

    @property
    def config(self) -> ServiceConfig:
        """The service's configuration, held once (by its handlers, whose replies say it)."""
        return self.handlers.config

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
            # a request read in this round arrived after this moment or waited in ZeroMQ since
            # (then the loop was busy with the round before): its time limit counts from here
            arrived = time.monotonic()
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
                    self._handle(self.router.recv_multipart(zmq.NOBLOCK), arrived)
        self.shutdown()

    def _next_deadline_ms(self) -> int:
        soonest = min((p.deadline for p in self._pending.values()), default=math.inf)  # an index request's: none
        return max(0, int(min(IDLE_POLL_MS, (soonest - time.monotonic()) * 1000 + 1)))

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
        for future in [f for f in self._abandoned if f.done()]:
            why = self._abandoned.pop(future)
            exc = future.exception()  # the operator may want a longer --search-timeout, or smaller searches
            if exc is None:
                how = "it finished its stages"
            else:
                how = f"it stopped before {exc.stage}" if isinstance(exc, SearchStopped) else exc
            log.warning("a request %s ended: %s", why, how)
        for future in [f for f in self._pending if f.done()]:
            pending = self._pending.pop(future)
            stopped_by_stopping = future.cancelled() or (self.stopping and isinstance(future.exception(), SearchStopped)
                                                         and time.monotonic() < pending.deadline)
            stopped_by_stopping |= self.stopping and _on_the_loop(future)  # a job is not started as the worker stops
            if stopped_by_stopping:  # waiting, or stopped at its next stage: not its time limit (was `timeout`)
                reply = protocol.error_reply(pending.request_id, BUSY, "the worker is stopping: ask again once it "
                                                                       "is back")
            else:
                try:
                    answer = future.result()
                    answer = answer() if callable(answer) else answer  # on the loop's thread (an index job's start)
                    reply = protocol.ok_reply(pending.request_id, **answer, **pending.ignored)
                except Exception as exc:  # answered with its code; a bug is logged
                    reply = reply_for(pending.request_id, exc)
            self._send(pending.envelope, reply)

    def _expire(self) -> None:
        """Answer the searches past their deadline `timeout`; one still running is stopped by its
        own stop check (worker.cancellation) at its next stage, and counts as held until then."""
        now = time.monotonic()
        for future, pending in list(self._pending.items()):
            if now >= pending.deadline and not future.done():
                message = (f"{pending.op} took longer than the worker's {self.limits.search_timeout:g} s limit: "
                           + ("search a smaller area, or " if pending.op == "search" else "")
                           + "ask for a longer --search-timeout"
                           + (f". It was slower than it could be: {pending.work.slow_because}"
                              if pending.work.slow_because else ""))
                self._abandon(future, "answered `timeout`", protocol.error_reply(pending.request_id, TIMEOUT, message))

    def _abandon(self, future: cf.Future, why: str, reply: list[bytes]) -> None:
        """Answer a pending request now with `reply`; its work is dropped if it has not started,
        else stopped at its next stage, and counts as held until then."""
        pending = self._pending.pop(future)
        pending.work.abandon()
        if not future.cancel():
            self._abandoned[future] = why
        self._send(pending.envelope, reply)

    def _cancel_search(self, envelope: list[bytes], header: FieldsRead) -> dict:
        """`cancel` of a search: the one with that id that this connection sent and still waits
        for is answered `cancelled` and stops at its next stage, so a user who gives up on a slow
        search and asks another does not wait behind it. Only its own connection can cancel it (a
        client's ids are its own). `cancelled` false: no such search waits (answered already)."""
        if header.get("job") is not None:
            raise ProtocolError(BAD_REQUEST, "cancel takes `job` or `search`, not both")
        search_id = protocol.field(header, "search", str, check=lambda v: 0 < len(v) <= protocol.MAX_ID_CHARS)
        for future, pending in list(self._pending.items()):
            if pending.op == "search" and pending.request_id == search_id and pending.envelope[0] == envelope[0]:
                if future.done():  # finished meanwhile: its answer goes out as it is
                    break
                self._abandon(future, "cancelled by its client",
                              protocol.error_reply(search_id, CANCELLED, "the search was cancelled by its client"))
                return {"search": search_id, "cancelled": True}
        return {"search": search_id, "cancelled": False}

    def searches_held(self) -> int:
        """Searches and listings waiting, running, or stopping after their timeout or cancel."""
        return sum(p.op != "index" for p in self._pending.values()) + len(self._abandoned)

    def _handle(self, frames: list[bytes], arrived: float) -> None:
        # ROUTER envelope: identity, then an empty delimiter for REQ peers (none for DEALER)
        if len(frames) < 2:
            return
        split = 2 if len(frames) >= 3 and frames[1] == b"" else 1
        envelope, body = frames[:split], frames[split:]
        del frames  # nothing of a message is kept beyond what its handler takes from it
        request_id = None
        try:
            if not body:
                raise ProtocolError(BAD_REQUEST, "message has no header frame")
            size = sum(len(f) for f in body)
            if size > self.limits.max_message_bytes:
                raise ProtocolError(TOO_LARGE, f"message of {size} bytes exceeds the worker's "
                                               f"{self.limits.max_message_bytes} byte limit (--max-message-bytes)")
            if len(body[0]) > self.limits.max_header_bytes:
                raise ProtocolError(TOO_LARGE, f"header (frame 0) of {len(body[0])} bytes exceeds the worker's "
                                               f"{self.limits.max_header_bytes} byte limit (--max-header-bytes): "
                                               "send images as payload frames, draw fewer points")
            header = FieldsRead(protocol.decode_request(body[0]))
            request_id = header.get("id") if isinstance(header.get("id"), str) else None
            op = protocol.check_request(header)
            if op in Handlers.POOLED:
                self._submit(envelope, request_id, op, header, body[1:], arrived)
                return
            if op == "cancel" and header.get("search") is not None:
                answer = self._cancel_search(envelope, header)
            else:
                answer = self.handlers(op, header, body[1:])
            reply = protocol.ok_reply(request_id, **answer, **header.ignored())
        except Exception as exc:  # answered with its code; a bug is logged and the loop keeps serving
            reply = reply_for(request_id, exc)
        self._send(envelope, reply)

    def _submit(self, envelope: list[bytes], request_id: str | None, op: str, header: FieldsRead,
                payloads: list[bytes], arrived: float) -> None:
        """Check a slow request now and queue its work: `busy` when the queue is full. An index
        request has no time limit (its job is started once its rasters are checked, however many
        files its folders hold, as when it was checked on the loop), and waits with at most as
        many others as jobs may wait."""
        if op == "index":
            held = sum(p.op == "index" for p in self._pending.values())
            if held >= self.limits.max_queued_jobs:
                raise ProtocolError(BUSY, f"the worker is already checking {held} index requests (its "
                                          "--max-queued-jobs limit): ask again in a moment")
        else:
            held = self.searches_held()
            if held >= self.limits.max_queued_searches:
                raise ProtocolError(BUSY, f"the worker already holds {held} searches and listings (its "
                                          "--max-queued-searches limit): ask again in a moment")
        work = QueuedWork(self.handlers.prepare(op, header, payloads))  # the checked request, not the message
        deadline = math.inf if op == "index" else arrived + self.limits.search_timeout
        future = self.pools[op].submit(work, lambda: self.stopping or time.monotonic() >= deadline)
        future.add_done_callback(lambda _: self._wake())
        self._pending[future] = PendingRequest(envelope, request_id, op, deadline, header.ignored(), work)

    # -- shutdown -------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self.stopping = True
        self._wake()

    def shutdown(self) -> None:
        """Let indexing jobs commit, stop searches, close the sockets (run's end, or a start that
        failed once jobs resumed); once."""
        if self._wake_w < 0:
            return
        self.stopping = True
        log.info("stopping: letting indexing jobs commit and stopping searches")
        for pool in self.pools.values():  # the requests waiting are answered now: they were answered once the
            pool.shutdown(wait=False, cancel_futures=True)  # running ones stopped and jobs committed (8 s, probe)
        self._flush_done()
        self.jobs.shutdown()
        for pool in self.pools.values():
            pool.shutdown(wait=True)  # running searches stop at their next stage
        self._flush_done()
        self._flush_events()
        self.listening.close()
        wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1  # a late _wake writes nowhere
        os.close(wake_r)
        os.close(wake_w)


def _on_the_loop(future: cf.Future) -> bool:
    """Whether a finished request's answer is made on the loop's thread (an index job's start)."""
    return not future.cancelled() and future.exception() is None and callable(future.result())
