"""The plugin's settings: one list of keys, each read and written through QgsSettings.

They live under SketchSearch/ in the user's QGIS profile, so they outlast the session; an
environment variable can stand in for a worker setting not yet made (the test and CI runs do).
Each key carries the label and the help a person sees for it (the Settings dialog, and error
messages that name the setting to change), so what a setting is called is written once.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Callable, Optional

from qgis.core import QgsApplication, QgsSettings

from .wire.protocol import DEFAULT_ENDPOINT

GROUP = "SketchSearch"


def _env(name: str, fallback: str = "") -> Callable[[], str]:
    return lambda: os.environ.get(name, fallback)


def _default_index_root() -> str:
    return os.path.join(QgsApplication.qgisSettingsDirPath(), "sketch_search", "indexes")


class Setting(Enum):
    """A setting: its key under SketchSearch/, a function giving its default, its label and help."""

    WORKER_PYTHON = ("python", _env("SKETCH_SEARCH_WORKER_PYTHON"), "Worker Python",
                     "The Python that runs the worker: it has torch and can import the sketch-search `worker` "
                     "package (after scripts/setup: CHECKOUT/.venv/bin/python). Empty: none chosen yet.")
    WORKER_DIR = ("worker_dir", _env("SKETCH_SEARCH_WORKER_DIR"), "Worker checkout",
                  "The sketch-search repository folder (it holds worker/ and scripts/setup). Leave empty when "
                  "the worker Python has the `worker` package installed.")
    INDEX_ROOT = ("index_root", _default_index_root, "Index folder",
                  "Where a local worker keeps its indexes (each index is a folder in it).")
    ENDPOINT = ("endpoint", lambda: DEFAULT_ENDPOINT, "Endpoint",
                "The worker's address: tcp://HOST:PORT. A local worker binds it; Connect talks to a worker "
                "already running there (a GPU machine, for example).")
    SERVER_KEY = ("server_key", lambda: "", "Server public key",
                  "For a remote worker started with --curve-keys: its public key file (server.key). "
                  "Leave both key files empty for a worker on this machine.")
    CLIENT_KEY = ("client_key", lambda: "", "Client secret key",
                  "For a remote worker started with --curve-keys: this client's secret key file "
                  "(client.key_secret), whose public key is in the worker's authorized_clients/.")

    def __init__(self, key: str, default: Callable[[], str], label: str, help_text: str):
        self.key = key
        self._default = default
        self.label = label
        self.help_text = help_text

    @property
    def path(self) -> str:
        return f"{GROUP}/{self.key}"

    def default(self) -> str:
        return self._default()

    def get(self) -> str:
        """The saved value, else the default (an environment variable, for the worker settings):
        as the user wrote it (the Settings dialog shows it so)."""
        value = QgsSettings().value(self.path, None)
        return self.default() if value is None else str(value)

    def as_path(self) -> str:
        """The value as a path to use: stripped, `~` expanded, and a relative path taken from the home
        folder (the worker runs in another folder than QGIS, and each made its own folder of a
        relative or `~` index folder); a bare name (`python3`, found on PATH) and an empty value
        as they are."""
        value = self.get().strip()
        if not value.startswith("~") and os.sep not in value and "/" not in value:
            return value
        return os.path.join(os.path.expanduser("~"), os.path.expanduser(value))

    def set(self, value: str) -> None:
        QgsSettings().setValue(self.path, str(value))

    def is_saved(self) -> bool:
        """Whether the user saved a value (not only the default standing in)."""
        return QgsSettings().contains(self.path)

    def reset(self) -> None:
        """Back to the default (the key is removed)."""
        QgsSettings().remove(self.path)

    def describe(self) -> str:
        """How a person finds it: the label in the Settings dialog and the key in the profile."""
        return f"“{self.label}” in Sketch search Settings ({self.path})"


FOLLOWED_JOB = f"{GROUP}/followed_job"  # no setting a person makes: see followed_job


def followed_job() -> Optional[tuple]:
    """(endpoint, index, job id) of the indexing job the dock followed when its connection closed
    or its worker stopped, kept in the profile: a plugin reloaded, or QGIS started again (its
    local worker goes on with the job), follows it again; the dock's bar said nothing of it."""
    parts = tuple(str(QgsSettings().value(FOLLOWED_JOB, "") or "").split("\n"))
    return parts if len(parts) == 3 and all(parts) else None


def keep_followed_job(job: Optional[tuple]) -> None:
    """Keep (endpoint, index, job id) as followed_job, or forget it (None)."""
    if job is None:
        QgsSettings().remove(FOLLOWED_JOB)
    else:
        QgsSettings().setValue(FOLLOWED_JOB, "\n".join(job))
