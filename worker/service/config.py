"""How a worker serves: endpoints, roots, limits and keys, checked before anything starts."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from wire.protocol import DEFAULT_ENDPOINT
from wire.sockets import EVERY_INTERFACE, tcp_host_and_port
from worker.app import given
from worker.errors import InputError, StorageError, storage_advice
from worker.service.paths import PathPolicy
from worker.store.maps import PARTIAL_MAPS_BYTES

SERVER_SECRET_KEY = "server.key_secret"
AUTHORIZED_CLIENTS = "authorized_clients"


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


def check_endpoint(option: str, endpoint: str, any_port: bool) -> None:
    """InputError for an endpoint the worker cannot serve on: a port that is no number (a
    traceback), none (refused as needing --curve-keys), or, for the request endpoint, one the
    system would choose (`*`, 0: no client could find it; `any_port` allows `*`, said in `info`)."""
    url = urlparse(endpoint)
    if url.scheme in ("ipc", "inproc"):
        if not (url.netloc + url.path).strip("/"):
            raise InputError(f"{option} {endpoint!r} names no socket: give ipc:///PATH/TO/SOCKET")
        return
    if url.scheme != "tcp":
        raise InputError(f"{option} {endpoint!r} is not an endpoint: give tcp://HOST:PORT (such as "
                         f"{DEFAULT_ENDPOINT}) or ipc:///PATH")
    host, port = tcp_host_and_port(endpoint)
    if not host or url.netloc.endswith("]"):  # tcp://127.0.0.1, tcp://[::1]
        raise InputError(f"{option} {endpoint!r} names no port: give tcp://HOST:PORT ([ADDRESS] for IPv6)")
    if ":" in host and not host.startswith("["):  # a traceback (the port cannot be read)
        raise InputError(f"{option} {endpoint!r}: an IPv6 address is written in brackets, as tcp://[::1]:5555")
    if port == "*" and any_port:
        return
    if port in ("*", "0"):
        raise InputError(f"{option} {endpoint!r}: write * for a free port the system chooses (said in the info "
                         "reply), or a port from 1 to 65535" if any_port else
                         f"{option} {endpoint!r} lets the system choose the port, which no client could find: "
                         "give a port from 1 to 65535")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise InputError(f"{option} {endpoint!r}: the port must be a number from 1 to 65535")


def same_listening_place(first: str, second: str) -> bool:
    """Whether two endpoints would listen in the same place: the same tcp port on the same host,
    or on every interface beside a host of its family (`*` and [::] cover IPv4's and IPv6's,
    0.0.0.0 IPv4's), or the same socket path."""
    if first.partition("://")[0] != second.partition("://")[0]:
        return False
    if first.startswith("tcp://"):
        (host, port), (other_host, other_port) = tcp_host_and_port(first), tcp_host_and_port(second)
        return port == other_port and (host == other_host or _covers(host, other_host) or _covers(other_host, host))
    path, other_path = first.partition("://")[2], second.partition("://")[2]
    if path.startswith("@") or other_path.startswith("@"):  # abstract sockets: names, not files
        return path == other_path
    return os.path.realpath(path) == os.path.realpath(other_path)


def _covers(every: str, host: str) -> bool:
    """Whether listening on `every` (an every-interface host) takes `host`'s port too."""
    return every in EVERY_INTERFACE and (every != "0.0.0.0" or not host.startswith("["))


def default_pub(bind: str) -> str:
    """The progress endpoint beside a request endpoint: the next tcp port, or `<ipc path>.pub`."""
    url = urlparse(bind)
    if url.scheme == "tcp" and url.port:
        return bind.rsplit(":", 1)[0] + f":{url.port + 1}"
    return bind + ".pub"


MAX_MESSAGE_LIMIT = 8 * 2 ** 30  # the largest --max-message-bytes and --max-header-bytes
MAX_PARTIAL_MAPS_MB = 2.0 ** 20  # a TiB
MAX_SEARCH_TIMEOUT_S = 86_400.0


@dataclass(frozen=True)
class Limits:
    """What one client can make the worker hold or do at once (docs/protocol.md, "Limits and
    security"); each has a `serve` flag of the same name."""

    max_message_bytes: int = 32 * 1024 * 1024  # larger requests get `too_large`
    max_header_bytes: int = 4 * 1024 * 1024  # of frame 0, the JSON (parsing costs ~15x this); within the above
    search_timeout: float = 60.0  # seconds from a search's arrival to its `timeout` reply
    # One: torch's OpenMP keeps a thread team for every thread that ran a search, for as long as
    # it lives, and once the teams hold more threads than there are CPUs their threads sleep
    # between ops; after two searches had run at once, every later search of the demo index took
    # 242 ms instead of 176-189 (2-core CPU, docs/benchmarks/speed.md, fourteenth stop).
    search_threads: int = 1
    max_queued_searches: int = 8  # searches waiting or running at once; more are answered `busy`
    max_jobs: int = 1  # indexing jobs running at once; more wait, `queued`
    max_queued_jobs: int = 16  # indexing jobs waiting; more are answered `busy`
    # MiB the maps of an index's rasters still being indexed may take joined in a search; larger
    # ones are left out until complete, and the reply's `left_out` says so (worker.store.maps)
    max_partial_maps_mb: float = PARTIAL_MAPS_BYTES / 2 ** 20

    @property
    def partial_maps_bytes(self) -> int:
        return int(self.max_partial_maps_mb * 2 ** 20)

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_header_bytes", "search_threads", "max_queued_searches", "max_jobs",
                     "max_queued_jobs"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        for name in ("max_message_bytes", "max_header_bytes"):  # ZeroMQ's limit is a C long: 1e20 was a traceback
            if getattr(self, name) > MAX_MESSAGE_LIMIT:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at most "
                                 f"{MAX_MESSAGE_LIMIT} (8 GiB)")
        # inf was taken, and the worker died at its first search (a deadline of inf ms) or load of maps
        if not 0 <= self.max_partial_maps_mb <= MAX_PARTIAL_MAPS_MB:
            raise InputError(f"--max-partial-maps-mb {self.max_partial_maps_mb} must be 0 to {MAX_PARTIAL_MAPS_MB:.0f}")
        if not 0 < self.search_timeout <= MAX_SEARCH_TIMEOUT_S:
            raise InputError(f"--search-timeout {self.search_timeout} must be more than 0 seconds, and at most "
                             f"{MAX_SEARCH_TIMEOUT_S:.0f} (a day)")


