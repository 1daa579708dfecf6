"""The "Sketch search" dock: a view. It shows the controller's state and turns what the user
does (set up or connect a worker, manage indexes, draw, search) into the controller's calls; it
holds only the sketch being drawn, which lives in its widgets. The Worker and Index boxes are
views of their own (worker_panel, index_panel)."""

from __future__ import annotations

from typing import Optional

from qgis.core import Qgis, QgsCoordinateTransform, QgsMapLayerType, QgsMessageLog, QgsProject, QgsRectangle
from qgis.PyQt.QtCore import QEvent, QSize, Qt
from qgis.PyQt.QtWidgets import (QComboBox, QDockWidget, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                                 QListWidget, QListWidgetItem, QPushButton, QScrollArea, QSpinBox,
                                 QVBoxLayout, QWidget)

from .controller import SearchController
from .crs_names import crs_name
from .help_panel import HowToSketch
from .index_panel import IndexPanel
from .place_tool import PlaceMapTool, example_of, raster_under
from .results import BAD, GOOD, saved_query
from .user_requests import SearchQuery
from .settings import Setting
from .settings_dialog import SettingsDialog
from .sketch_pad import SketchPad
from .sketch_tool import MIN_SKETCH_PX, SketchMapTool
from . import thumbnails
from .wire.protocol import DEFAULT_TOP, MAX_TOP
from .worker_panel import WorkerPanel

TITLE = "Sketch search"
NO_SKETCH = "draw on the map or the pad"  # what the sketch's label says while there is none
WHOLE_INDEX, MAP_VIEW = 0, 1  # the search area choices
FEATURE_ID = Qt.UserRole + 1  # a results list item's feature id (Qt.UserRole holds its extent)
MARK_TEXT = {GOOD: "👍", BAD: "👎"}
MARK_KEYS = {Qt.Key_Plus: GOOD, Qt.Key_Equal: GOOD, Qt.Key_Minus: BAD, Qt.Key_0: None}


def _number(feature, name: str, pattern: str) -> str:
    """A hit attribute formatted, or "" when the worker did not send it (NULL)."""
    value = feature[name]
    return pattern.format(value) if isinstance(value, (int, float)) else ""


