"""The dock's Index box: the worker's indexes (tiles, rasters, whether this worker's model can
search them, their jobs), their tiles layer, deleting one or taking rasters out of it, and
building or extending one with its tile settings (the worker's defaults shown)."""

from __future__ import annotations

from typing import Optional

from qgis.core import Qgis, QgsMapLayerType, QgsProject
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (QAbstractItemView, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout,
                                 QHeaderView, QLabel, QLineEdit, QListWidget, QListWidgetItem, QMessageBox,
                                 QProgressBar, QPushButton, QSpinBox, QTableWidget, QTableWidgetItem, QVBoxLayout,
                                 QWidget)

from .widgets import add_button
from .controller import SearchController, without_tiles_said
from .raster_layers import raster_file
from .raster_removal import RasterRemovalDialog
from .user_requests import IndexBuild, Tiling
from .wire import job_states as states
from .wire.protocol import MAX_TILE, MIN_TILE

PROGRESS_STEPS = 1000
COLUMNS = ("Index", "Tiles", "Rasters", "Searchable", "Job")
FALLBACK_TILING = Tiling(tile=224, overlap=0.25, scales=(1, 2, 4))  # until a worker says its defaults
LAYER_ID = Qt.UserRole + 1  # a raster list item's layer (its path is Qt.UserRole)


def _numbers(text: str) -> Optional[tuple]:
    """'1, 2,4' -> (1, 2, 4); '' -> None; ValueError for anything else."""
    text = text.strip()
    return tuple(int(part) for part in text.split(",")) if text else None


class TilingForm(QWidget):
    """Tile size, overlap, scales and bands of an index to build."""

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.defaults = FALLBACK_TILING
        self.min_valid = FALLBACK_TILING.min_valid  # not shown: kept from the defaults or the index extended
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(MIN_TILE, MAX_TILE)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("Tile size in raster pixels at scale 1: about the size of a place you would sketch.")
        self.overlap_spin = QDoubleSpinBox()
        self.overlap_spin.setRange(0.0, 0.85)
        self.overlap_spin.setDecimals(3)
        self.overlap_spin.setSingleStep(0.05)
        self.overlap_spin.setToolTip("How much neighbouring tiles overlap (0 to 0.85 of a tile).")
        self.scales_edit = QLineEdit()
        self.scales_edit.setToolTip("Window sizes in tiles, comma-separated (1,2,4: tiles cover 1, 2 and 4 tile "
                                    "sizes of the raster, drawn at the same size).")
        self.bands_edit = QLineEdit()
        self.bands_edit.setPlaceholderText("natural colour")
        self.bands_edit.setToolTip("The raster bands to draw as red, green, blue (e.g. 3,2,1); empty: from the "
                                   "rasters' colour interpretation.")
        self.defaults_button = QPushButton("Defaults")
        self.defaults_button.setToolTip("Back to the worker's default tile settings.")
        row = QHBoxLayout()
        row.addWidget(self.tile_spin)
        row.addWidget(QLabel("overlap"))
        row.addWidget(self.overlap_spin)
        form.addRow("Tile", row)
        row = QHBoxLayout()
        row.addWidget(self.scales_edit)
        row.addWidget(QLabel("bands"))
        row.addWidget(self.bands_edit)
        form.addRow("Scales", row)
        form.addRow(self.defaults_button)
        self.defaults_button.clicked.connect(lambda: self.show_tiling(self.defaults))
        self.show_tiling(self.defaults)

    def set_defaults(self, tiling: Tiling) -> None:
        """The worker's defaults: shown now, and again by the Defaults button."""
        self.defaults = tiling
        self.show_tiling(tiling)

    def show_tiling(self, tiling: Tiling) -> None:
        self.tile_spin.setValue(tiling.tile)
        self.overlap_spin.setValue(tiling.overlap)
        self.scales_edit.setText(",".join(str(s) for s in tiling.scales))
        self.bands_edit.setText(",".join(str(b) for b in tiling.bands) if tiling.bands else "")
        self.min_valid = tiling.min_valid

    def tiling(self) -> Tiling:
        """The settings shown; ValueError says which field to correct."""
        try:
            scales = _numbers(self.scales_edit.text())
        except ValueError:
            raise ValueError(f"Scales “{self.scales_edit.text()}”: give whole numbers separated by commas, "
                             "e.g. 1,2,4") from None
        try:
            bands = _numbers(self.bands_edit.text())
        except ValueError:
            raise ValueError(f"Bands “{self.bands_edit.text()}”: give band numbers separated by commas, e.g. "
                             "3,2,1, or leave it empty") from None
        if not scales:
            raise ValueError("Scales: give at least one, e.g. 1")
        return Tiling(self.tile_spin.value(), round(self.overlap_spin.value(), 3), scales, bands, self.min_valid)


