"""Plugin entry: toolbar button, dock widget, Processing provider."""

from __future__ import annotations

import os

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .dock import SketchSearchDock
from .processing_provider import SketchSearchProvider

ICON = os.path.join(os.path.dirname(__file__), "icon.svg")


class SketchSearchPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.dock: SketchSearchDock | None = None
        self.action: QAction | None = None
        self.provider: SketchSearchProvider | None = None

    def initProcessing(self) -> None:  # noqa: N802 (QGIS calls it by this name)
        self.provider = SketchSearchProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()
        self.dock = SketchSearchDock(self.iface, self.iface.mainWindow())
        self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        self.dock.hide()
        self.action = QAction(QIcon(ICON), "Sketch search", self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.toggled.connect(self.dock.setVisible)
        self.dock.visibilityChanged.connect(self.action.setChecked)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu("Sketch search", self.action)
        QgsApplication.instance().aboutToQuit.connect(self.dock.shutdown)

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
        if self.action is not None:
            self.iface.removeToolBarIcon(self.action)
            self.iface.removePluginMenu("Sketch search", self.action)
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