class SketchSearchDock(QDockWidget):
    def __init__(self, iface, controller: SearchController, parent=None):
        super().__init__(TITLE, parent)
        self.setObjectName("SketchSearchDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.controller = controller
        self.map_tool = SketchMapTool(self.canvas)
        self.place_tool = PlaceMapTool(self.canvas)
        self.place_tool.picked.connect(self.pick_place)
        self.example: Optional[dict] = None  # the place picked on the map: {raster, bbox, crs}
        self.shown_layer = None  # the results layer the list shows
        self._listed: dict[int, QListWidgetItem] = {}  # its items by feature id
        self.thumbnails = thumbnails.Thumbnails(self)
        self.sketch_image: Optional[bytes] = None
        self.sketch_source = "map"
        self.searching = False  # a search is waited for: the Search button cancels it
        self.settings_dialog = SettingsDialog(self)
        self.settings_dialog.saved.connect(self.reload_settings)
        self.worker_panel = WorkerPanel(controller, self.open_settings)
        self.index_panel = IndexPanel(controller)
        self.how_to = HowToSketch()
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.addWidget(self.worker_panel)
        layout.addWidget(self.index_panel)
        layout.addWidget(self._build_sketch_box())
        layout.addWidget(self.how_to)
        layout.addWidget(self._build_search_box())
        layout.addWidget(self._build_results_box())
        layout.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setWidget(body)
        # scroll down, never sideways: the dock is at least as wide as its widest row
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.scroll.setMinimumWidth(body.minimumSizeHint().width() + self.scroll.verticalScrollBar().sizeHint().width())
        self.setWidget(self.scroll)
        self._looked_for_worker = False
        self.map_tool.strokes_changed.connect(lambda n: self._sketch_changed("map", n))
        self.map_tool.strokes_hidden.connect(lambda: self.notify(
            "The sketch's strokes cannot be shown in this projection: they are kept, and shown again in one that "
            "holds them. A search still uses them; drawing here starts a new sketch.", Qgis.Info))
        self.pad.strokes_changed.connect(lambda n: self._sketch_changed("pad", n))
        controller.notice.connect(self.notify)
        controller.indexes_listed.connect(self._show_searchable_indexes)
        controller.search_running.connect(self._search_running)
        controller.results_ready.connect(self._show_results)
        QgsProject.instance().layerWillBeRemoved[str].connect(self._layer_removed)
        iface.currentLayerChanged.connect(self._layer_activated)

    def first_use(self) -> None:
        """When the dock is first opened, look for a worker (without waiting for it: what was found,
        or what is needed, shows in the Worker box)."""
        if not self._looked_for_worker and self.controller.link is None:
            self._looked_for_worker = True
            self.controller.find_worker()

    def open_settings(self, setting: Setting = Setting.WORKER_PYTHON) -> None:
        """The Settings dialog, at `setting` (not blocking QGIS)."""
        self.settings_dialog.show_setting(setting)

    def reload_settings(self) -> None:
        """After Settings were saved (the dialog, or the Options page)."""
        self.worker_panel.reload_settings()

    def _build_sketch_box(self) -> QGroupBox:
        box = QGroupBox("Sketch")
        layout = QVBoxLayout(box)
        row = QHBoxLayout()
        self.draw_button = QPushButton("Draw on map")
        self.draw_button.setCheckable(True)
        self.draw_button.setToolTip("While pressed, drag over the map to draw strokes; the strokes' extent is "
                                    "the sketch's frame.")
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("Remove the last stroke (of the map or the pad, whichever you drew on last).")
        self.clear_button = QPushButton("Clear")
        self.clear_button.setToolTip("Remove every stroke, on the map and the pad, and a loaded sketch image.")
        self.pen_spin = QSpinBox()
        self.pen_spin.setRange(1, 12)
        self.pen_spin.setValue(3)
        self.pen_spin.setToolTip("Pen width in screen pixels (how the strokes look; the search reads only where "
                                 "they run).")
        for w in (self.draw_button, self.undo_button, self.clear_button, self.pen_spin):
            row.addWidget(w)
        layout.addLayout(row)
        self.pad = SketchPad()
        self.pad.setToolTip("A sketch pad: draw the place here as it lies in this frame.")
        layout.addWidget(self.pad)
        row = QHBoxLayout()
        self.load_button = QPushButton("Load sketch image…")
        self.load_button.setToolTip("Search with a PNG or JPEG of dark strokes on white; the image is the frame.")
        self.place_button = QPushButton("Pick a place")
        self.place_button.setCheckable(True)
        self.place_button.setToolTip("While pressed, drag a rectangle over a raster layer: the next search finds "
                                     "places like that one (the worker reads and draws it; the place itself is "
                                     "left out of the hits).")
        row.addWidget(self.load_button)
        row.addWidget(self.place_button)
        layout.addLayout(row)
        self.sketch_label = QLabel(NO_SKETCH)
        self.sketch_label.setToolTip("What the next search will use.")
        layout.addWidget(self.sketch_label)
        self.place_button.toggled.connect(self._toggle_place_tool)
        self.draw_button.toggled.connect(self._toggle_map_tool)
        self.undo_button.clicked.connect(self.undo)
        self.clear_button.clicked.connect(self.clear_sketch)
        self.pen_spin.valueChanged.connect(self._set_pen_width)
        self.load_button.clicked.connect(self._choose_image)
        return box

    def _build_search_box(self) -> QGroupBox:
        box = QGroupBox("Search")
        form = QFormLayout(box)
        self.index_combo = QComboBox()
        self.index_combo.setToolTip("The index to search: those this worker's model can search (build one in the "
                                    "Index box first).")
        self.area_combo = QComboBox()
        self.area_combo.insertItem(WHOLE_INDEX, "Whole index")
        self.area_combo.insertItem(MAP_VIEW, "Current map view")
        self.area_combo.setToolTip("Search the whole index, or only the tiles in the map view.")
        self.top_spin = QSpinBox()
        self.top_spin.setRange(1, MAX_TOP)
        self.top_spin.setValue(DEFAULT_TOP)
        self.top_spin.setToolTip("How many hits to return, best first.")
        self.search_button = QPushButton("Search")
        self.search_button.setToolTip("Find the places that look like the sketch; the hits come back as a new layer.")
        form.addRow("Search in", self.index_combo)
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
        self.results_list.setToolTip("The hits of the newest search, or of the results layer selected in the Layers "
                                     "panel, best first: click one to zoom to it; + marks it good (👍), - bad (👎), 0 "
                                     "clears its mark.")
        layout.addWidget(self.results_list)
        buttons = [("good_button", "👍", "Mark the selected hit as a good answer (key +): Refine looks for more like it."),
                   ("bad_button", "👎", "Mark the selected hit as a wrong answer (key -): Refine leaves it out and "
                                       "looks for places unlike it."),
                   ("unmark_button", "Clear mark", "Remove the selected hit's mark (key 0)."),
                   ("more_button", "More like this", "Search for places like the selected hit (its square, read from "
                                                     "its raster, as the example)."),
                   ("refine_button", "Refine", "Search again with the marked hits (👍/👎): the results come as a new "
                                               "layer."),
                   ("again_button", "Run again", "Repeat the search of the selected results layer (or the last one), "
                                                 "e.g. after the index was built again; a layer loaded from a saved "
                                                 "GeoPackage keeps its search.")]
        rows = [QHBoxLayout(), QHBoxLayout()]
        for n, (name, text, tip) in enumerate(buttons):
            button = QPushButton(text)
            button.setToolTip(tip)
            setattr(self, name, button)
            rows[n // 3].addWidget(button)
        for row in rows:
            layout.addLayout(row)
        self.good_button.clicked.connect(lambda: self.mark_selected(GOOD))
        self.bad_button.clicked.connect(lambda: self.mark_selected(BAD))
        self.unmark_button.clicked.connect(lambda: self.mark_selected(None))
        self.more_button.clicked.connect(self.more_like_selected)
        self.refine_button.clicked.connect(lambda: self.controller.refine(self.shown_layer))
        self.again_button.clicked.connect(lambda: self.controller.run_again(self.layer_to_run_again()))
        self.results_list.installEventFilter(self)  # + / - / 0 mark the selected hit
        self.save_button = QPushButton("Save results…")
        self.save_button.setToolTip("Write the results layer listed, its marks and its search to a GeoPackage.")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._choose_save_path)
        layout.addWidget(self.save_button)
        return box

    # -- what the controller says -----------------------------------------------------------------
    def notify(self, text: str, level=Qgis.Info, details: str = "") -> None:
        self.iface.messageBar().pushMessage(TITLE, text, level, 8)
        QgsMessageLog.logMessage(details or text, TITLE, level)

    def _show_searchable_indexes(self, indexes: list) -> None:
        current = self.index_combo.currentText()
        self.index_combo.clear()
        for item in indexes:
            if item.get("compatible"):
                self.index_combo.addItem(item["name"], item)
        if current:
            kept = self.index_combo.findText(current)
            self.index_combo.setCurrentIndex(kept)  # -1 when it is gone: never another index in its place
            if kept < 0:
                self.notify(f"Index “{current}” is no longer offered by the worker: choose one to search.", Qgis.Warning)

    def _show_results(self, layer) -> None:
        """List a results layer's hits. Listed already, it is not listed again: QGIS makes a layer
        added the active one, so a new search's layer comes here twice (_layer_activated)."""
        self.save_button.setEnabled(True)
        if layer is self.shown_layer and self._listed:
            return
        self._watch_marks(layer)
        self.shown_layer = layer
        self._clear_results_list()
        rasters = [lyr for lyr in self.canvas.layers() if lyr.type() == QgsMapLayerType.RasterLayer]  # the visible ones
        for n, feature in enumerate(sorted(layer.getFeatures(), key=lambda f: f["rank"])):
            extent = feature.geometry().boundingBox()
            item = QListWidgetItem(self._item_text(feature))
            item.setData(Qt.UserRole, extent)
            item.setData(FEATURE_ID, feature.id())
            self.results_list.addItem(item)
            self._listed[feature.id()] = item
            if n < thumbnails.SHOWN and rasters:
                self.thumbnails.draw(item, extent, layer.crs(), rasters)
        self.scroll.ensureWidgetVisible(self.results_list)

    def _watch_marks(self, layer) -> None:
        """The list's marks follow the shown layer's `feedback` as the attribute table or a roll
        back of its edits changes it: after a roll back, the list showed marks the layer no
        longer held, and Refine sent what it held (probe)."""
        for signal, slot in (("attributeValueChanged", self._show_mark), ("afterRollBack", self._show_marks)):
            if self.shown_layer is not None:
                try:
                    getattr(self.shown_layer, signal).disconnect(slot)
                except (TypeError, RuntimeError):  # never connected, or the layer is deleted already
                    pass
            if layer is not None:
                getattr(layer, signal).connect(slot)

    def _show_mark(self, feature_id: int, field: int, _value=None) -> None:
        """A listed hit's text once its `feedback` changed (one item: the field calculator
        changes every feature, one signal each)."""
        if self.shown_layer is not None and field == self.shown_layer.fields().indexOf("feedback"):
            self._show_marks([feature_id])

    def _show_marks(self, feature_ids=None) -> None:
        """The listed hits' texts (those of `feature_ids`, else all) as their features are now."""
        if self.shown_layer is None:
            return
        for feature_id in self._listed if feature_ids is None else feature_ids:
            feature = self.shown_layer.getFeature(feature_id) if feature_id in self._listed else None
            if feature is not None and feature.isValid():
                self._listed[feature_id].setText(self._item_text(feature))

    def _clear_results_list(self) -> None:
        self.thumbnails.cancel()  # before the items they draw for are gone
        self.results_list.clear()
        self._listed.clear()

    def eventFilter(self, watched, event) -> bool:  # noqa: N802
        """Keys on the results list: + (or =) marks the selected hit good, - bad, 0 clears its mark."""
        if watched is self.results_list and event.type() == QEvent.KeyPress and event.key() in MARK_KEYS \
                and self.results_list.currentItem() is not None:
            self.mark_selected(MARK_KEYS[event.key()])
            return True
        return super().eventFilter(watched, event)

    def _layer_activated(self, *_) -> None:
        """The list shows the results layer made active in the Layers panel (an older search's,
        or one that came with a reopened project or from a GeoPackage), and marks, Refine, More
        like this and Save results act on it: only the newest search's could be, and a reopened
        project's marks could not be refined (probe)."""
        layer = self._active_results_layer()
        if layer is None or layer is self.shown_layer:
            return
        self.controller.result_layer = layer
        self._show_results(layer)

    def _layer_removed(self, layer_id: str) -> None:
        """Forget a results layer removed from the project (its hits are no longer listed)."""
        if self.shown_layer is not None and self.shown_layer.id() == layer_id:
            self._watch_marks(None)
            self.shown_layer = None
            self._clear_results_list()
        if self.controller.result_layer is not None and self.controller.result_layer.id() == layer_id:
            self.controller.result_layer = None
            self.save_button.setEnabled(False)

    @staticmethod
    def _item_text(feature) -> str:
        mark = feature["feedback"] if feature.fields().indexOf("feedback") >= 0 else None
        score = _number(feature, "score", "score {:.3f}") or "not verified"  # ranked below the verified hits
        return (f"#{feature['rank']}  {score}  "
                f"scale {_number(feature, 'scale', '{}')}  {_number(feature, 'angle', '{:+.0f}°')}"
                f"{'  ' + MARK_TEXT[mark] if mark in MARK_TEXT else ''}")

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
        """Connect to `endpoint` (default: the one typed) with the key files in Settings."""
        if endpoint is not None:
            self.worker_panel.endpoint_edit.setText(endpoint)
        self.worker_panel.connect_worker()

    def _toggle_map_tool(self, on: bool) -> None:
        if on:
            self.place_button.setChecked(False)
            self.canvas.setMapTool(self.map_tool)
        else:
            self.canvas.unsetMapTool(self.map_tool)

    def _toggle_place_tool(self, on: bool) -> None:
        if on:
            self.draw_button.setChecked(False)
            self.canvas.setMapTool(self.place_tool)
        else:
            self.canvas.unsetMapTool(self.place_tool)

    def pick_place(self, rect: QgsRectangle) -> None:
        """A rectangle dragged on the map (map CRS) -> the example of the next search, in the CRS
        of the raster layer under it."""
        map_crs = self.canvas.mapSettings().destinationCrs()
        layer = raster_under(rect, map_crs, self.iface.activeLayer())
        if layer is None:
            self.place_tool.clear()
            return self.notify("Drag the rectangle over a raster layer (a file the worker can read).", Qgis.Warning)
        self.example = example_of(rect, map_crs, layer)
        self.sketch_source = "example"
        self.sketch_label.setText(f"a place of {layer.name()}")

    def _selected_feature(self):
        """The results layer shown and the feature of the selected list item, or (None, None) and a message."""
        item = self.results_list.currentItem()
        if item is None or self.shown_layer is None:
            self.notify("Select a hit in the results list first.", Qgis.Warning)
            return None, None
        return self.shown_layer, self.shown_layer.getFeature(item.data(FEATURE_ID))

    def mark_selected(self, mark) -> None:
        """Mark the selected hit good, bad or not at all (stored in the layer's `feedback` field)."""
        layer, feature = self._selected_feature()
        if feature is None:
            return
        self.controller.mark(layer, feature.id(), mark)
        self.results_list.currentItem().setText(self._item_text(layer.getFeature(feature.id())))

    def more_like_selected(self) -> None:
        layer, feature = self._selected_feature()
        if feature is not None:
            self.controller.more_like_this(layer, feature)

    def layer_to_run_again(self):
        """The active layer when it holds a search (e.g. loaded from a GeoPackage), else the list's."""
        active = self._active_results_layer()
        return active if active is not None else self.shown_layer

    def _active_results_layer(self):
        """The layer active in the Layers panel when it holds a search's results, else None."""
        active = self.iface.activeLayer()
        if active is not None and active.type() == QgsMapLayerType.VectorLayer and saved_query(active):
            return active
        return None

    def _set_pen_width(self, width: int) -> None:
        self.map_tool.set_pen_width(width)
        self.pad.pen_width = width
        self.pad.update()

    def _sketch_changed(self, source: str, strokes: int) -> None:
        """The sketch in use is the surface drawn on last; once its strokes are all undone, the
        other's, where it has some: with the map's undone, the pad's were kept but neither
        searched nor undone, the label saying there was no sketch (probe)."""
        if not strokes:
            other = "pad" if source == "map" else "map"
            left = len((self.pad if other == "pad" else self.map_tool).strokes())
            if left:
                source, strokes = other, left
        self.sketch_source = source
        self.sketch_label.setText(f"{strokes} stroke(s) on the {source}" if strokes else NO_SKETCH)

    def _search_running(self, running: bool) -> None:
        """While a search runs, Search cancels it, and every other button that starts a search
        waits: two quick clicks on Run again sent two, and the first answer enabled Search while
        the second still ran."""
        self.searching = running
        self.search_button.setText("Cancel search" if running else "Search")
        for button in (self.more_button, self.refine_button, self.again_button):
            button.setEnabled(not running)

    def undo(self) -> None:
        """Undo the last stroke of the sketch in use; a picked place or a loaded image is undone
        whole, giving back the strokes drawn before it (undo took a pad stroke and kept the place)."""
        if self.sketch_source in ("map", "pad"):
            return (self.map_tool if self.sketch_source == "map" else self.pad).undo()
        self.place_tool.clear()
        self.example, self.sketch_image = None, None
        on_map, on_pad = len(self.map_tool.strokes()), len(self.pad.strokes())
        self._sketch_changed("pad" if on_pad and not on_map else "map", on_map or on_pad)

    def clear_sketch(self) -> None:
        self.map_tool.clear()
        self.pad.clear()
        self.place_tool.clear()
        self.sketch_image = None
        self.example = None

    def _choose_image(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load sketch image", "", "Images (*.png *.jpg *.jpeg)")
        if path:
            self.load_sketch_image(path)

    def load_sketch_image(self, path: str) -> None:
        """Search with the image file `path`; one that cannot be read is said, the sketch kept
        (an unreadable file raised out of the dialog's slot)."""
        try:
            with open(path, "rb") as f:
                self.sketch_image = f.read()
        except OSError as exc:
            return self.notify(f"Cannot read {path} ({exc.strerror}): choose another image.", Qgis.Warning)
        self.sketch_source = "image"
        self.sketch_label.setText(path.rsplit("/", 1)[-1])

    def search_query(self) -> Optional[SearchQuery]:
        """The search the dock is set up for, or None (and a message) when it is not ready."""
        index = self.index_combo.currentText()
        if not index:
            self.notify("Choose an index to search (build one in the Index box first).", Qgis.Warning)
            return None
        canvas_crs_id = crs_name(self.canvas.mapSettings().destinationCrs())
        if canvas_crs_id is None:
            self.notify("The map has no CRS: set the project's CRS (Project ▸ Properties ▸ CRS), then search.",
                        Qgis.Warning)
            return None
        sketch: dict = {}
        if self.sketch_source == "image" and self.sketch_image:
            sketch = {"sketch_png": self.sketch_image}
        elif self.sketch_source == "example" and self.example:
            sketch = {"example": self.example}
        elif self.sketch_source == "pad" and self.pad.strokes():
            sketch = {"strokes": self.pad.strokes(), "strokes_crs": "pixel",
                      "strokes_frame": [0, 0, self.pad.width(), self.pad.height()]}
        elif self.map_tool.strokes():  # in the CRS they were drawn in while the map's cannot place them
            drawn = self.map_tool.drawn_px()
            if drawn is not None and drawn < MIN_SKETCH_PX:
                self.notify(f"The sketch was drawn {drawn:.0f} px across: too small to tell places apart. Zoom in "
                            "until the place fills much of the map, then draw it again.", Qgis.Warning)
                return None
            sketch = {"strokes": self.map_tool.strokes(), "strokes_crs": crs_name(self.map_tool.strokes_crs) or canvas_crs_id}
        else:
            self.notify("Draw a sketch first (on the map, on the pad, or load an image).", Qgis.Warning)
            return None
        area: dict = {}
        if self.area_combo.currentIndex() == MAP_VIEW:
            e = self.canvas.mapSettings().visiblePolygon().boundingRect()  # what is on screen, the canvas turned or not
            area = {"bbox": [e.left(), e.top(), e.right(), e.bottom()], "bbox_crs": canvas_crs_id}  # top: the least y
        return SearchQuery(index=index, top=self.top_spin.value(),
                           crs=crs_name(QgsProject.instance().crs()) or "EPSG:4326", **sketch, **area)

    def search(self) -> None:
        if self.searching:
            return self.controller.cancel_search()
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
        self.canvas.unsetMapTool(self.place_tool)
        QgsProject.instance().layerWillBeRemoved[str].disconnect(self._layer_removed)
        self.iface.currentLayerChanged.disconnect(self._layer_activated)
        self._watch_marks(None)
        self.map_tool.clear()
        self.place_tool.clear()
        self.canvas.scene().removeItem(self.place_tool.band)  # the canvas owns rubber bands: they outlive the tool
        self.map_tool.deleteLater()
        self.place_tool.deleteLater()
        self.thumbnails.shutdown()
        self.index_panel.shutdown()
        self.settings_dialog.close()
