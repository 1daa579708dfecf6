"""Plugin entry: toolbar button, dock widget, Settings > Options page, Processing provider."""

from __future__ import annotations

import os
from typing import Optional

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .controller import SearchController
from .dock import TITLE, SketchSearchDock
from .local_worker import finish_stopping
from .processing_provider import SketchSearchProvider
from .settings_dialog import SettingsPageFactory

ICON = os.path.join(os.path.dirname(__file__), "icon.svg")


class SketchSearchPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.controller: Optional[SearchController] = None
        self.dock: Optional[SketchSearchDock] = None
        self.action: Optional[QAction] = None
        self.provider: Optional[SketchSearchProvider] = None
        self.options_factory: Optional[SettingsPageFactory] = None

    def initProcessing(self) -> None:  # noqa: N802 (QGIS calls it by this name)
        self.provider = SketchSearchProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()
        self.controller = SearchController()
        self.dock = SketchSearchDock(self.iface, self.controller, self.iface.mainWindow())
        self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        self.dock.hide()
        self.action = QAction(QIcon(ICON), TITLE, self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.toggled.connect(self._show_dock)
        self.dock.visibilityChanged.connect(self.action.setChecked)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu(TITLE, self.action)
        self.options_factory = SettingsPageFactory(QIcon(ICON), self.dock.reload_settings)
        self.iface.registerOptionsWidgetFactory(self.options_factory)
        QgsApplication.instance().aboutToQuit.connect(self._quitting)

    def _show_dock(self, visible: bool) -> None:
        """The toolbar button and menu entry; also follows the dock when QGIS restores it."""
        self.dock.setVisible(visible)
        if visible:
            self.dock.first_use()

    def _quitting(self) -> None:
        """QGIS quits: a local worker is stopped and waited for, so an indexing job commits its batch."""
        self.controller.shutdown()
        finish_stopping()

    def unload(self) -> None:
        if self.options_factory is not None:
            self.iface.unregisterOptionsWidgetFactory(self.options_factory)
        if self.controller is not None:
            QgsApplication.instance().aboutToQuit.disconnect(self._quitting)
            self.controller.shutdown()
            self.controller.deleteLater()
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
        if self.action is not None:
            self.iface.removeToolBarIcon(self.action)
            self.iface.removePluginMenu(TITLE, self.action)
            self.action.deleteLater()  # a child of the main window: it would outlive the plugin
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
