"""The "Sketch search" dock: worker connection, index, sketch, search area, results."""

from __future__ import annotations

import time

from qgis.core import (Qgis, QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsMapLayerType,
                       QgsMapRendererParallelJob, QgsMapSettings, QgsMessageLog, QgsProject, QgsRectangle)
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QColor, QIcon, QPixmap
from qgis.PyQt.QtWidgets import (QComboBox, QDockWidget, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                                 QLineEdit, QListWidget, QListWidgetItem, QProgressBar, QPushButton, QSpinBox,
                                 QVBoxLayout, QWidget)

from .local_worker import LocalWorker
from .results import hits_layer, save_gpkg
from .sketch_pad import SketchPad
from .sketch_tool import SketchMapTool
from .wire import job_states as states
from .wire.errors import WorkerError
from .wire.sockets import CurveKeys
from .worker_link import WorkerLink

TITLE = "Sketch search"


def log(message: str, level=Qgis.Info) -> None:
    QgsMessageLog.logMessage(message, TITLE, level)


class SketchSearchDock(QDockWidget):
    def __init__(self, iface, parent=None):
        super().__init__(TITLE, parent)
        self.setObjectName("SketchSearchDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.link: WorkerLink | None = None
        self.local_worker: LocalWorker | None = None
        self.map_tool = SketchMapTool(self.canvas)
        self.sketch_image: bytes | None = None
        self.sketch_source = "map"
        self.job_id: str | None = None
        self.result_layer = None
        self.search_count = 0
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
        self._set_status("disconnected", QColor("grey"))

    # -- UI ---------------------------------------------------------------------------------------
    def _build_worker_box(self) -> QGroupBox:
        box = QGroupBox("Worker")
        form = QFormLayout(box)
        self.endpoint_edit = QLineEdit("tcp://127.0.0.1:5555")
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
        self.server_key_edit = QLineEdit()
        self.server_key_edit.setPlaceholderText("server.key (public), for a remote worker")
        self.client_key_edit = QLineEdit()
        self.client_key_edit.setPlaceholderText("client.key_secret, authorised on the worker")
        form.addRow("Endpoint", self.endpoint_edit)
        form.addRow("Server key", self.server_key_edit)
        form.addRow("Client key", self.client_key_edit)
        form.addRow(row)
        form.addRow("Status", status)
        self.connect_button.clicked.connect(lambda: self.connect_worker(self.endpoint_edit.text().strip()))
        self.start_button.clicked.connect(self.start_local_worker)
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
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        form.addRow(self.progress)
        self.refresh_button.clicked.connect(self.refresh_indexes)
        self.build_button.clicked.connect(self.build_index)
        self.cancel_button.clicked.connect(self.cancel_job)
        QgsProject.instance().layersAdded.connect(lambda _: self.refresh_raster_layers())
        QgsProject.instance().layersRemoved.connect(lambda _: self.refresh_raster_layers())
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
        self.area_combo.addItems(["Whole index", "Current map view"])
        self.top_spin = QSpinBox()
        self.top_spin.setRange(1, 200)
        self.top_spin.setValue(10)
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

    # -- messages ---------------------------------------------------------------------------------
    def notify(self, text: str, level=Qgis.Info, details: str | None = None) -> None:
        self.iface.messageBar().pushMessage(TITLE, text, level, 8)
        log(details or text, level)

    def _set_status(self, text: str, colour: QColor) -> None:
        self.status_light.setStyleSheet(f"color: {colour.name()}; font-size: 16px")
        self.status_label.setText(text)

    def _error(self, what: str, err: WorkerError) -> None:
        hint = {"unavailable": "Is the worker running? Start it or check the endpoint.",
                "index_mismatch": "Build a new index with this worker's model.",
                "bad_input": "Check the sketch or rasters.",
                "forbidden": "The worker does not serve that path."}.get(err.code, "See the log panel for details.")
        self.notify(f"{what} failed: {err.message} {hint}", Qgis.Critical if err.code == "internal" else Qgis.Warning,
                    details=f"{what} failed ({err.code}): {err.message}")
        if err.code == "unavailable":
            self._set_status("not answering", QColor("red"))

    # -- worker -----------------------------------------------------------------------------------
    def curve_keys(self) -> CurveKeys | None:
        """Keys for an encrypted connection when both key files are given (a remote worker)."""
        server, client = self.server_key_edit.text().strip(), self.client_key_edit.text().strip()
        if not server and not client:
            return None
        if not (server and client):
            raise ValueError("give both the server's public key and your client secret key, or neither")
        return CurveKeys.from_files(server, client)

    def connect_worker(self, endpoint: str, pub: str | None = None) -> None:
        try:
            curve = self.curve_keys()
        except (OSError, ValueError) as exc:
            return self.notify(f"CURVE keys not usable: {exc}", Qgis.Warning)
        if self.link is not None:
            self.link.close()
            self.link.deleteLater()
        self.endpoint_edit.setText(endpoint)
        self.link = WorkerLink(endpoint, pub_endpoint=pub, curve=curve, timeout_s=60.0, parent=self)
        self.link.job_event.connect(self._on_job)
        self.link.callback_failed.connect(
            lambda tb: self.notify("Sketch search hit an internal error; details are in the log panel.", Qgis.Critical, tb))
        self._set_status("connecting…", QColor("orange"))
        self.link.request("info", self._on_info, timeout_s=10.0)

    def _on_info(self, reply, err) -> None:
        if err:
            return self._error("Connecting to the worker", err)
        if self.link is not None and self.link._sub is None and reply.get("pub"):
            self.link.subscribe(reply["pub"])
        device = reply["device"] + (" (GPU)" if reply.get("cuda") else "")
        self._set_status(f"connected · {device} · model {reply['model']['model']}", QColor("green"))
        self.refresh_indexes()

    def start_local_worker(self) -> None:
        if self.local_worker is not None:
            self.local_worker.stop()
        self.local_worker = LocalWorker(self.endpoint_edit.text().strip(), self)
        self.local_worker.ready.connect(lambda endpoint, pub: self.connect_worker(endpoint, pub))
        self.local_worker.failed.connect(lambda message: self.notify(message, Qgis.Critical))
        self._set_status("starting local worker…", QColor("orange"))
        self.local_worker.start()

    def refresh_indexes(self) -> None:
        if self.link:
            self.link.request("list_indexes", self._on_indexes)

    def _on_indexes(self, reply, err) -> None:
        if err:
            return self._error("Listing indexes", err)
        current = self.index_combo.currentText()
        self.index_combo.clear()
        for item in reply["indexes"]:
            label = item["name"]
            self.index_combo.addItem(label, item)
            if not item["compatible"]:
                self.index_combo.setItemData(self.index_combo.count() - 1, "built with another model", Qt.ToolTipRole)
        if current:
            self.index_combo.setCurrentText(current)

    # -- indexing ---------------------------------------------------------------------------------
    def refresh_raster_layers(self) -> None:
        self.raster_list.clear()
        for layer in QgsProject.instance().mapLayers().values():
            if layer.type() == QgsMapLayerType.RasterLayer and layer.providerType() == "gdal":
                item = QListWidgetItem(layer.name())
                item.setData(Qt.UserRole, layer.source())
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked)
                self.raster_list.addItem(item)

    def checked_rasters(self) -> list[str]:
        items = [self.raster_list.item(i) for i in range(self.raster_list.count())]
        return [i.data(Qt.UserRole).split("|")[0] for i in items if i.checkState() == Qt.Checked]

    def build_index(self) -> None:
        rasters = self.checked_rasters()
        if not self.link:
            return self.notify("Connect to a worker first.", Qgis.Warning)
        if not rasters:
            return self.notify("Add raster layers to the project and tick the ones to index.", Qgis.Warning)
        self.link.request("index", self._on_job_started, index=self.new_index_edit.text().strip(), rasters=rasters)

    def _on_job_started(self, reply, err) -> None:
        if err:
            return self._error("Starting the index", err)
        self.job_id = reply["job"]["id"]
        self.cancel_button.setEnabled(True)
        self._on_job(reply["job"])

    def _on_job(self, job: dict) -> None:
        if job["id"] != self.job_id:
            return
        self.progress.setValue(int(1000 * job["progress"]))
        eta = f", {job['eta_s']:.0f} s left" if job.get("eta_s") else ""
        self.progress.setFormat(f"{job['state']} {job['tiles_done']}/{job['tiles_total']} tiles{eta}")
        if job["state"] in states.FINISHED:
            self.cancel_button.setEnabled(False)
            self.job_id = None
            if job["state"] == states.FAILED:
                self.notify(f"Indexing failed: {job['error']['message']}", Qgis.Critical)
            else:
                self.notify(f"Indexing {job['state']}: {job['tiles_done']} tiles.", Qgis.Success if job["state"] == states.DONE else Qgis.Info)
            self.refresh_indexes()

    def cancel_job(self) -> None:
        if self.link and self.job_id:
            self.link.request("cancel", lambda r, e: e and self._error("Cancelling", e), job=self.job_id)

    # -- sketching --------------------------------------------------------------------------------
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

    # -- search -----------------------------------------------------------------------------------
    def search_request(self) -> tuple[tuple[bytes, ...], dict] | None:
        """The sketch and options of the next search, or None (and a message) when not ready."""
        index = self.index_combo.currentText()
        if not index:
            self.notify("Choose an index to search (build one first).", Qgis.Warning)
            return None
        project_crs = QgsProject.instance().crs()
        fields = {"index": index, "top": self.top_spin.value(), "crs": project_crs.authid() or "EPSG:4326"}
        frames: tuple[bytes, ...] = ()
        canvas_crs = self.canvas.mapSettings().destinationCrs()
        if self.sketch_source == "image" and self.sketch_image:
            frames, fields["sketch_frame"] = (self.sketch_image,), 1
        elif self.sketch_source == "pad" and self.pad.strokes():
            fields.update(strokes=self.pad.strokes(), strokes_crs="pixel",
                          strokes_frame=[0, 0, self.pad.width(), self.pad.height()])
        elif self.map_tool.strokes():
            fields.update(strokes=self.map_tool.strokes(), strokes_crs=canvas_crs.authid() or canvas_crs.toWkt())
        else:
            self.notify("Draw a sketch first (on the map, on the pad, or load an image).", Qgis.Warning)
            return None
        if self.area_combo.currentIndex() == 1:
            e = self.canvas.extent()
            fields.update(bbox=[e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()],
                          bbox_crs=canvas_crs.authid() or canvas_crs.toWkt())
        return frames, fields

    def search(self) -> None:
        if not self.link:
            return self.notify("Connect to a worker first.", Qgis.Warning)
        request = self.search_request()
        if request is None:
            return
        frames, fields = request
        self.search_button.setEnabled(False)
        started = time.perf_counter()
        self.link.request("search", lambda r, e: self._on_hits(r, e, fields, started), frames=frames, **fields)

    def _on_hits(self, reply, err, fields: dict, started: float) -> None:
        self.search_button.setEnabled(True)
        if err:
            return self._error("Search", err)
        query_ms = (time.perf_counter() - started) * 1e3
        self.search_count += 1
        name = f"Sketch search {self.search_count}: {fields['index']}"
        hits_crs = QgsCoordinateReferenceSystem(fields["crs"])
        project_crs = QgsProject.instance().crs()
        layer = hits_layer(reply["hits"], name, hits_crs, project_crs if project_crs.isValid() else hits_crs, query_ms)
        QgsProject.instance().addMapLayer(layer)
        self.result_layer = layer
        self.save_button.setEnabled(True)
        self._fill_results(layer)
        n = layer.featureCount()
        self.notify(f"{n} hit(s) in {query_ms:.0f} ms, added as layer “{name}”.", Qgis.Success)

    def _fill_results(self, layer) -> None:
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
        if self.result_layer is not None:
            transform = QgsCoordinateTransform(self.result_layer.crs(), self.canvas.mapSettings().destinationCrs(),
                                               QgsProject.instance())
            extent = transform.transformBoundingBox(extent)
        extent.scale(1.3)
        self.canvas.setExtent(extent)
        self.canvas.refresh()

    def _choose_save_path(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save results", "", "GeoPackage (*.gpkg)")
        if path:
            self.save_results(path)

    def save_results(self, path: str) -> None:
        error = save_gpkg(self.result_layer, path)
        if error:
            self.notify(f"Saving failed: {error}", Qgis.Critical)
        else:
            self.notify(f"Results saved to {path}", Qgis.Success)

    def shutdown(self) -> None:
        """Close sockets and stop a local worker (on unload and when QGIS quits)."""
        self.canvas.unsetMapTool(self.map_tool)
        self.map_tool.clear()
        if self.link:
            self.link.close()
            self.link = None
        if self.local_worker:
            self.local_worker.stop()
            self.local_worker = None
