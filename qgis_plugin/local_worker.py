"""Start a worker on this machine with a configured Python (the one that has torch)."""

from __future__ import annotations

import json
import os
from typing import Optional

from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, pyqtSignal

from .settings import Setting


class LocalWorker(QObject):
    """`python -m worker serve` as a child process of QGIS, stopped with it."""

    ready = pyqtSignal(str, str)  # endpoint, pub endpoint
    failed = pyqtSignal(str)

    def __init__(self, endpoint: str, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.endpoint = endpoint
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.SeparateChannels)
        self.process.readyReadStandardOutput.connect(self._read_stdout)
        self.process.finished.connect(self._finished)
        self._stderr_tail = b""
        self.process.readyReadStandardError.connect(self._read_stderr)

    def start(self) -> None:
        index_root = Setting.INDEX_ROOT.get()
        os.makedirs(index_root, exist_ok=True)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        self.process.setProcessEnvironment(env)
        worker_dir = Setting.WORKER_DIR.get()
        if worker_dir:
            self.process.setWorkingDirectory(worker_dir)
        self.process.start(Setting.WORKER_PYTHON.get(), ["-m", "worker", "serve", "--bind", self.endpoint,
                                                         "--index-root", index_root, "--raster-root", "/"])

    def _read_stdout(self) -> None:
        while self.process.canReadLine():
            line = bytes(self.process.readLine()).decode(errors="replace").strip()
            try:
                info = json.loads(line)
            except ValueError:
                continue
            if isinstance(info, dict) and "serving" in info:
                self.ready.emit(info["serving"], info["pub"])

    def _read_stderr(self) -> None:
        self._stderr_tail = (self._stderr_tail + bytes(self.process.readAllStandardError()))[-4000:]

    def _finished(self, code: int, _status) -> None:
        last = self._stderr_tail.decode(errors="replace").strip().splitlines()[-1:]
        self.failed.emit(f"the local worker exited with code {code}: {last[0] if last else 'no message'} "
                         f"(Python: {Setting.WORKER_PYTHON.get()}; set {Setting.WORKER_PYTHON.path} and "
                         f"{Setting.WORKER_DIR.path} to the worker's venv and checkout)")

    def stop(self) -> None:
        if self.process.state() != QProcess.NotRunning:
            self.process.finished.disconnect(self._finished)
            self.process.terminate()
            if not self.process.waitForFinished(15000):
                self.process.kill()
