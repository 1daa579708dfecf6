"""Start and stop a real `python -m worker serve` process for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from wire import job_states as states
from wire.client import WorkerClient
from wire.errors import WorkerUnavailable
from wire.sockets import CurveKeys

REPO = Path(__file__).resolve().parents[1]


def make_curve_keys(root: Path) -> tuple[Path, CurveKeys]:
    """A --curve-keys folder (server key pair, one authorised client) and that client's keys."""
    import zmq.auth

    keys = root / "keys"
    (keys / "authorized_clients").mkdir(parents=True)
    zmq.auth.create_certificates(str(keys), "server")
    _, client_secret = zmq.auth.create_certificates(str(keys / "authorized_clients"), "client")
    return keys, CurveKeys.from_files(keys / "server.key", client_secret)


def wait_job(client: WorkerClient, job_id: str, timeout: float = 300) -> dict:
    """The job once it has ended (TimeoutError when it has not within `timeout` seconds)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.job(job_id)
        if job["state"] in states.FINISHED:
            return job
        time.sleep(0.2)
    raise TimeoutError(job)


def memory_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now (VmRSS) and at its peak (VmHWM), in MB (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: int(line.split()[1]) / 1024 for line in status.splitlines()
            for key in ("VmRSS", "VmHWM") if line.startswith(key + ":")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TRIES = 3  # a free port may be taken before the worker binds it (by any connection's own port)


class WorkerProcess:
    def __init__(self, index_root: Path, raster_root: Path, bind: str | None = None, extra: list[str] = (),
                 python: str = sys.executable, env: dict[str, str] | None = None):
        self.index_root = index_root
        self.given_bind = bind
        self.cmd = [python, "-m", "worker", "serve", "--bind", "", "--pub", "", "--device", "cpu", "--index-root",
                    str(index_root), "--raster-root", str(raster_root), "--sketch-modules", "none", *extra]
        self.env = env  # the process's environment (None: this one's)
        self.proc: subprocess.Popen | None = None
        self._choose_ports()

    def _choose_ports(self) -> None:
        """Free ports for the worker's sockets, put in its command (which a test may have added to)."""
        port = free_port()
        self.bind = self.given_bind or f"tcp://127.0.0.1:{port}"
        self.pub = f"tcp://127.0.0.1:{free_port()}"
        self.cmd[self.cmd.index("--bind") + 1], self.cmd[self.cmd.index("--pub") + 1] = self.bind, self.pub
        self.log = self.index_root.parent / f"worker-{port}.log"

    def start(self, timeout: float = 90.0, curve=None) -> "WorkerProcess":
        """Start and wait until it answers a ping (sent with `curve` keys for a CURVE bind); on
        free ports taken meanwhile, on others."""
        env = os.environ if self.env is None else self.env
        for attempt in range(PORT_TRIES):
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=open(self.log, "ab"),
                                         text=True, env={**env, "PYTHONUNBUFFERED": "1"})
            line = self.proc.stdout.readline()
            if line:
                break
            said = f"worker exited ({self.proc.wait()}): {self.log.read_text()[-2000:]}"
            if "Address already in use" not in said or attempt == PORT_TRIES - 1:
                raise RuntimeError(said)
            self._choose_ports()
        deadline = time.time() + timeout
        assert json.loads(line)["serving"] == self.bind
        with self.client(timeout=5, curve=curve) as c:
            while True:
                try:
                    c.ping()
                    return self
                except WorkerUnavailable:
                    if time.time() > deadline:
                        raise

    def client(self, **kw) -> WorkerClient:
        return WorkerClient(self.bind, **{"timeout": 60, **kw})

    def index(self, name: str, rasters: list[Path], **tiling) -> dict:
        """Build an index through the worker and wait for its job to end; returns the job."""
        with self.client() as c:
            return wait_job(c, c.start_index(name, [str(r) for r in rasters], **tiling)["id"])

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill(signal.SIGTERM)
