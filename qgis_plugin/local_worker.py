"""Start a worker on this machine with a worker Python (the one that has torch), and say what
to change when it stops."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

from qgis.PyQt.QtCore import QCoreApplication, QObject, QProcess, QTimer, pyqtSignal

from .settings import Setting
from .wire.protocol import LOG_RECORD
from .wire.sockets import tcp_host_and_port
from .worker_command import WorkerCommand

LAST_LINES = 12  # of the worker's stderr, shown when it stops
STOP_WAIT_MS = 15000  # SIGTERM lets indexing jobs commit their batch; killed if still running after this
START_POLL_MS = 100  # how often a worker to start looks whether the ones stopping have gone
# the object name of a worker process asked to stop and not gone yet: the application holds it
# until then, so a plugin reloaded meanwhile still finds it
STOPPING = "sketch_search_worker_stopping"

# what to do about each setting when it is the one to blame
ADVICE = {Setting.WORKER_PYTHON: "choose a Python that has torch and the worker (CHECKOUT/.venv/bin/python after "
                                 "scripts/setup), or press Set up worker… to make one",
          Setting.WORKER_DIR: "choose the sketch-search repository folder (the one holding worker/)",
          Setting.ENDPOINT: "another program listens on that port (a worker another QGIS started: Connect to it), "
                            "or choose another port",
          Setting.INDEX_ROOT: "choose a folder you can write to"}


RESTART = "Start local worker starts it again"
RESUMED = "; an indexing job it was running goes on from its last commit (every few seconds)."
OLDER_WORKER = "unrecognized arguments"  # what an older worker says of an option this plugin passes
SIGNALS = {9: "was killed (out of memory, or kill -9)", 15: "was ended by another program"}  # else it crashed


@dataclass(frozen=True)
class WorkerExit:
    """How a local worker stopped: its exit code (None: it never ran), its last lines, and the
    setting that most likely has to change."""

    code: Optional[int]  # with `killed`, the signal
    last_lines: tuple
    setting: Setting
    was_serving: bool = False
    killed: bool = False  # ended by a signal (QProcess.CrashExit): the kernel's OOM killer, a kill

    @property
    def blamed(self) -> Optional[Setting]:
        """The setting to change; None for a worker that ran (killed by a signal, or stopped while
        serving with no other setting named in its last lines): its Python is no suspect."""
        if self.killed or (self.was_serving and self.setting == Setting.WORKER_PYTHON):
            return None
        return self.setting

    @property
    def message(self) -> str:
        if self.code is None:
            what = "could not be run"
        elif self.killed:
            what = f"{SIGNALS.get(self.code, 'crashed')} (signal {self.code})"
        else:
            what = f"stopped{'' if self.was_serving else ' as it started'} (exit code {self.code})"
        telling = why_lines(self.last_lines) if not self.killed else []  # one killed: none say why
        said = f": {telling[-1]}." if telling else "."
        if any(OLDER_WORKER in line for line in self.last_lines):
            remedy = ("The worker checkout is older than this plugin: update it (git pull, then scripts/setup), or "
                      "install the plugin of its version.")
        elif self.blamed is not None:
            remedy = f"Change {self.blamed.describe()}: {ADVICE[self.blamed]}."
        else:
            remedy = RESTART + (RESUMED if self.was_serving else ".")
        return f"The local worker {what}{said} {remedy}"


def why_lines(lines) -> list:
    """Those of a worker's last lines that can say why it stopped: an error, a traceback; not its
    log records of what it did (serving, it logs its jobs and the index folder they are in: a
    crash was quoted as a job's progress, and blamed on the index folder)."""
    return [line for line in lines if not LOG_RECORD.match(line)]


def setting_to_blame(lines: list) -> Setting:
    """The setting a worker's last lines point at (its log records left out)."""
    text = "\n".join(why_lines(lines))
    if "No module named 'worker'" in text or "No module named worker" in text:
        return Setting.WORKER_DIR
    if any(said in text for said in ("Address already in use", "Address in use", "another worker is serving there",
                                       "error: --bind", "error: --pub")):
        return Setting.ENDPOINT
    if "--index-root" in text or Setting.INDEX_ROOT.as_path() in text:
        return Setting.INDEX_ROOT
    return Setting.WORKER_PYTHON


class LocalWorker(QObject):
    """`python -m worker serve` as a child process of QGIS, stopped with it. Stopping never waits:
    the worker is asked to stop and left to finish in the background."""

    ready = pyqtSignal(str)  # the endpoint it serves at
    stopped = pyqtSignal(object)  # a WorkerExit, when it stops by itself

    def __init__(self, command: WorkerCommand, endpoint: str, index_root: str, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.command = command
        self.endpoint = endpoint
        self.index_root = index_root
        self.serving = False
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.SeparateChannels)
        self.process.readyReadStandardOutput.connect(self._read_stdout)
        self.process.readyReadStandardError.connect(self._read_stderr)
        self.process.finished.connect(self._finished)
        self.process.errorOccurred.connect(self._error)
        self._stderr_tail = b""
        self._stop_asked = False
        self._start_timer = self._timer(self.start)  # waits for the workers stopping
        self._kill_timer = self._timer(self.process.kill)  # a stop's last resort

    def _timer(self, then) -> QTimer:
        timer = QTimer(self)
        timer.setSingleShot(True)
        timer.timeout.connect(then)
        return timer

    def start(self) -> None:
        """Start it once every worker this QGIS is stopping has gone: one still committing an
        indexing batch holds its port and its index's lock."""
        if self._stop_asked:
            return
        if still_stopping():
            self._start_timer.start(START_POLL_MS)
            return
        try:
            os.makedirs(self.index_root, exist_ok=True)
        except OSError as exc:
            self.stopped.emit(WorkerExit(None, (f"cannot make the index folder {self.index_root}: {exc}",),
                                         Setting.INDEX_ROOT))
            return
        self.command.prepare(self.process)
        self.process.start(self.command.python, ["-m", "worker", "serve", "--bind", self.endpoint,
                                                 *free_pub_option(self.endpoint),
                                                 "--stop-with", str(QCoreApplication.applicationPid()),
                                                 "--index-root", self.index_root, "--raster-root", "/"])

    def last_lines(self) -> list:
        return self._stderr_tail.decode(errors="replace").strip().splitlines()[-LAST_LINES:]

    def _read_stdout(self) -> None:
        if self._stop_asked:  # a "serving" line from a worker asked to stop is no news
            return
        while self.process.canReadLine():
            line = bytes(self.process.readLine()).decode(errors="replace").strip()
            try:
                info = json.loads(line)
            except ValueError:
                continue
            if isinstance(info, dict) and "serving" in info:
                self.serving = True
                self.ready.emit(info["serving"])

    def _read_stderr(self) -> None:
        self._stderr_tail = (self._stderr_tail + bytes(self.process.readAllStandardError()))[-8000:]

    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read_stderr()
        lines = self.last_lines()
        self.stopped.emit(WorkerExit(code, tuple(lines), setting_to_blame(lines), self.serving,
                                     killed=status == QProcess.CrashExit))

    def _error(self, error: QProcess.ProcessError) -> None:
        if error != QProcess.FailedToStart:
            return
        line, setting = self.command.start_failure(self.process)  # no finished signal follows
        self.stopped.emit(WorkerExit(None, (line,), setting))

    def stop(self) -> None:
        """Ask it to stop (SIGTERM: an indexing job commits its batch first) and return at once; it
        is killed if still running STOP_WAIT_MS later. Waiting here froze QGIS for up to 15 s
        while a job committed. The application keeps it until it has gone, so it outlives a
        plugin unloaded meanwhile (when QGIS quits, finish_stopping waits for it); it is not
        reported as having stopped by itself."""
        self._stop_asked = True
        self._start_timer.stop()
        self.process.finished.disconnect(self._finished)
        self.process.errorOccurred.disconnect(self._error)
        if self.process.state() == QProcess.NotRunning:
            self.deleteLater()
            return
        self.setParent(QCoreApplication.instance())
        self.process.setObjectName(STOPPING)
        self.process.finished.connect(self.deleteLater)
        self.process.errorOccurred.connect(self.deleteLater)  # one still starting that never ran: no finished
        self.process.terminate()
        self._kill_timer.start(STOP_WAIT_MS)


def free_pub_option(endpoint: str) -> list:
    """`--pub` on any free port of a tcp endpoint's host (the worker says which in its info reply):
    its default, the next port, was often taken (a worker another QGIS started holds it for its
    progress, and the next endpoint a user tried met it again); [] for an ipc endpoint."""
    host = tcp_host_and_port(endpoint)[0]
    return ["--pub", f"tcp://{host}:*"] if host else []


def still_stopping() -> list:
    """The processes of the workers asked to stop that are still running (from any plugin load)."""
    return [process for process in QCoreApplication.instance().findChildren(QProcess, STOPPING)
            if process.state() != QProcess.NotRunning]


def finish_stopping(wait_ms: int = STOP_WAIT_MS) -> bool:
    """Wait for the workers asked to stop, at most `wait_ms` in all, and kill those left: for when
    QGIS quits, whose end would kill them at once, mid-commit. True when every one ended by itself."""
    deadline = time.monotonic() + wait_ms / 1000
    by_itself = True
    for process in still_stopping():
        if not process.waitForFinished(max(0, int((deadline - time.monotonic()) * 1000))):
            by_itself = False
            process.kill()
            process.waitForFinished(2000)
    return by_itself
