"""Run inside the real QGIS desktop (qgis --code): use the plugin, draw, search, screenshot.

Inputs come from environment variables set by test_desktop.py; the outcome is written as
JSON to SKETCH_TEST_STATUS, and two screenshots: the dock as a new user first opens it
(SKETCH_TEST_FIRST_RUN) and the desktop after a search (SKETCH_TEST_SCREENSHOT). A timer walks
the steps so QGIS's event loop keeps running, as it would for a user.
"""

import json
import os
import sys
import time
import traceback

import qgis.utils
from qgis.core import QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QApplication
from qgis.utils import iface

env = os.environ
sys.path.insert(0, env["SKETCH_TEST_HELPERS"])
from mouse import drag  # noqa: E402
status = {"steps": []}
started = time.time()


def finish(ok: bool, error: str = "") -> None:
    status.update(ok=ok, error=error, seconds=round(time.time() - started, 1))
    with open(env["SKETCH_TEST_STATUS"], "w") as f:
        json.dump(status, f)
    QgsProject.instance().clear()  # else a modal "save project?" blocks the exit
    iface.actionExit().trigger()


def look_at_the_options_page() -> None:
    """Settings > Options holds the plugin's page (QGIS builds every page when it opens)."""
    from sketch_search.settings_dialog import SettingsPage

    def inspect() -> None:
        dialog = QApplication.activeModalWidget()
        if dialog is None:
            return QTimer.singleShot(200, inspect)
        status["options_pages"] = len(dialog.findChildren(SettingsPage))
        dialog.reject()
    QTimer.singleShot(500, inspect)
    iface.showOptionsDialog(iface.mainWindow())  # modal: returns when inspect() closed it


def setup():
    plugin = qgis.utils.plugins["sketch_search"]  # installed in the profile and enabled, as a user would
    layer = QgsRasterLayer(env["SKETCH_TEST_RASTER"], "rmnp-rgb")
    QgsProject.instance().addMapLayer(layer)
    iface.mapCanvas().setExtent(layer.extent())
    plugin.action.setChecked(True)  # the dock opened for the first time: it looks for a worker
    status["steps"].append("plugin loaded")
    return plugin.dock


state = {"dock": None, "phase": "first run", "deadline": time.time() + 120}


def tick():
    try:
        dock = state["dock"]
        if time.time() > state["deadline"]:
            return finish(False, f"timed out in phase {state['phase']}: {dock.worker_panel.status_label.text() if dock else ''}")
        if dock is None:
            state["dock"] = setup()
        elif state["phase"] == "first run" and not dock.worker_panel.notice.isHidden():
            state["phase"] = "first run shown"
            state["render_at"] = time.time() + 2
        elif state["phase"] == "first run shown" and time.time() > state["render_at"]:
            status["first_run_notice"] = dock.worker_panel.notice_text.text()
            iface.mainWindow().grab().save(env["SKETCH_TEST_FIRST_RUN"])
            status["steps"].append("first run screenshot saved")
            look_at_the_options_page()
            dock.connect_worker(env["SKETCH_TEST_ENDPOINT"])
            state["phase"] = "connect"
        elif state["phase"] == "connect" and dock.index_combo.count() > 0:
            dock.index_combo.setCurrentText("rmnp")
            dock.draw_button.setChecked(True)
            vp = iface.mapCanvas().viewport()
            w, h = vp.width(), vp.height()
            drag(vp, [(int(w * x), int(h * y)) for x, y in [(0.2, 0.3), (0.35, 0.45), (0.5, 0.4), (0.7, 0.65)]])
            drag(vp, [(int(w * 0.25), int(h * 0.75)), (int(w * 0.6), int(h * 0.7))])
            dock.top_spin.setValue(5)
            dock.search_button.click()
            status["steps"].append(f"searched with {len(dock.map_tool.strokes())} strokes")
            state["phase"] = "search"
        elif state["phase"] == "search" and dock.controller.result_layer is not None:
            layer = dock.controller.result_layer
            status["hits"] = layer.featureCount()
            status["layer"] = layer.name()
            status["crs"] = layer.crs().authid()
            iface.mapCanvas().refreshAllLayers()
            state["phase"] = "render"
            state["render_at"] = time.time() + 3
        elif state["phase"] == "render" and time.time() > state["render_at"]:
            iface.mainWindow().grab().save(env["SKETCH_TEST_SCREENSHOT"])
            status["steps"].append("screenshot saved")
            return finish(True)
        QTimer.singleShot(200, tick)
    except Exception:
        finish(False, traceback.format_exc())


QTimer.singleShot(1000, tick)
