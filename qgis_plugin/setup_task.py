"""The checkout's own scripts/setup, run as a QGIS background task with its log and progress.

The script installs the worker's venv (torch: several GB on a first run), its weights and sample
rasters, and says what it does one line at a time; a second run only checks, in seconds. Progress
follows the steps the script announces: it cannot know how long pip will take, so neither do we.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
from pathlib import Path
from typing import Optional

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from .checkout import SETUP_SCRIPT
from .worker_command import clean_environment

LOG_LINES_KEPT = 400


def progress_after(line: str, percent: float) -> float:
    """How far the set-up is after the script wrote `line` (percent): the venv is the first big
    step, each package download a further one, `ready:` the end."""
    if "creating worker venv" in line:
        return max(percent, 10.0)
    if "downloading" in line:
        return min(90.0, max(percent, 10.0) + 10.0)
    if "ready:" in line:
        return 100.0
    return percent


class OutputLines:
    """A process's output, given in chunks as it comes, cut into lines (at a newline, or at a
    carriage return, as a progress bar redraws its line)."""

    def __init__(self):
        self._partial = b""

    def add(self, chunk: bytes) -> list[str]:
        """The lines `chunk` completes; b"" (the output's end) also gives the last, unfinished one."""
        text = self._partial + chunk
        if not chunk:
            self._partial = b""
            return [text.decode(errors="replace").rstrip()] if text.strip() else []
        *done, self._partial = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return [line.decode(errors="replace").rstrip() for line in done if line.strip()]


class WorkerSetupTask(QgsTask):
    """Runs CHECKOUT/scripts/setup; cancelling stops it (the script resumes where it was on a rerun)."""

    line_logged = pyqtSignal(str)  # each line of the script's output, as it comes
    ended = pyqtSignal(bool, str)  # success, and what to tell the user

    def __init__(self, checkout: Path):
        super().__init__(f"Setting up the sketch search worker in {checkout}", QgsTask.CanCancel)
        self.checkout = checkout
        self.log: list[str] = []
        self.returncode: Optional[int] = None
        self.error = ""

    def run(self) -> bool:  # in a task thread: may wait, must not touch widgets
        script = self.checkout / SETUP_SCRIPT
        try:
            process = subprocess.Popen([str(script)], cwd=self.checkout, env=clean_environment(),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # its own group: a cancel stops pip too
        except OSError as exc:
            self.error = f"cannot run {script}: {exc}"
            return False
        self.setProgress(1)
        lines = OutputLines()
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                if self.isCanceled():
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait()
                    return False
                if selector.select(timeout=0.2):
                    # what is there, not a whole line: a line still being written must not keep a
                    # cancel waiting
                    chunk = os.read(process.stdout.fileno(), 65536)
                    for line in lines.add(chunk):
                        self._logged(line)
                    if not chunk:
                        break
        self.returncode = process.wait()
        return self.returncode == 0

    def _logged(self, line: str) -> None:
        self.log = (self.log + [line])[-LOG_LINES_KEPT:]
        self.line_logged.emit(line)
        self.setProgress(progress_after(line, self.progress()))

    def finished(self, result: bool) -> None:  # back on QGIS's main thread
        if result:
            self.ended.emit(True, f"The worker is set up in {self.checkout}.")
        elif self.isCanceled():
            self.ended.emit(False, "Setting up the worker was cancelled; Set up worker… again resumes it.")
        else:
            last = self.error or (self.log[-1] if self.log else "no output")
            self.ended.emit(False, f"Setting up the worker failed ({last}). The whole log is in the dock; "
                                   f"fix what it says and press Set up worker… again, or run "
                                   f"{self.checkout / SETUP_SCRIPT} in a terminal.")
