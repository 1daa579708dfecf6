"""How QGIS runs a worker Python: which interpreter, from which folder, in which environment.

Written once for the probe (can this Python import the worker?) and for the local worker itself,
so that a Python found usable is run exactly as it was checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from qgis.PyQt.QtCore import QDir, QProcess, QProcessEnvironment

from .checkout import plugin_checkout
from .settings import Setting

# QGIS sets these for its own Python; a worker venv must not see QGIS's packages
QGIS_PYTHON_VARIABLES = ("PYTHONPATH", "PYTHONHOME")


@dataclass(frozen=True)
class WorkerCommand:
    """A worker Python and the checkout it imports `worker` from ("" for an installed package)."""

    python: str
    worker_dir: str = ""

    @classmethod
    def configured(cls) -> Optional["WorkerCommand"]:
        """The one in the settings (or their environment variables), or None when none is set.
        Without a checkout set, a plugin folder that is a link into a checkout names it."""
        python = Setting.WORKER_PYTHON.as_path()
        if not python:
            return None
        checkout = plugin_checkout()
        return cls(python, Setting.WORKER_DIR.as_path() or (str(checkout) if checkout else ""))

    def save(self) -> None:
        """Make this the configured worker."""
        Setting.WORKER_PYTHON.set(self.python)
        Setting.WORKER_DIR.set(self.worker_dir)

    def working_directory(self) -> str:
        # `python -m worker` imports from the working folder first: never QGIS's own, by chance
        return self.worker_dir or QDir.tempPath()

    def environment(self) -> QProcessEnvironment:
        env = QProcessEnvironment.systemEnvironment()
        for name in QGIS_PYTHON_VARIABLES:
            env.remove(name)
        if self.worker_dir:
            env.insert("PYTHONPATH", self.worker_dir)
        env.insert("PYTHONUNBUFFERED", "1")
        return env

    def prepare(self, process: QProcess) -> None:
        """Set up `process` to run this Python (then call process.start(self.python, args))."""
        process.setWorkingDirectory(self.working_directory())
        process.setProcessEnvironment(self.environment())

    def start_failure(self, process: QProcess) -> tuple[str, Setting]:
        """Why `process`, prepared by this command, could not start, and the setting to change: a
        checkout that is no folder (Qt says "chdir: No such file", which read as the Python's
        fault), else this Python."""
        folder = self.working_directory()
        if not os.path.isdir(folder):
            return f"the worker checkout {folder} is no folder", Setting.WORKER_DIR
        return f"cannot run {self.python}: {process.errorString()}", Setting.WORKER_PYTHON


def clean_environment() -> dict:
    """This process's environment without QGIS's Python variables (for a shell script)."""
    return {k: v for k, v in os.environ.items() if k not in QGIS_PYTHON_VARIABLES}
