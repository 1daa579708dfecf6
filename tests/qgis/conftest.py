"""Real QGIS (Debian's 3.22, headless) with the packaged plugin loaded through qgis.utils,
and a real worker process in the worker venv (SKETCH_SEARCH_WORKER_PYTHON)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
from lab.worker_process import WorkerProcess

WORKER_PYTHON = os.environ.get("SKETCH_SEARCH_WORKER_PYTHON", str(REPO / ".venv" / "bin" / "python"))


def process_until(condition, timeout: float = 60.0) -> bool:
    """Run Qt's event loop until `condition()` holds (the UI stays live meanwhile)."""
    from qgis.core import QgsApplication

    deadline = time.time() + timeout
    while time.time() < deadline:
        QgsApplication.processEvents()
        if condition():
            return True
        time.sleep(0.01)
    return False


def load_packager():
    """scripts/package_plugin as a module (it has no .py suffix: it is a command)."""
    loader = importlib.machinery.SourceFileLoader("package_plugin", str(REPO / "scripts" / "package_plugin"))
    packager = importlib.util.module_from_spec(importlib.util.spec_from_loader("package_plugin", loader))
    loader.exec_module(packager)
    return packager


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory) -> Path:
    plugins = tmp_path_factory.mktemp("plugins")
    load_packager().build_dir(plugins)
    return plugins


@pytest.fixture(scope="session")
def plugin(plugin_dir, qgis_iface, qgis_processing):
    import qgis.utils

    sys.path.insert(0, str(plugin_dir))
    qgis.utils.plugin_paths.insert(0, str(plugin_dir))
    assert qgis.utils.loadPlugin("sketch_search")
    assert qgis.utils.startPlugin("sketch_search")
    instance = qgis.utils.plugins["sketch_search"]
    qgis_iface.mainWindow().addDockWidget(2, instance.dock)  # the stub iface's addDockWidget does nothing
    instance.dock.show()
    yield instance
    qgis.utils.unloadPlugin("sketch_search")


@pytest.fixture(scope="session")
def raster_root(tmp_path_factory) -> Path:
    from worker.assets import load_asset_paths

    root = tmp_path_factory.mktemp("rasters")
    shutil.copy(load_asset_paths()["rmnp_rgb"], root / "rmnp-rgb.tif")
    return root


@pytest.fixture(scope="session")
def worker(tmp_path_factory, raster_root):
    index_root = tmp_path_factory.mktemp("qgis-worker") / "indexes"
    index_root.mkdir()
    proc = WorkerProcess(index_root, raster_root, python=WORKER_PYTHON).start()
    with proc.client() as client:
        job = client.start_index("rmnp", [str(raster_root / "rmnp-rgb.tif")], tile=112, scales=[1, 2])
        deadline = time.time() + 300
        while client.job(job["id"])["state"] in ("queued", "running") and time.time() < deadline:
            time.sleep(0.2)
    yield proc
    proc.stop()
