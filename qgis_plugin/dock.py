"""The "Sketch search" dock: a view. It shows the controller's state and turns what the user
does (connect, build, draw, search) into the controller's calls; it holds only the sketch
being drawn, which lives in its widgets."""

from __future__ import annotations

from typing import Optional

from qgis.core import (Qgis, QgsCoordinateTransform, QgsMapLayerType, QgsMapRendererParallelJob, QgsMapSettings,
                       QgsMessageLog, QgsProject, QgsRectangle)
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QIcon, QPixmap
from qgis.PyQt.QtWidgets import (QComboBox, QDockWidget, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                                 QLineEdit, QListWidget, QListWidgetItem, QProgressBar, QPushButton, QSpinBox,
                                 QVBoxLayout, QWidget)

from .controller import Connection, SearchController, SearchQuery, Status
from .settings import Setting
from .sketch_pad import SketchPad
from .sketch_tool import SketchMapTool
from .wire import job_states as states
from .wire.protocol import DEFAULT_TOP, MAX_TOP

TITLE = "Sketch search"
PROGRESS_STEPS = 1000
WHOLE_INDEX, MAP_VIEW = 0, 1  # the search area choices


class SketchSearchDock(QDockWidget):
    def __init__(self, iface, controller: SearchController, parent=None):
        super().__init__(TITLE, parent)
        self.setObjectName("SketchSearchDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.controller = controller
        self.map_tool = SketchMapTool(self.canvas)
        self.sketch_image: Optional[bytes] = None
        self.sketch_source = "map"
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.addWidget(self._build_worker_box())
        layout.addWidget(self._build_index_box())
        layout.addWidget(self._build_sketch_box())
        layout.addWidget(self._build_search_box())
        layout.addWidget(self._build_results_box())
        layout.addStretch(1)
        self.setWidget(body)
        self.map_tool.strokes_changed.connect(lambda n: self._sketch_changed("map", n))
        self.pad.strokes_changed.connect(lambda n: self._sketch_changed("pad", n))
        controller.status_changed.connect(self._show_status)
        controller.notice.connect(self.notify)
        controller.indexes_listed.connect(self._show_indexes)
        controller.job_changed.connect(self._show_job)
        controller.search_running.connect(lambda running: self.search_button.setEnabled(not running))
        controller.results_ready.connect(self._show_results)
        self._show_status(*Status.DISCONNECTED)

    # -- UI ---------------------------------------------------------------------------------------
    def _build_worker_box(self) -> QGroupBox:
        box = QGroupBox("Worker")
        form = QFormLayout(box)
        self.endpoint_edit = QLineEdit(Setting.ENDPOINT.get())
        self.connect_button = QPushButton("Connect")
        self.start_button = QPushButton("Start local worker")
        row = QHBoxLayout()
        row.addWidget(self.connect_button)
        row.addWidget(self.start_button)
        self.status_light = QLabel("●")
        self.status_label = QLabel()
        status = QHBoxLayout()
        status.addWidget(self.status_light)
        status.addWidget(self.status_label, 1)
        self.server_key_edit = QLineEdit(Setting.SERVER_KEY.get())
        self.server_key_edit.setPlaceholderText("server.key (public), for a remote worker")
        self.client_key_edit = QLineEdit(Setting.CLIENT_KEY.get())
        self.client_key_edit.setPlaceholderText("client.key_secret, authorised on the worker")
        form.addRow("Endpoint", self.endpoint_edit)
        form.addRow("Server key", self.server_key_edit)
        form.addRow("Client key", self.client_key_edit)
        form.addRow(row)
        form.addRow("Status", status)
        self.connect_button.clicked.connect(lambda: self.connect_worker())
        self.start_button.clicked.connect(lambda: self.controller.start_local_worker(self.endpoint_edit.text().strip()))
        return box

    def _build_index_box(self) -> QGroupBox:
        box = QGroupBox("Index")
        form = QFormLayout(box)
        self.index_combo = QComboBox()
        self.refresh_button = QPushButton("↻")
        self.refresh_button.setMaximumWidth(32)
        row = QHBoxLayout()
        row.addWidget(self.index_combo, 1)
        row.addWidget(self.refresh_button)
        form.addRow("Search in", row)
        self.raster_list = QListWidget()
        self.raster_list.setMaximumHeight(80)
        form.addRow("Rasters", self.raster_list)
        self.new_index_edit = QLineEdit("my-index")
        self.build_button = QPushButton("Build / extend")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row = QHBoxLayout()
        row.addWidget(self.new_index_edit, 1)
        row.addWidget(self.build_button)
        row.addWidget(self.cancel_button)
        form.addRow("Index name", row)
        self.progress = QProgressBar()
        self.progress.setRange(0, PROGRESS_STEPS)
        self.progress.setValue(0)
        form.addRow(self.progress)
        self.refresh_button.clicked.connect(self.controller.refresh_indexes)
        self.build_button.clicked.connect(self.build_index)
        self.cancel_button.clicked.connect(self.controller.cancel_job)
        QgsProject.instance().layersAdded.connect(self._layers_changed)
        QgsProject.instance().layersRemoved.connect(self._layers_changed)
        self.refresh_raster_layers()
        return box

    def _build_sketch_box(self) -> QGroupBox:
        box = QGroupBox("Sketch")
        layout = QVBoxLayout(box)
        row = QHBoxLayout()
        self.draw_button = QPushButton("Draw on map")
        self.draw_button.setCheckable(True)
        self.undo_button = QPushButton("Undo")
        self.clear_button = QPushButton("Clear")
        self.pen_spin = QSpinBox()
        self.pen_spin.setRange(1, 12)
        self.pen_spin.setValue(3)
        self.pen_spin.setToolTip("pen width")
        for w in (self.draw_button, self.undo_button, self.clear_button, self.pen_spin):
            row.addWidget(w)
        layout.addLayout(row)
        self.pad = SketchPad()
        layout.addWidget(self.pad)
        row = QHBoxLayout()
        self.load_button = QPushButton("Load sketch image…")
        self.sketch_label = QLabel("draw on the map or the pad")
        row.addWidget(self.load_button)
        row.addWidget(self.sketch_label, 1)
        layout.addLayout(row)
        self.draw_button.toggled.connect(self._toggle_map_tool)
        self.undo_button.clicked.connect(self.undo)
        self.clear_button.clicked.connect(self.clear_sketch)
        self.pen_spin.valueChanged.connect(self._set_pen_width)
        self.load_button.clicked.connect(self._choose_image)
        return box

    def _build_search_box(self) -> QGroupBox:
        box = QGroupBox("Search")
        form = QFormLayout(box)
        self.area_combo = QComboBox()
        self.area_combo.insertItem(WHOLE_INDEX, "Whole index")
        self.area_combo.insertItem(MAP_VIEW, "Current map view")
        self.top_spin = QSpinBox()
        self.top_spin.setRange(1, MAX_TOP)
        self.top_spin.setValue(DEFAULT_TOP)
        self.search_button = QPushButton("Search")
        form.addRow("Area", self.area_combo)
        form.addRow("Hits", self.top_spin)
        form.addRow(self.search_button)
        self.search_button.clicked.connect(self.search)
        return box

    def _build_results_box(self) -> QGroupBox:
        box = QGroupBox("Results")
        layout = QVBoxLayout(box)
        self.results_list = QListWidget()
        self.results_list.setIconSize(QSize(64, 64))
        self.results_list.itemClicked.connect(self._zoom_to_item)
        self.save_button = QPushButton("Save results…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._choose_save_path)
        layout.addWidget(self.results_list)
        layout.addWidget(self.save_button)
        return box

    # -- what the controller says -----------------------------------------------------------------
    def notify(self, text: str, level=Qgis.Info, details: str = "") -> None:
        self.iface.messageBar().pushMessage(TITLE, text, level, 8)
        QgsMessageLog.logMessage(details or text, TITLE, level)

    def _show_status(self, text: str, colour: str) -> None:
        self.status_light.setStyleSheet(f"color: {colour}; font-size: 16px")
        self.status_label.setText(text)

    def _show_indexes(self, indexes: list) -> None:
        current = self.index_combo.currentText()
        self.index_combo.clear()
        for item in indexes:
            self.index_combo.addItem(item["name"], item)
            if not item["compatible"]:
                self.index_combo.setItemData(self.index_combo.count() - 1, item.get("reason") or "built with another model",
                                             Qt.ToolTipRole)
        if current:
            self.index_combo.setCurrentText(current)

    def _show_job(self, job: dict) -> None:
        self.progress.setValue(int(PROGRESS_STEPS * job["progress"]))
        eta = f", {job['eta_s']:.0f} s left" if job.get("eta_s") else ""
        self.progress.setFormat(f"{job['state']} {job['tiles_done']}/{job['tiles_total']} tiles{eta}")
        self.cancel_button.setEnabled(job["state"] not in states.FINISHED)

    def _show_results(self, layer) -> None:
        self.save_button.setEnabled(True)
        self.results_list.clear()
        rasters = [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.type() == QgsMapLayerType.RasterLayer]
        for feature in sorted(layer.getFeatures(), key=lambda f: f["rank"]):
            extent = feature.geometry().boundingBox()
            item = QListWidgetItem(f"#{feature['rank']}  score {feature['score']:.3f}  scale {feature['scale']}")
            item.setData(Qt.UserRole, extent)
            item.setIcon(QIcon(self._thumbnail(extent, layer.crs(), rasters)))
            self.results_list.addItem(item)

    @staticmethod
    def _thumbnail(extent: QgsRectangle, crs, rasters, size: int = 64) -> QPixmap:
        settings = QgsMapSettings()
        settings.setLayers(rasters)
        settings.setDestinationCrs(crs)
        settings.setExtent(extent)
        settings.setOutputSize(QSize(size, size))
        job = QgsMapRendererParallelJob(settings)
        job.start()
        job.waitForFinished()
        return QPixmap.fromImage(job.renderedImage())

    def _zoom_to_item(self, item: QListWidgetItem) -> None:
        extent = QgsRectangle(item.data(Qt.UserRole))
        layer = self.controller.result_layer
        if layer is not None:
            transform = QgsCoordinateTransform(layer.crs(), self.canvas.mapSettings().destinationCrs(),
                                               QgsProject.instance())
            extent = transform.transformBoundingBox(extent)
        extent.scale(1.3)
        self.canvas.setExtent(extent)
        self.canvas.refresh()

    # -- what the user does -----------------------------------------------------------------------
    def connect_worker(self, endpoint: Optional[str] = None) -> None:
        """Connect to `endpoint` (default: the one typed) with the key files typed."""
        if endpoint is not None:
            self.endpoint_edit.setText(endpoint)
        self.controller.connect_worker(Connection(self.endpoint_edit.text().strip(),
                                                  self.server_key_edit.text().strip(),
                                                  self.client_key_edit.text().strip()))

    def _layers_changed(self, *_: object) -> None:
        self.refresh_raster_layers()

    def refresh_raster_layers(self) -> None:
        self.raster_list.clear()
        for layer in QgsProject.instance().mapLayers().values():
            if layer.type() == QgsMapLayerType.RasterLayer and layer.providerType() == "gdal":
                item = QListWidgetItem(layer.name())
                item.setData(Qt.UserRole, layer.source())
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked)
                self.raster_list.addItem(item)

    def checked_rasters(self) -> list:
        items = [self.raster_list.item(i) for i in range(self.raster_list.count())]
        return [i.data(Qt.UserRole).split("|")[0] for i in items if i.checkState() == Qt.Checked]

    def build_index(self) -> None:
        self.controller.build_index(self.new_index_edit.text().strip(), self.checked_rasters())

    def _toggle_map_tool(self, on: bool) -> None:
        if on:
            self.canvas.setMapTool(self.map_tool)
        else:
            self.canvas.unsetMapTool(self.map_tool)

    def _set_pen_width(self, width: int) -> None:
        self.map_tool.set_pen_width(width)
        self.pad.pen_width = width
        self.pad.update()

    def _sketch_changed(self, source: str, strokes: int) -> None:
        self.sketch_source = source
        self.sketch_label.setText(f"{strokes} stroke(s) on the {source}")

    def undo(self) -> None:
        (self.map_tool if self.sketch_source == "map" else self.pad).undo()

    def clear_sketch(self) -> None:
        self.map_tool.clear()
        self.pad.clear()
        self.sketch_image = None

    def _choose_image(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load sketch image", "", "Images (*.png *.jpg *.jpeg)")
        if path:
            self.load_sketch_image(path)

    def load_sketch_image(self, path: str) -> None:
        with open(path, "rb") as f:
            self.sketch_image = f.read()
        self.sketch_source = "image"
        self.sketch_label.setText(path.rsplit("/", 1)[-1])

    def search_query(self) -> Optional[SearchQuery]:
        """The search the dock is set up for, or None (and a message) when it is not ready."""
        index = self.index_combo.currentText()
        if not index:
            self.notify("Choose an index to search (build one first).", Qgis.Warning)
            return None
        canvas_crs = self.canvas.mapSettings().destinationCrs()
        canvas_crs_id = canvas_crs.authid() or canvas_crs.toWkt()
        sketch: dict = {}
        if self.sketch_source == "image" and self.sketch_image:
            sketch = {"sketch_png": self.sketch_image}
        elif self.sketch_source == "pad" and self.pad.strokes():
            sketch = {"strokes": self.pad.strokes(), "strokes_crs": "pixel",
                      "strokes_frame": [0, 0, self.pad.width(), self.pad.height()]}
        elif self.map_tool.strokes():
            sketch = {"strokes": self.map_tool.strokes(), "strokes_crs": canvas_crs_id}
        else:
            self.notify("Draw a sketch first (on the map, on the pad, or load an image).", Qgis.Warning)
            return None
        area: dict = {}
        if self.area_combo.currentIndex() == MAP_VIEW:
            e = self.canvas.extent()
            area = {"bbox": [e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()], "bbox_crs": canvas_crs_id}
        return SearchQuery(index=index, top=self.top_spin.value(),
                           crs=QgsProject.instance().crs().authid() or "EPSG:4326", **sketch, **area)

    def search(self) -> None:
        query = self.search_query()
        if query is not None:
            self.controller.search(query)

    def _choose_save_path(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save results", "", "GeoPackage (*.gpkg)")
        if path:
            self.controller.save_results(path)

    def shutdown(self) -> None:
        """Put the map tool away and stop listening to the project (on unload)."""
        self.canvas.unsetMapTool(self.map_tool)
        self.map_tool.clear()
        QgsProject.instance().layersAdded.disconnect(self._layers_changed)
        QgsProject.instance().layersRemoved.disconnect(self._layers_changed)
