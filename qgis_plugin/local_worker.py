"""Start a worker on this machine with a configured Python (the one that has torch)."""

from __future__ import annotations

import json
import os

from qgis.core import QgsApplication, QgsSettings
from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, pyqtSignal

SETTINGS = "SketchSearch"


def worker_python() -> str:
    return QgsSettings().value(f"{SETTINGS}/python", os.environ.get("SKETCH_SEARCH_WORKER_PYTHON", "python3"))


def worker_dir() -> str:
    """The checkout holding the `worker` package (where `python -m worker` runs)."""
    return QgsSettings().value(f"{SETTINGS}/worker_dir", os.environ.get("SKETCH_SEARCH_WORKER_DIR", ""))


def default_index_root() -> str:
    return os.path.join(QgsApplication.qgisSettingsDirPath(), "sketch_search", "indexes")


class LocalWorker(QObject):
    ready = pyqtSignal(str, str)  # endpoint, pub endpoint
    failed = pyqtSignal(str)

    def __init__(self, endpoint: str, parent: QObject | None = None):
        super().__init__(parent)
        self.endpoint = endpoint
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.SeparateChannels)
        self.process.readyReadStandardOutput.connect(self._read_stdout)
        self.process.finished.connect(self._finished)
        self._stderr_tail = b""
        self.process.readyReadStandardError.connect(self._read_stderr)

    def start(self) -> None:
        os.makedirs(default_index_root(), exist_ok=True)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        self.process.setProcessEnvironment(env)
        if worker_dir():
            self.process.setWorkingDirectory(worker_dir())
        self.process.start(worker_python(), ["-m", "worker", "serve", "--bind", self.endpoint,
                                             "--index-root", default_index_root(), "--raster-root", "/"])

    def _read_stdout(self) -> None:
        while self.process.canReadLine():
            line = bytes(self.process.readLine()).decode(errors="replace").strip()
            try:
                info = json.loads(line)
            except ValueError:
                continue
            if "serving" in info:
                self.ready.emit(info["serving"], info["pub"])

    def _read_stderr(self) -> None:
        self._stderr_tail = (self._stderr_tail + bytes(self.process.readAllStandardError()))[-4000:]

    def _finished(self, code: int, _status) -> None:
        self.failed.emit(f"the local worker exited with code {code}: "
                         f"{self._stderr_tail.decode(errors='replace').strip().splitlines()[-1:] or ''}")

    def stop(self) -> None:
        if self.process.state() != QProcess.NotRunning:
            self.process.finished.disconnect(self._finished)
            self.process.terminate()
            if not self.process.waitForFinished(15000):
                self.process.kill()