def how_left(item: dict) -> str:
    """How an index whose job was lost with its worker was left, from its list_indexes item."""
    name, last = item["name"], item.get("last_job") or {}
    if item.get("missing"):
        return f"{name} is no longer listed by the worker"
    if item.get("error"):
        return f"{name} cannot be read: {item['error']['message']}"
    if last.get("state") == states.FAILED and last.get("error"):
        return f"{name}: indexing could not go on: {last['error']['message']}"
    if item.get("reason") and not item.get("job"):  # a job's own reason (nothing to search yet) is over
        return f"{name}: {item['reason']}"
    if item.get("complete"):  # and what of it a search cannot find, as the dock says of a job it followed
        empty = without_tiles_said(last.get("without_tiles"))
        return f"{name} is complete: {item['tile_count']} tiles" + (f"; {empty}" if empty else "")
    return (f"{name} is incomplete ({item.get('tile_count') or 0} tiles) and no longer being built: "
            "Build / extend it to finish it")


class IndexPanel(QGroupBox):
    def __init__(self, controller: SearchController, parent: Optional[QWidget] = None):
        super().__init__("Index", parent)
        self.controller = controller
        self.jobs: dict = {}  # index name -> its latest job event
        layout = QVBoxLayout(self)
        layout.addWidget(self._build_table())
        row = QHBoxLayout()
        self.refresh_button = add_button("Refresh", "List the worker's indexes again.", row)
        self.tiles_button = add_button("Show tiles", "Add the selected index's tiles (tiles.gpkg) to the "
                                                       "project as a layer.", row)
        self.delete_button = add_button("Delete…", "Delete the selected index from the worker's disk (asks "
                                                     "first; the rasters stay).", row)
        self.remove_button = add_button("Remove rasters…", "Take rasters out of the selected index (asks which; "
                                                           "the raster files stay).", row)
        layout.addLayout(row)
        layout.addWidget(self._build_build_box())
        self.refresh_button.clicked.connect(controller.refresh_indexes)
        self.tiles_button.clicked.connect(lambda: controller.show_tiles(self.selected_name()))
        self.delete_button.clicked.connect(self.confirm_delete)
        self.remove_button.clicked.connect(self.choose_rasters_to_remove)
        self.table.itemSelectionChanged.connect(self._selected)
        controller.indexes_listed.connect(self.show_indexes)
        controller.index_job_changed.connect(self._show_any_job)
        controller.job_changed.connect(self._show_job)
        controller.job_lost.connect(self._show_job_lost)
        controller.lost_job_ended.connect(self._show_lost_job_ended)
        controller.worker_info.connect(self._show_defaults)
        QgsProject.instance().layersAdded.connect(self._layers_changed)
        QgsProject.instance().layersRemoved.connect(self._layers_changed)
        self.refresh_raster_layers()
        self._selected()

    def _build_table(self) -> QTableWidget:
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        for column in range(1, len(COLUMNS)):
            self.table.horizontalHeader().setSectionResizeMode(column, QHeaderView.ResizeToContents)
        self.table.setMaximumHeight(130)
        self.table.setToolTip("The worker's indexes. Select one to extend it, show its tiles, take rasters out of "
                              "it or delete it; "
                              "hover a cell for details.")
        return self.table

    def _build_build_box(self) -> QGroupBox:
        box = QGroupBox("Build or extend")
        form = QFormLayout(box)
        self.raster_list = QListWidget()
        self.raster_list.setMaximumHeight(70)
        self.raster_list.setToolTip("Raster layers of the project (files); the ticked ones are indexed. Adding "
                                    "rasters to an existing index computes only their tiles.")
        form.addRow("Rasters", self.raster_list)
        self.name_edit = QLineEdit("my-index")
        self.name_edit.setToolTip("The index's name (a folder in the worker's index folder). An existing name "
                                  "extends that index, with the tile settings it was built with.")
        form.addRow("Name", self.name_edit)
        self.tiling_form = TilingForm()
        form.addRow(self.tiling_form)
        row = QHBoxLayout()
        self.build_button = add_button("Build / extend", "Index the ticked rasters in the worker (in the "
                                                           "background; resumable).", row)
        self.cancel_button = add_button("Cancel", "Stop indexing after the batch in progress; what was "
                                                    "committed stays, and Build / extend resumes it.", row)
        self.cancel_button.setEnabled(False)
        form.addRow(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, PROGRESS_STEPS)
        self.progress.setValue(0)
        self.progress.setToolTip("The indexing job started here: tiles done of all, and the time left.")
        form.addRow(self.progress)
        self.build_button.clicked.connect(self.build_index)
        self.cancel_button.clicked.connect(self.controller.cancel_job)
        return box

    # -- what the controller says ----------------------------------------------------------------
    def _show_defaults(self, info: dict) -> None:
        if info.get("tiling_defaults"):
            self.tiling_form.set_defaults(Tiling.from_json(info["tiling_defaults"]))

    def show_indexes(self, indexes: list) -> None:
        selected = self.selected_name()
        self.table.blockSignals(True)  # a refresh keeps the selection without refilling the build form
        self.table.clearSelection()
        self.table.setRowCount(len(indexes))
        for row, item in enumerate(indexes):
            rasters = item.get("rasters") or []
            reason = item.get("reason") or ""
            cells = (item["name"], "" if item.get("tile_count") is None else str(item["tile_count"]), str(len(rasters)),
                     "yes" if item.get("compatible") else "no", self._job_text(item))
            tips = (item.get("path") or item["name"], "tiles indexed", "\n".join(rasters) or "none yet",
                    reason or "this worker's model can search it", "the indexing job building it, if any")
            for column, (text, tip) in enumerate(zip(cells, tips)):
                cell = QTableWidgetItem(text)
                cell.setToolTip(tip)
                self.table.setItem(row, column, cell)
            if item["name"] == selected:
                self.table.selectRow(row)
        self.table.blockSignals(False)
        self._enable_selection_buttons()

    def _job_text(self, item: dict) -> str:
        job = self.jobs.get(item["name"])
        listed = item.get("last_job") or {}
        if item.get("job") and listed.get("id") == item["job"] and (
                job is None or job.get("started", 0) < listed.get("started", 0)):
            job = listed  # a job no event has told of yet, as the worker lists it: it showed a queued one as running
        if job is not None and job["state"] in states.ACTIVE:
            return f"{job['state']}: removing rasters" if job.get("kind") == "remove" else \
                f"{job['state']} {job['progress']:.0%}"
        if item.get("job"):
            return states.RUNNING
        if item.get("complete") is False:
            return "incomplete: extend it"
        return "—"

    def _show_any_job(self, job: dict) -> None:
        self.jobs[job["index"]] = job
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).text() == job["index"]:
                item = self.controller.index_named(job["index"]) or {"name": job["index"]}
                self.table.item(row, 4).setText(self._job_text(item))

    def _show_job(self, job: dict) -> None:
        self.progress.setToolTip("")  # a lost job's end, said whole there, is over
        self.progress.setValue(int(PROGRESS_STEPS * job["progress"]))
        eta = f", {job['eta_s']:.0f} s left" if job.get("eta_s") else ""
        if job.get("kind") == "remove":
            self.progress.setFormat(f"removing rasters from {job['index']}: {job['state']}")
        else:
            self.progress.setFormat(f"{job['state']} {job['tiles_done']}/{job['tiles_total']} tiles{eta}")
        removal_running = job.get("kind") == "remove" and job["state"] != states.QUEUED  # one commit: not stopped
        self.cancel_button.setEnabled(job["state"] not in states.FINISHED and not removal_running)

    def _show_job_lost(self, job: dict) -> None:
        done = "removing rasters" if job.get("kind") == "remove" else f"{job['tiles_done']}/{job['tiles_total']} tiles"
        self.progress.setFormat(f"{done}, then disconnected from the worker")
        self.cancel_button.setEnabled(False)

    def _show_lost_job_ended(self, item: dict) -> None:
        """The job lost with its connection no longer runs on the worker listing its index again:
        it finished meanwhile, it could not be taken up again, or the index is gone."""
        if item.get("complete"):
            self.progress.setValue(PROGRESS_STEPS)
        said = how_left(item)
        self.progress.setFormat(said)
        self.progress.setToolTip(said)  # the bar cuts a long one (an error's message, rasters named)
        self.controller.notice.emit(f"Index {said}.", Qgis.Info, "")

    # -- what the user does ----------------------------------------------------------------------
    def selected_name(self) -> str:
        rows = self.table.selectionModel().selectedRows()
        return self.table.item(rows[0].row(), 0).text() if rows else ""

    def _enable_selection_buttons(self) -> None:
        name = self.selected_name()
        self.tiles_button.setEnabled(bool(name))
        self.delete_button.setEnabled(bool(name))
        self.remove_button.setEnabled(bool((self.controller.index_named(name) or {}).get("rasters")))

    def _selected(self) -> None:
        """A selected index is what Build / extend extends: its name, and the tile settings it has."""
        self._enable_selection_buttons()
        name = self.selected_name()
        item = self.controller.index_named(name) if name else None
        if item is None:
            return
        self.name_edit.setText(name)
        if item.get("tiling"):
            self.tiling_form.show_tiling(Tiling.from_json(item["tiling"]))

    def confirm_delete(self) -> None:
        name = self.selected_name()
        item = self.controller.index_named(name)
        if item is None:
            return
        tiles = "" if item.get("tile_count") is None else f" ({item['tile_count']} tiles)"
        box = QMessageBox(QMessageBox.Warning, "Delete index",
                          f"Delete the index “{name}”{tiles}? Its folder {item.get('path', '')} is removed from the "
                          "worker's disk; the rasters stay. This cannot be undone.",
                          QMessageBox.Yes | QMessageBox.Cancel, self)
        box.setDefaultButton(QMessageBox.Cancel)
        if box.exec_() == QMessageBox.Yes:
            self.controller.delete_index(name)

    def choose_rasters_to_remove(self) -> None:
        item = self.controller.index_named(self.selected_name())
        if item is None:
            return
        dialog = RasterRemovalDialog(item, self)
        if dialog.exec_() == dialog.Accepted and dialog.ticked():
            self.controller.remove_rasters(item["name"], dialog.ticked())

    def _layers_changed(self, *_: object) -> None:
        self.refresh_raster_layers()

    def refresh_raster_layers(self) -> list:
        """The project's raster layers, those the worker can index ticked; the others (a
        GeoPackage's raster, a web or in-memory layer, a file gone) greyed with why: the worker
        reads files, and refused a whole build that held one. A layer the user unticked stays
        unticked: the list is rebuilt whenever a layer is added (a search's results too), and
        ticking every raster again made the next build index one the user had left out.
        Returns the layers ticked before that are greyed now, with why."""
        items = [self.raster_list.item(i) for i in range(self.raster_list.count())]
        ticked = {i.data(LAYER_ID): i.checkState() == Qt.Checked for i in items if i.flags() & Qt.ItemIsUserCheckable}
        self.raster_list.clear()
        lost = []
        for layer in QgsProject.instance().mapLayers().values():
            if layer.type() != QgsMapLayerType.RasterLayer:
                continue
            path, why_not = raster_file(layer)
            item = QListWidgetItem(layer.name())
            item.setData(Qt.UserRole, path)
            item.setData(LAYER_ID, layer.id())
            if path is not None:
                item.setToolTip(path)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked if ticked.get(layer.id(), True) else Qt.Unchecked)
            else:
                item.setToolTip(f"{layer.source()}\n{why_not[0].upper()}{why_not[1:]}.")
                item.setFlags(item.flags() & ~Qt.ItemIsEnabled)
                if ticked.get(layer.id()):
                    lost.append(f"{layer.name()}: {why_not}")
            self.raster_list.addItem(item)
        return lost

    def checked_rasters(self) -> list:
        items = [self.raster_list.item(i) for i in range(self.raster_list.count())]
        return [i.data(Qt.UserRole) for i in items if i.flags() & Qt.ItemIsUserCheckable and i.checkState() == Qt.Checked]

    def build_index(self) -> None:
        try:
            tiling = self.tiling_form.tiling()
        except ValueError as exc:
            return self.controller.notice.emit(str(exc), Qgis.Warning, "")
        lost = self.refresh_raster_layers()  # a file deleted since the list was made stayed ticked
        if lost:
            return self.controller.notice.emit(f"{len(lost)} ticked raster layer(s) cannot be indexed now, and are "
                                               "greyed: nothing was built (see the log)", Qgis.Warning, "\n".join(lost))
        self.controller.build_index(IndexBuild(self.name_edit.text().strip(), tuple(self.checked_rasters()), tiling))

    def shutdown(self) -> None:
        """Stop listening to the project (on unload)."""
        QgsProject.instance().layersAdded.disconnect(self._layers_changed)
        QgsProject.instance().layersRemoved.disconnect(self._layers_changed)
