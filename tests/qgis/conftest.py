"""Real QGIS (Debian's 3.22, headless) with the checkout's plugin loaded through qgis.utils (a
plugins folder linking to qgis_plugin/, as a developer installs it), and a real worker process
in the worker venv (SKETCH_SEARCH_WORKER_PYTHON). test_desktop.py installs the built zip instead."""

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
    """A plugins folder whose sketch_search is a link to the checkout's qgis_plugin/."""
    plugins = tmp_path_factory.mktemp("plugins")
    (plugins / "sketch_search").symlink_to(REPO / "qgis_plugin", target_is_directory=True)
    return plugins


@pytest.fixture(scope="session")
def plugin_started(plugin_dir, qgis_iface, qgis_processing):
    """The plugin loaded and started once, in a main window shown at a desktop's size: hidden,
    the map canvas's viewport stayed 98 x 28 px, and strokes dragged across it fell outside it."""
    import qgis.utils
    from qgis.core import QgsApplication

    qgis_iface.mainWindow().resize(1600, 1000)
    qgis_iface.mainWindow().show()
    QgsApplication.processEvents()

    sys.path.insert(0, str(plugin_dir))
    qgis.utils.plugin_paths.insert(0, str(plugin_dir))
    assert qgis.utils.loadPlugin("sketch_search")
    assert qgis.utils.startPlugin("sketch_search")
    yield
    qgis.utils.unloadPlugin("sketch_search")


@pytest.fixture
def plugin(plugin_started, qgis_iface):
    """The running plugin (a new instance after a reload), its dock shown in the main window."""
    import qgis.utils

    from qgis.core import QgsSettings
    from sketch_search.settings import FOLLOWED_JOB

    QgsSettings().remove(FOLLOWED_JOB)  # a job an earlier test followed is not this test's to follow
    instance = qgis.utils.plugins["sketch_search"]
    qgis_iface.mainWindow().addDockWidget(2, instance.dock)  # the stub iface's addDockWidget does nothing
    instance.dock.show()
    return instance


@pytest.fixture
def reloaded_plugin(plugin_started, qgis_iface):
    """A new instance of the plugin whose dock has not been shown yet, as on a first use."""
    import qgis.utils

    assert qgis.utils.reloadPlugin("sketch_search")
    instance = qgis.utils.plugins["sketch_search"]
    qgis_iface.mainWindow().addDockWidget(2, instance.dock)
    return instance


@pytest.fixture
def new_user_settings(plugin_started):
    """Every setting of the plugin back to its default before and after the test: a new user."""
    from sketch_search.settings import Setting

    for setting in Setting:
        setting.reset()
    yield Setting
    for setting in Setting:
        setting.reset()


@pytest.fixture(scope="session")
def raster_root(tmp_path_factory) -> Path:
    from worker.assets import load_asset_paths

    root = tmp_path_factory.mktemp("rasters")
    shutil.copy(load_asset_paths()["rmnp_rgb"], root / "rmnp-rgb.tif")
    return root


def show_rmnp(raster_root, qgis_iface):
    """The sample raster added to the project (EPSG:3857), the canvas on it; returns the layer."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer

    project = QgsProject.instance()
    project.setCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    layer = QgsRasterLayer(str(raster_root / "rmnp-rgb.tif"), "rmnp")
    assert layer.isValid()
    project.addMapLayer(layer)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(project.crs())
    canvas.setLayers([layer])
    canvas.setExtent(canvas.mapSettings().layerExtentToOutputExtent(layer, layer.extent()))
    canvas.refresh()
    return layer


@pytest.fixture
def rmnp_layer(raster_root, qgis_iface):
    """The sample raster in the project (show_rmnp); every layer removed after."""
    from qgis.core import QgsProject

    yield show_rmnp(raster_root, qgis_iface)
    for other in list(QgsProject.instance().mapLayers().values()):
        QgsProject.instance().removeMapLayer(other.id())


@pytest.fixture(scope="session")
def worker(tmp_path_factory, raster_root):
    index_root = tmp_path_factory.mktemp("qgis-worker") / "indexes"
    index_root.mkdir()
    proc = WorkerProcess(index_root, raster_root, python=WORKER_PYTHON).start()
    proc.index("rmnp", [raster_root / "rmnp-rgb.tif"], tile=112, scales=[1, 2])
    yield proc
    proc.stop()
