"""Client sockets set up one way for the blocking client and the plugin's Qt link: keys,
linger, connect; and the progress subscription."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import zmq

from .errors import ConnectionDropped
from .protocol import PROGRESS_TOPIC

HEARTBEAT_S = 5.0  # a worker whose machine went silent is dropped after three unanswered pings
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)  # a worker refused this client's keys
# what a client's socket monitor watches: its connection dropped, refused or made (again)
CONNECTION_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED


def dropped_by(event: int, endpoint: str, with_keys: bool) -> ConnectionDropped:
    """Why a connection to the worker at `endpoint` ended, from the monitor `event` that ended it
    (`with_keys`: the client connected with CURVE keys)."""
    if event & HANDSHAKE_FAILED:
        return ConnectionDropped.keys_refused(endpoint, with_keys)
    return ConnectionDropped.dropped(endpoint)


@dataclass(frozen=True)
class CurveKeys:
    """Keys for an encrypted, authenticated connection to a remote worker (zmq.auth files)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_public_file: Union[Path, str], client_secret_file: Union[Path, str]) -> "CurveKeys":
        """The server's public key file and this client's secret key file, as zmq.auth writes them;
        OSError or ValueError says which file is not usable."""
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(str(server_public_file))
        client_public, client_secret = zmq.auth.load_certificate(str(client_secret_file))
        if client_secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key: give the client's .key_secret file")
        return cls(server_public, client_public, client_secret)

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.client_public
        socket.curve_secretkey = self.client_secret


def connect(context: zmq.Context, kind: int, endpoint: str, curve: Optional[CurveKeys] = None,
            heartbeat_s: Optional[float] = None, monitor_events: int = 0) -> zmq.Socket:
    """A socket of `kind` connected to `endpoint`, encrypted when `curve` is given; it never
    lingers on close (a lost worker must not hang the client's exit). With `heartbeat_s`,
    ZeroMQ pings the peer that often and drops a connection silent for three pings (a machine
    that vanished closes nothing). With `monitor_events`, the socket's monitor
    (`sock.get_monitor_socket()`) is made before it connects: made after, it missed the
    handshake of a peer that answered within 300 us, 76 times in 200."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if heartbeat_s:
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(3 * heartbeat_s * 1000))
    if curve is not None:
        curve.apply(sock)
    if monitor_events:
        sock.get_monitor_socket(monitor_events)
    if "[" in endpoint:  # an IPv6 address (tcp://[::1]:5555): ZeroMQ connects to none without
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(endpoint)
    return sock


EVERY_INTERFACE = ("*", "0.0.0.0", "::", "[::]")  # hosts a worker binds to serve every interface


def tcp_host_and_port(endpoint: str) -> tuple[str, str]:
    """The host and port of a tcp endpoint (tcp://HOST:PORT; an IPv6 host keeps its brackets),
    ("", "") for any other transport."""
    scheme, _, address = endpoint.partition("://")
    if scheme != "tcp":
        return "", ""
    host, _, port = address.rpartition(":")
    return host, port


def dialable(endpoint: str, reached_at: str) -> str:
    """An endpoint of the worker a client can connect to: one bound to every interface
    (tcp://*:5556, the way to serve a team) is dialled at the host the client reached the worker
    at (`reached_at`, its request endpoint); any other is left as it is."""
    host, port = tcp_host_and_port(endpoint)
    if host not in EVERY_INTERFACE:
        return endpoint
    reached_host = tcp_host_and_port(reached_at)[0]
    if reached_host in ("", *EVERY_INTERFACE):
        reached_host = "127.0.0.1"
    return f"tcp://{reached_host}:{port}"


def subscribe_progress(pub_endpoint: str, context: Optional[zmq.Context] = None,
                       curve: Optional[CurveKeys] = None) -> zmq.Socket:
    """A SUB socket receiving every job's progress events (read them with protocol.decode_progress)."""
    sock = connect(context or zmq.Context.instance(), zmq.SUB, pub_endpoint, curve)
    sock.setsockopt(zmq.SUBSCRIBE, PROGRESS_TOPIC)
    return sock
