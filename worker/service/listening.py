"""The service's two sockets, bound before its model loads: requests (a ROUTER on --bind) and
progress events (a PUB on --pub), with CURVE when --curve-keys is given. A port in use was found
only once the model had loaded (seconds on a CPU, more on a first run); requests that come while
it loads wait in ZeroMQ and are answered once the worker serves."""

from __future__ import annotations

import os
import socket as sockets
from dataclasses import dataclass, replace

import zmq

from wire.sockets import tcp_host_and_port
from worker.errors import InputError
from worker.service.config import AUTHORIZED_CLIENTS, ServiceConfig

HARD_LIMIT_FACTOR = 4  # ZeroMQ drops peers sending more than this times the answerable limit
RECEIVE_HWM = 16  # messages ZeroMQ reads ahead per peer while the loop is busy; then TCP pushes back


@dataclass(frozen=True)
class Listening:
    """Both sockets, owned by the thread that opened them (the main thread, which serves them).
    `config` is the one given, its `pub` the port the system chose for `tcp://HOST:*`."""

    config: ServiceConfig
    router: zmq.Socket
    pub: zmq.Socket
    auth: object | None  # zmq.auth.thread.ThreadAuthenticator, when CURVE is on

    @classmethod
    def open(cls, config: ServiceConfig, context: zmq.Context | None = None) -> "Listening":
        """Bind both, or an InputError that says why not (and nothing left open)."""
        context = context or zmq.Context.instance()
        keys = config.check_security()
        auth, opened = None, []
        try:
            if config.curve_keys is not None:
                from zmq.auth.thread import ThreadAuthenticator

                auth = ThreadAuthenticator(context)
                auth.start()
                auth.configure_curve(domain="*", location=str(config.curve_keys / AUTHORIZED_CLIENTS))
            router = _socket(context, zmq.ROUTER, keys, opened)
            router.setsockopt(zmq.MAXMSGSIZE, config.limits.max_message_bytes * HARD_LIMIT_FACTOR)
            router.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            # a worker reached over IPv6 sends its progress there too
            ipv6 = any(tcp_host_and_port(e)[0].startswith("[") for e in (config.bind, config.pub))
            _bind(router, config.bind, "--bind", ipv6)
            pub = _socket(context, zmq.PUB, keys, opened)
            _bind(pub, config.pub, "--pub", ipv6)
        except BaseException:
            for sock in opened:
                sock.close(linger=0)
            if auth is not None:
                auth.stop()
            raise
        if config.pub.endswith(":*"):  # any free port: clients are told the one the system gave
            config = replace(config, pub=pub.getsockopt_string(zmq.LAST_ENDPOINT))
        return cls(config, router, pub, auth)

    def close(self) -> None:
        self.router.close(linger=0)
        self.pub.close(linger=100)  # the last progress events go out
        if self.auth is not None:
            self.auth.stop()


def _socket(context: zmq.Context, kind: int, keys: tuple[bytes, bytes] | None, opened: list) -> zmq.Socket:
    """A socket of `kind`, added to `opened`; a CURVE server's with the server's `keys`."""
    sock = context.socket(kind)
    opened.append(sock)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey = keys
        sock.curve_server = True
    return sock


def _bind(socket: zmq.Socket, address: str, option: str, ipv6: bool) -> None:
    """Listen on `address`, or an InputError that says why not (a worker already there). An
    ipc socket a worker listens on is refused as a busy port is: ZeroMQ took it over unsaid, the
    first worker left running where no client could reach it. `ipv6`: the worker is reached
    over IPv6, where every interface (`*`) is IPv4's and IPv6's (--bind tcp://[::]:P with
    --pub tcp://*:Q sent progress to IPv4 alone: clients of [::1] never had any)."""
    if address.startswith("ipc://") and _listened_on(address[len("ipc://"):]):
        raise InputError(f"cannot listen on {address}: another worker is serving there; stop it, or choose another "
                         f"address with {option}")
    host = tcp_host_and_port(address)[0]
    if host.startswith("[") or (ipv6 and host == "*"):  # without, an IPv6 address is refused as "No such device"
        socket.setsockopt(zmq.IPV6, 1)
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        busy = " another worker may be running there;" if exc.errno == zmq.EADDRINUSE else ""
        raise InputError(f"cannot listen on {address} ({exc}):{busy} choose another address with {option}") from None


def _listened_on(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at `path` (a file left by a
    worker that was killed accepts none)."""
    if not path.startswith("@") and not os.path.exists(path):
        return False
    probe = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    probe.settimeout(1.0)  # a worker stopped (SIGSTOP), its queue full, held the connect for ever
    try:
        probe.connect("\0" + path[1:] if path.startswith("@") else path)
        return True
    except TimeoutError:  # there, and not answering: a worker all the same
        return True
    except OSError:
        return False
    finally:
        probe.close()
