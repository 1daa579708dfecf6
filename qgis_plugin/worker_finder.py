"""First use: find a worker that is already usable here, or set one up from the checkout.

Both run in the background (a QProcess per candidate, a QgsTask for the set-up) and say what
they found through signals; the controller decides what happens next.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .checkout import SETUP_SCRIPT, is_checkout, known_checkout, venv_python
from .setup_task import WorkerSetupTask
from .worker_command import WorkerCommand
from .worker_detection import WorkerProbe, candidates


@dataclass(frozen=True)
class MissingWorker:
    """No usable worker here: what was tried, and the checkout Set up worker… would use (or None)."""

    checkout: Optional[Path]
    tried: tuple  # ProbeResult per candidate


class WorkerFinder(QObject):
    searching = pyqtSignal()
    found = pyqtSignal(object)  # the usable ProbeResult
    missing = pyqtSignal(object)  # a MissingWorker
    setup_started = pyqtSignal(str)  # the checkout
    setup_line = pyqtSignal(str)
    setup_progress = pyqtSignal(float)  # percent
    setup_ended = pyqtSignal(bool, str, object)  # success, what to tell the user, the WorkerCommand made (or None)

    def __init__(self, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.probe = WorkerProbe(self)
        self.probe.finished.connect(self._probed)
        self.task: Optional[WorkerSetupTask] = None  # kept here: QGIS's task manager does not keep Python alive

    @property
    def setting_up(self) -> bool:
        return self.task is not None

    def find(self) -> None:
        """Check the candidate workers (found or missing follows); a search under way goes on."""
        if self.probe.running:
            return
        self.searching.emit()
        self.probe.start(candidates())

    def _probed(self, results: list) -> None:
        if results and results[-1].usable:
            self.found.emit(results[-1])
        else:
            self.missing.emit(MissingWorker(known_checkout(), tuple(results)))

    def set_up(self, checkout: Path) -> Optional[str]:
        """Run the checkout's scripts/setup as a task; returns why not, or None when it started."""
        if self.task is not None:
            return "the worker is being set up already: see its log in the dock"
        if not is_checkout(checkout):
            return (f"{checkout} is not a sketch-search checkout (it has no worker/ and {SETUP_SCRIPT}): "
                    "choose the folder of the repository")
        self.task = WorkerSetupTask(checkout)
        self.task.line_logged.connect(self.setup_line)
        self.task.progressChanged.connect(self.setup_progress)
        self.task.ended.connect(self._set_up)
        QgsApplication.taskManager().addTask(self.task)
        self.setup_started.emit(str(checkout))
        return None

    def _set_up(self, ok: bool, message: str) -> None:
        checkout, self.task = self.task.checkout, None
        python = venv_python(checkout)
        if ok and not python.is_file():
            ok, message = False, f"{SETUP_SCRIPT} ended without making {python}: see its log in the dock"
        self.setup_ended.emit(ok, message, WorkerCommand(str(python), str(checkout)) if ok else None)

    def cancel_setup(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def shutdown(self) -> None:
        self.probe.stop()
        self.cancel_setup()
