"""The ZeroMQ worker service: one ROUTER for requests, one PUB for job progress.

The main thread owns both sockets (one socket per thread, as the zguide says). Quick ops are
answered inline; searches run in a small thread pool with a server-side time limit; indexing
jobs run in their own threads. Finished work wakes the main loop through a pipe.
"""

from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import json
import logging
import os
import queue
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import zmq

from wire import errors as codes
from wire import protocol
from wire.errors import ProtocolError
from wire.protocol import field
from worker import __version__
from worker.errors import InputError
from worker.jobs import JobManager
from worker.paths import PathPolicy
from worker.tiling import TileSettings

log = logging.getLogger(__name__)
HARD_LIMIT_FACTOR = 4  # ZeroMQ drops peers sending more than this times the reply-able limit


@dataclass
class ServiceConfig:
    bind: str
    pub: str
    paths: PathPolicy
    max_message_bytes: int = 32 * 1024 * 1024
    search_timeout: float = 60.0
    search_threads: int = 2
    curve_keys: Path | None = None


def is_loopback(endpoint: str) -> bool:
    """ipc:// and inproc:// and tcp on 127.0.0.0/8 or ::1 stay on this machine."""
    url = urlparse(endpoint)
    if url.scheme in ("ipc", "inproc"):
        return True
    host = (url.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_pub(bind: str) -> str:
    url = urlparse(bind)
    if url.scheme == "tcp" and url.port:
        return bind.rsplit(":", 1)[0] + f":{url.port + 1}"
    return bind + ".pub"


class Service:
    def __init__(self, config: ServiceConfig, model, context: zmq.Context | None = None):
        self.config = config
        self.model = model
        self.context = context or zmq.Context.instance()
        self.indexes: dict[Path, tuple[float, object]] = {}
        self._done: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._pending: dict[cf.Future, tuple[list[bytes], str, float]] = {}
        self._events: queue.Queue = queue.Queue()
        self.jobs = JobManager(model, publish=self._queue_event)
        self.pool = cf.ThreadPoolExecutor(config.search_threads, thread_name_prefix="search")
        self.stopping = False
        self.started = time.time()

    # -- sockets ------------------------------------------------------------------------------
    def _secure(self, sock: zmq.Socket) -> None:
        if self.config.curve_keys is None:
            return
        import zmq.auth

        public, secret = zmq.auth.load_certificate(str(self.config.curve_keys / "server.key_secret"))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def open(self) -> None:
        for endpoint in (self.config.bind, self.config.pub):
            if not is_loopback(endpoint) and self.config.curve_keys is None:
                raise InputError(f"refusing to bind {endpoint} without --curve-keys: only loopback and ipc "
                                 "endpoints may be served unencrypted")
        if self.config.curve_keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.context)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(self.config.curve_keys / "authorized_clients"))
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
        except OSError:
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
            timeout = self._next_deadline_ms()
            events = dict(poller.poll(timeout))
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
            self._send(envelope, self._result_reply(future, request_id))

    def _expire(self) -> None:
        now = time.monotonic()
        for future, (envelope, request_id, deadline) in list(self._pending.items()):
            if now >= deadline and not future.done():
                del self._pending[future]
                future.cancel()
                self._send(envelope, protocol.error_reply(
                    request_id, codes.TIMEOUT, f"search took longer than the {self.config.search_timeout:g} s limit"))

    @staticmethod
    def _result_reply(future: cf.Future, request_id: str) -> list[bytes]:
        try:
            return protocol.ok_reply(request_id, **future.result())
        except ProtocolError as exc:
            return protocol.error_reply(request_id, exc.code, exc.message)
        except InputError as exc:
            return protocol.error_reply(request_id, exc.code, str(exc))
        except Exception as exc:
            log.exception("request %s failed", request_id)
            return protocol.error_reply(request_id, codes.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _handle(self, frames: list[bytes]) -> None:
        # ROUTER envelope: identity, then an empty delimiter for REQ peers (none for DEALER)
        if len(frames) < 2:
            return
        split = 2 if len(frames) >= 3 and frames[1] == b"" else 1
        envelope, body = frames[:split], frames[split:]
        request_id = None
        try:
            if not body:
                raise ProtocolError(codes.BAD_REQUEST, "message has no header frame")
            size = sum(len(f) for f in body)
            if size > self.config.max_message_bytes:
                raise ProtocolError(codes.TOO_LARGE, f"message of {size} bytes exceeds the "
                                    f"{self.config.max_message_bytes} byte limit")
            header = protocol.decode_header(body[0])
            request_id = header.get("id") if isinstance(header.get("id"), str) else None
            op = protocol.check_request(header)
            if op == "search":
                future = self.pool.submit(self._search, header, body[1:])
                future.add_done_callback(lambda _: self._wake())
                self._pending[future] = (envelope, request_id, time.monotonic() + self.config.search_timeout)
                return
            reply = protocol.ok_reply(request_id, **getattr(self, f"_op_{op}")(header, body[1:]))
        except ProtocolError as exc:
            reply = protocol.error_reply(request_id, exc.code, exc.message)
        except InputError as exc:
            reply = protocol.error_reply(request_id, exc.code, str(exc))
        except Exception as exc:  # a bug: log it, answer, keep serving
            log.exception("request failed")
            reply = protocol.error_reply(request_id, codes.INTERNAL, f"{type(exc).__name__}: {exc}")
        self._send(envelope, reply)

    # -- ops ------------------------------------------------------------------------------------
    def _op_ping(self, header: dict, frames: list[bytes]) -> dict:
        return {"pong": time.time()}

    def _op_info(self, header: dict, frames: list[bytes]) -> dict:
        return {"version": __version__, "protocol": protocol.VERSION, "model": self.model.fingerprint(),
                "device": str(self.model.device), "cuda": self.model.device.type == "cuda",
                "pub": self.config.pub, "index_roots": [str(p) for p in self.config.paths.index_roots],
                "raster_roots": [str(p) for p in self.config.paths.raster_roots],
                "loaded_indexes": [str(p) for p in self.indexes], "uptime_s": round(time.time() - self.started, 1),
                "host": socket.gethostname()}

    def _op_list_indexes(self, header: dict, frames: list[bytes]) -> dict:
        root = self.config.paths.index_roots[0].resolve()
        out = []
        for manifest_path in sorted(root.rglob("manifest.json")):
            manifest = json.loads(manifest_path.read_text())
            running = self.jobs.running_for(manifest_path.parent)
            out.append({"name": str(manifest_path.parent.relative_to(root)), "tile_count": manifest.get("tile_count", 0),
                        "rasters": [r["path"] for r in manifest["rasters"]],
                        "complete": all(r["complete"] for r in manifest["rasters"]),
                        "compatible": manifest["model"]["tile_encoder"] == self.model.tile_encoder_fingerprint(),
                        "tiling": manifest["tiling"], "job": running.id if running else None})
        return {"indexes": out}

    def _op_index(self, header: dict, frames: list[bytes]) -> dict:
        name = field(header, "index", str)
        rasters = field(header, "rasters", list, check=lambda v: v and all(isinstance(p, str) for p in v))
        index_dir = self.config.paths.index_dir(name)
        paths = [str(self.config.paths.raster(p)) for p in rasters]
        scales = field(header, "scales", list, [1, 2, 4], check=lambda v: v and all(isinstance(s, int) for s in v))
        bands = field(header, "bands", list, None, check=lambda v: all(isinstance(b, int) for b in v))
        settings = TileSettings(tile=field(header, "tile", int, 224), overlap=float(field(header, "overlap", (int, float), 0.25)),
                                scales=tuple(scales), bands=tuple(bands) if bands else None,
                                min_valid=float(field(header, "min_valid", (int, float), 0.5)))
        if (index_dir / "manifest.json").exists():
            from worker.index import check_compatible

            manifest = json.loads((index_dir / "manifest.json").read_text())
            check_compatible(manifest, self.model.tile_encoder_fingerprint(),
                             settings.to_json(), index_dir)
        chunk_tiles = field(header, "chunk_tiles", int, 256, check=lambda v: 1 <= v <= 65536)
        return {"job": self.jobs.start(name, index_dir, paths, settings, chunk_tiles).to_json()}

    def _job(self, header: dict):
        job_id = field(header, "job", str)
        job = self.jobs.get(job_id)
        if job is None:
            raise ProtocolError(codes.NOT_FOUND, f"no job {job_id!r} on this worker")
        return job

    def _op_job(self, header: dict, frames: list[bytes]) -> dict:
        return {"job": self._job(header).to_json()}

    def _op_cancel(self, header: dict, frames: list[bytes]) -> dict:
        job = self._job(header)
        job.cancel_requested.set()
        return {"job": job.to_json()}

    def _index(self, name: str):
        from worker.index import TileIndex, check_compatible

        index_dir = self.config.paths.index_dir(name)
        manifest = index_dir / "manifest.json"
        if not manifest.exists():
            raise ProtocolError(codes.NOT_FOUND, f"no index named {name!r}")
        mtime = manifest.stat().st_mtime_ns
        cached = self.indexes.get(index_dir)
        if cached is None or cached[0] != mtime:  # reopen after an indexing job committed more
            index = TileIndex.open(index_dir)
            check_compatible(index.manifest, self.model.tile_encoder_fingerprint(), None, index_dir)
            self.indexes[index_dir] = (mtime, index)
        return self.indexes[index_dir][1]

    def _search(self, header: dict, frames: list[bytes]) -> dict:
        from worker.geo import bbox_to_wgs84, parse_crs
        from worker.hits_output import hits_to_geojson
        from worker.search import search
        from worker.sketch import StrokeSketch, load_sketch

        t0 = time.perf_counter()
        index = self._index(field(header, "index", str))
        top = field(header, "top", int, 10, check=lambda v: 1 <= v <= 1000)
        shortlist = field(header, "shortlist", int, 200, check=lambda v: 1 <= v <= 100_000)
        out_crs = parse_crs(field(header, "crs", str, "EPSG:4326"))
        bbox = field(header, "bbox", list, None, check=_four_numbers)
        area = bbox_to_wgs84(tuple(bbox), parse_crs(field(header, "bbox_crs", str, "EPSG:4326"))) if bbox else None
        if "sketch_frame" in header:
            n = field(header, "sketch_frame", int)
            if not 1 <= n <= len(frames):
                raise ProtocolError(codes.BAD_REQUEST, f"sketch_frame {n} but the message has {len(frames)} payload frame(s)")
            source = frames[n - 1]
        else:
            strokes = field(header, "strokes", list, check=_valid_strokes)
            crs = field(header, "strokes_crs", str, "pixel")
            frame = field(header, "strokes_frame", list, None, check=_four_numbers)
            source = StrokeSketch(tuple(tuple((float(x), float(y)) for x, y in s) for s in strokes), y_up=crs != "pixel",
                                  frame=tuple(float(x) for x in frame) if frame else None)
        sketch = load_sketch(source, self.model.img_size, crop_to_ink=field(header, "crop_to_ink", bool, False))
        result = search(index, self.model, sketch, top=top, shortlist=max(top, shortlist), area_wgs84=area)
        timings = {**result.timings_ms, "server_ms": (time.perf_counter() - t0) * 1e3}
        return {"hits": hits_to_geojson(result.hits, out_crs), "timings_ms": {k: round(v, 2) for k, v in timings.items()}}

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
        if getattr(self, "auth", None):
            self.auth.stop()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _four_numbers(values: list) -> bool:
    """A bbox or frame: [x0, y0, x1, y1]."""
    return len(values) == 4 and all(isinstance(x, (int, float)) for x in values)


def _valid_strokes(strokes: list) -> bool:
    return bool(strokes) and len(strokes) <= 10_000 and all(
        isinstance(s, list) and 0 < len(s) <= 100_000 and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p)
            for p in s) for s in strokes)


def serve_from_args(args) -> int:
    from worker.cli import model_from_args

    index_roots = [p.resolve() for p in (args.index_root or [Path.cwd() / "indexes"])]
    for root in index_roots:
        root.mkdir(parents=True, exist_ok=True)
    raster_roots = [p.resolve() for p in (args.raster_root or index_roots)]
    config = ServiceConfig(bind=args.bind, pub=args.pub or default_pub(args.bind),
                           paths=PathPolicy(tuple(index_roots), tuple(raster_roots)),
                           max_message_bytes=args.max_message_bytes, search_timeout=args.search_timeout,
                           curve_keys=args.curve_keys)
    model = model_from_args(args)
    service = Service(config, model)
    service.open()
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    service.jobs.resume_interrupted(index_roots)
    print(json.dumps({"serving": config.bind, "pub": config.pub, "device": str(model.device)}), flush=True)
    service.run()
    return 0