@dataclass(frozen=True)
class ServiceConfig:
    bind: str
    pub: str
    paths: PathPolicy
    limits: Limits = Limits()
    curve_keys: Path | None = None  # a folder with server.key_secret and authorized_clients/*.key
    cluster: str | None = None  # the Dask cluster indexing jobs run on (worker.distributed); None: this process

    @classmethod
    def create(cls, bind: str | None = None, pub: str | None = None, index_roots: Sequence[Path] | None = None,
               raster_roots: Sequence[Path] | None = None, curve_keys: Path | None = None, cluster: str | None = None,
               **limits: float | int | None) -> "ServiceConfig":
        """A config from what the user gave (None: the default; `limits` by the names of Limits).
        Refuses (InputError) endpoints that cannot be, a malformed cluster and limits out of
        range; what needs the disk (keys, index roots) is checked as the worker starts
        (worker.service.listening, make_index_roots)."""
        bind = bind or DEFAULT_ENDPOINT
        check_endpoint("--bind", bind, any_port=False)
        if pub is None and tcp_host_and_port(bind)[1] == "65535":
            raise InputError(f"--bind {bind} leaves no port after it for progress events: give --pub too")
        if pub is not None:
            check_endpoint("--pub", pub, any_port=True)
            if same_listening_place(bind, pub):  # was "another worker may be running there": this one's --bind
                raise InputError(f"--pub {pub} is where --bind {bind} listens: progress events need an address of "
                                 f"their own (leave --pub out for {default_pub(bind)})")
        if cluster is not None:
            from worker.distributed import local_workers

            local_workers(cluster)  # a malformed one refused now, not at the first job after the model loads
        index_roots = [Path(p).resolve() for p in (index_roots or [Path.cwd() / "indexes"])]
        raster_roots = [Path(p).resolve() for p in (raster_roots or index_roots)]
        return cls(bind, pub or default_pub(bind), PathPolicy(tuple(index_roots), tuple(raster_roots)),
                   Limits(**given(**limits)), curve_keys=curve_keys, cluster=cluster)

    def make_index_roots(self) -> None:
        """Each index root, made when missing; one line for one that cannot be (a file there, or a
        read-only disk, was a traceback). Made once the worker listens: a start that failed on
        its port left an empty ./indexes behind."""
        for root in self.paths.index_roots:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise InputError(f"--index-root {root} is a file, or lies in one: name a folder (made when "
                                 "missing)") from None
            except OSError as exc:
                raise StorageError(f"--index-root {root} cannot be made ({exc.strerror}): "
                                   f"{storage_advice(exc)}") from None

    def check_security(self) -> tuple[bytes, bytes] | None:
        """InputError for an endpoint beyond this machine without --curve-keys, and for keys that
        are not there or cannot be; the server's CURVE key pair (public, secret), or None
        without --curve-keys."""
        for endpoint in (self.bind, self.pub):
            if not is_loopback(endpoint) and self.curve_keys is None:
                raise InputError(f"refusing to bind {endpoint} without --curve-keys: only loopback and ipc "
                                 "endpoints may be served unencrypted")
        if self.curve_keys is None:
            return None
        make = "make the server's key pair and the clients' public keys with zmq.auth.create_certificates"
        if not (self.curve_keys / SERVER_SECRET_KEY).is_file():
            raise InputError(f"--curve-keys {self.curve_keys} holds no {SERVER_SECRET_KEY}: {make}")
        if not (self.curve_keys / AUTHORIZED_CLIENTS).is_dir():  # served, and every client refused unsaid
            raise InputError(f"--curve-keys {self.curve_keys} holds no {AUTHORIZED_CLIENTS}/ folder of the clients' "
                             f"public keys: every client would be refused; {make}")
        import zmq.auth

        try:  # a damaged one was a traceback
            public, secret = zmq.auth.load_certificate(str(self.curve_keys / SERVER_SECRET_KEY))
        except (ValueError, OSError) as exc:
            secret, why = None, str(exc)
        else:
            why = "no secret key in it"
        if secret is None:
            raise InputError(f"--curve-keys {self.curve_keys / SERVER_SECRET_KEY} is not a server's secret key "
                             f"({why}): {make}")
        return public, secret
