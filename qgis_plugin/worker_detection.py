"""Finding a worker that is already usable here: the candidate Pythons, each checked by running
it (a QProcess, so QGIS never waits) on the code the worker needs to serve."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qgis.PyQt.QtCore import QObject, QProcess, QTimer, pyqtSignal

from .checkout import known_checkout, plugin_checkout, venv_python
from .settings import Setting
from .worker_command import WorkerCommand

PYTHON_VARIABLE = "SKETCH_SEARCH_WORKER_PYTHON"
DIR_VARIABLE = "SKETCH_SEARCH_WORKER_DIR"
# what `python -m worker serve` imports before it loads the model, the weights it loads (a set-up
# cancelled or failed while downloading leaves a venv without them), and the versions to show
PROBE_CODE = ("import json, torch, worker, worker.service.startup\n"
              "from worker.assets import default_weights_path\n"
              "if not default_weights_path().exists():\n"
              "    raise SystemExit(f'the model weights are missing ({default_weights_path()}): its set-up did not "
              "finish (Set up worker\u2026 finishes it), or it was set up with another SKETCH_SEARCH_CACHE')\n"
              "print(json.dumps({'worker': worker.__version__, 'location': worker.__file__, "
              "'torch': torch.__version__, 'cuda': torch.cuda.is_available()}))")
SETTINGS_SOURCE = "your settings"
PROBE_TIMEOUT_S = 120  # torch imports in seconds; a first import from a cold disk takes longer


@dataclass(frozen=True)
class Candidate:
    """A worker Python worth trying, and where the plugin learnt of it (in words)."""

    command: WorkerCommand
    source: str


@dataclass(frozen=True)
class ProbeResult:
    candidate: Candidate
    usable: bool
    detail: str  # the versions found, or why it cannot serve (its last error line)


def candidates() -> list[Candidate]:
    """What to try, in order: the saved settings, the environment variables, the checkout's .venv."""
    found: list[Candidate] = []
    checkout = known_checkout()
    if Setting.WORKER_PYTHON.is_saved() and Setting.WORKER_PYTHON.get().strip():
        found.append(Candidate(WorkerCommand.configured(), SETTINGS_SOURCE))
    env_python = os.environ.get(PYTHON_VARIABLE, "").strip()
    if env_python:
        env_dir = os.environ.get(DIR_VARIABLE, "").strip() or str(checkout or plugin_checkout() or "")
        found.append(Candidate(WorkerCommand(env_python, env_dir), f"the {PYTHON_VARIABLE} environment variable"))
    if checkout is not None and venv_python(checkout).is_file():
        found.append(Candidate(WorkerCommand(str(venv_python(checkout)), str(checkout)),
                               f"the checkout's .venv in {checkout}"))
    unique: dict[WorkerCommand, Candidate] = {}
    for candidate in found:
        unique.setdefault(candidate.command, candidate)
    return list(unique.values())


class WorkerProbe(QObject):
    """Tries candidates one after another until one can serve; reports every try."""

    finished = pyqtSignal(list)  # ProbeResult per candidate tried; the last is usable when one was

    def __init__(self, parent: Optional[QObject] = None):
        super().__init__(parent)
        self._queue: list[Candidate] = []
        self._results: list[ProbeResult] = []
        self._current: Optional[Candidate] = None
        self._process: Optional[QProcess] = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._give_up)

    @property
    def running(self) -> bool:
        return self._process is not None

    def start(self, tried: list[Candidate]) -> None:
        """Check `tried` in order (nothing to check: finished at once, with no results)."""
        self.stop()
        self._queue, self._results = list(tried), []
        self._next()

    def stop(self) -> None:
        """Kill a check in progress; nothing is reported."""
        self._timer.stop()
        process, self._process = self._process, None
        if process is not None:
            process.finished.disconnect(self._done)
            process.errorOccurred.disconnect(self._failed_to_start)
            process.kill()
            process.waitForFinished(2000)
            process.deleteLater()

    def _next(self) -> None:
        if not self._queue or (self._results and self._results[-1].usable):
            return self.finished.emit(self._results)
        self._current = self._queue.pop(0)
        self._process = QProcess(self)
        self._current.command.prepare(self._process)
        self._process.finished.connect(self._done)
        self._process.errorOccurred.connect(self._failed_to_start)
        self._timer.start(PROBE_TIMEOUT_S * 1000)
        self._process.start(self._current.command.python, ["-c", PROBE_CODE])

    def _record(self, usable: bool, detail: str) -> None:
        self._timer.stop()
        if self._process is not None:
            self._process.deleteLater()
            self._process = None
        self._results.append(ProbeResult(self._current, usable, detail))
        self._next()

    def _done(self, code: int, _status: QProcess.ExitStatus) -> None:
        out = bytes(self._process.readAllStandardOutput()).decode(errors="replace").strip().splitlines()
        err = bytes(self._process.readAllStandardError()).decode(errors="replace").strip().splitlines()
        if code == 0 and out:
            try:
                found = json.loads(out[-1])
                where = Path(found["location"]).parent.parent
                return self._record(True, f"worker {found['worker']} from {where}, torch {found['torch']}, "
                                          + ("CUDA" if found["cuda"] else "CPU only"))
            except (ValueError, KeyError, TypeError):
                pass
        self._record(False, err[-1] if err else f"exited with code {code}")

    def _failed_to_start(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.FailedToStart:  # no finished signal follows this one
            self._record(False, self._current.command.start_failure(self._process)[0])

    def _give_up(self) -> None:
        if self._process is None:
            return
        self._process.finished.disconnect(self._done)
        self._process.kill()
        self._process.waitForFinished(2000)
        self._record(False, f"did not answer within {PROBE_TIMEOUT_S} s")
