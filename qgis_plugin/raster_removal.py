"""Choosing which of an index's rasters to take out of it (the worker's `remove_rasters`): a raster
indexed by mistake, or deleted for good, which every search otherwise names as unreadable."""

from __future__ import annotations

import os
from typing import Optional

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QDialog, QDialogButtonBox, QLabel, QListWidget, QListWidgetItem, QVBoxLayout, QWidget


class RasterRemovalDialog(QDialog):
    """The index's rasters, none ticked; Remove is enabled once one is."""

    def __init__(self, index: dict, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.setWindowTitle(f"Remove rasters from “{index['name']}”")
        layout = QVBoxLayout(self)
        note = QLabel("Tick the rasters to take out of the index: their tiles go from the worker's disk (the raster "
                      "files stay), and searches no longer find them. Indexing them again brings them back.")
        note.setWordWrap(True)
        layout.addWidget(note)
        self.raster_list = QListWidget()
        for path in index.get("rasters") or []:
            item = QListWidgetItem(os.path.basename(path) or path)
            item.setData(Qt.UserRole, path)
            item.setToolTip(path)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Unchecked)
            self.raster_list.addItem(item)
        layout.addWidget(self.raster_list)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Cancel)
        self.remove_button = self.buttons.addButton("Remove", QDialogButtonBox.DestructiveRole)
        self.remove_button.setEnabled(False)
        self.remove_button.clicked.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)
        self.raster_list.itemChanged.connect(lambda _item: self.remove_button.setEnabled(bool(self.ticked())))

    def ticked(self) -> list:
        """The ticked rasters' paths, as the worker lists them."""
        items = [self.raster_list.item(i) for i in range(self.raster_list.count())]
        return [i.data(Qt.UserRole) for i in items if i.checkState() == Qt.Checked]
