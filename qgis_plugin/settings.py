"""The plugin's settings: one list of keys, each read and written through QgsSettings.

They live under SketchSearch/ in the user's QGIS profile, so they outlast the session; an
environment variable can stand in for a setting not yet made (the test and CI runs do).
"""

from __future__ import annotations

import os
from enum import Enum

from qgis.core import QgsApplication, QgsSettings

from .wire.protocol import DEFAULT_ENDPOINT

GROUP = "SketchSearch"


def _env(name: str, fallback: str):
    return lambda: os.environ.get(name, fallback)


def _default_index_root() -> str:
    return os.path.join(QgsApplication.qgisSettingsDirPath(), "sketch_search", "indexes")


class Setting(Enum):
    """A setting: its key under SketchSearch/ and a function giving its default."""

    WORKER_PYTHON = ("python", _env("SKETCH_SEARCH_WORKER_PYTHON", "python3"))  # the Python that has torch
    WORKER_DIR = ("worker_dir", _env("SKETCH_SEARCH_WORKER_DIR", ""))  # the checkout holding `worker`
    ENDPOINT = ("endpoint", lambda: DEFAULT_ENDPOINT)  # the worker last connected to
    SERVER_KEY = ("server_key", lambda: "")  # path of that worker's public CURVE key
    CLIENT_KEY = ("client_key", lambda: "")  # path of this client's secret CURVE key
    INDEX_ROOT = ("index_root", _default_index_root)  # where a local worker keeps its indexes

    def __init__(self, key: str, default):
        self.key = key
        self._default = default

    @property
    def path(self) -> str:
        return f"{GROUP}/{self.key}"

    def default(self) -> str:
        return self._default()

    def get(self) -> str:
        value = QgsSettings().value(self.path, None)
        return self.default() if value is None else str(value)

    def set(self, value: str) -> None:
        QgsSettings().setValue(self.path, str(value))

    def reset(self) -> None:
        """Back to the default (the key is removed)."""
        QgsSettings().remove(self.path)
