"""How a worker serves: endpoints, roots, limits and keys, checked before anything starts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from wire.protocol import DEFAULT_ENDPOINT
from worker.app import given
from worker.errors import InputError
from worker.service.paths import PathPolicy

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


def default_pub(bind: str) -> str:
    """The progress endpoint beside a request endpoint: the next tcp port, or `<ipc path>.pub`."""
    url = urlparse(bind)
    if url.scheme == "tcp" and url.port:
        return bind.rsplit(":", 1)[0] + f":{url.port + 1}"
    return bind + ".pub"


@dataclass(frozen=True)
class ServiceConfig:
    bind: str
    pub: str
    paths: PathPolicy
    max_message_bytes: int = 32 * 1024 * 1024  # larger requests get `too_large`
    search_timeout: float = 60.0  # seconds before a search is answered with `timeout`
    search_threads: int = 2
    curve_keys: Path | None = None  # a folder with server.key_secret and authorized_clients/*.key

    @classmethod
    def create(cls, bind: str | None = None, pub: str | None = None, index_roots: Sequence[Path] | None = None,
               raster_roots: Sequence[Path] | None = None, max_message_bytes: int | None = None,
               search_timeout: float | None = None, curve_keys: Path | None = None) -> "ServiceConfig":
        """A config from what the user gave (None: the default); index roots are created. Refuses
        (InputError) an endpoint beyond this machine without keys, and keys that are not there."""
        bind = bind or DEFAULT_ENDPOINT
        index_roots = [Path(p).resolve() for p in (index_roots or [Path.cwd() / "indexes"])]
        for root in index_roots:
            root.mkdir(parents=True, exist_ok=True)
        raster_roots = [Path(p).resolve() for p in (raster_roots or index_roots)]
        config = cls(bind, pub or default_pub(bind), PathPolicy(tuple(index_roots), tuple(raster_roots)),
                     curve_keys=curve_keys, **given(max_message_bytes=max_message_bytes, search_timeout=search_timeout))
        config.check_security()
        return config

    def check_security(self) -> None:
        for endpoint in (self.bind, self.pub):
            if not is_loopback(endpoint) and self.curve_keys is None:
                raise InputError(f"refusing to bind {endpoint} without --curve-keys: only loopback and ipc "
                                 "endpoints may be served unencrypted")
        if self.curve_keys is not None and not (self.curve_keys / SERVER_SECRET_KEY).is_file():
            raise InputError(f"--curve-keys {self.curve_keys} holds no {SERVER_SECRET_KEY}: make the server's key pair "
                             f"and the clients' public keys (in {AUTHORIZED_CLIENTS}/) with zmq.auth.create_certificates")
