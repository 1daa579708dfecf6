"""Query by example, marks on hits, Refine, and saved searches, in real QGIS against a real worker."""

from __future__ import annotations

import json

import pytest
from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProject, QgsRectangle, QgsVectorLayer
from qgis.PyQt.QtCore import QPoint, Qt
from qgis.PyQt.QtTest import QTest

from conftest import process_until
from mouse import drag


def connected(dock, worker) -> None:
    link = dock.controller.link  # the light can still say connected to a worker another test stopped
    if link is None or link.endpoint != worker.bind or not dock.worker_panel.status_label.text().startswith("connected"):
        dock.connect_worker(worker.bind)
        assert dock.worker_panel.status_label.text() == "connecting…"
        assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30)
    assert process_until(lambda: dock.index_combo.count() > 0, 10)
    dock.index_combo.setCurrentText("rmnp")
    dock.area_combo.setCurrentIndex(0)


def inside_raster(canvas) -> tuple:
    """Two viewport points (top-left, bottom-right) of a rectangle over the middle of the raster shown."""
    w, h = canvas.viewport().width(), canvas.viewport().height()
    return (int(w * 0.4), int(h * 0.4)), (int(w * 0.6), int(h * 0.65))


def search_and_wait(dock, start) -> QgsVectorLayer:
    """Run `start()` (a click) and return the results layer it adds."""
    before = set(QgsProject.instance().mapLayers())
    start()
    assert process_until(lambda: len(set(QgsProject.instance().mapLayers()) - before) == 1, 90), \
        "no new results layer"
    [new_id] = set(QgsProject.instance().mapLayers()) - before
    return QgsProject.instance().mapLayer(new_id)


def test_the_rectangle_tool_asks_for_the_place_in_the_rasters_crs(plugin, rmnp_layer, qgis_iface):
    dock = plugin.dock
    dock.clear_sketch()
    canvas = qgis_iface.mapCanvas()
    dock.place_button.setChecked(True)
    assert canvas.mapTool() is dock.place_tool and not dock.draw_button.isChecked()
    (x0, y0), (x1, y1) = inside_raster(canvas)
    drag(canvas.viewport(), [(x0, y0), ((x0 + x1) // 2, (y0 + y1) // 2), (x1, y1)])
    to_map = canvas.getCoordinateTransform()
    a, b = to_map.toMapCoordinates(QPoint(x0, y0)), to_map.toMapCoordinates(QPoint(x1, y1))
    expected = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:3857"), rmnp_layer.crs(),
                                      QgsProject.instance()).transformBoundingBox(QgsRectangle(a, b))
    assert dock.example["raster"] == rmnp_layer.source()
    assert dock.example["crs"] == "EPSG:4326", "the box is given in the raster layer's CRS, not the map's"
    assert dock.example["bbox"] == pytest.approx([expected.xMinimum(), expected.yMinimum(), expected.xMaximum(),
                                                  expected.yMaximum()])
    dock.index_combo.addItem("rmnp")
    dock.index_combo.setCurrentText("rmnp")
    frames, fields = dock.search_query().message()
    assert frames == () and fields["example"] == dock.example and "strokes" not in fields
    dock.place_button.setChecked(False)
    assert canvas.mapTool() is not dock.place_tool
    drag(dock.pad, [(10, 12), (40, 30)])
    dock.place_button.setChecked(True)
    drag(canvas.viewport(), [(x0, y0), ((x0 + x1) // 2, (y0 + y1) // 2), (x1, y1)])
    dock.place_button.setChecked(False)
    dock.undo_button.click()  # undoes the place, not a pad stroke: it took one and kept searching the place
    assert dock.example is None and len(dock.pad.strokes()) == 1 and dock.sketch_label.text() == "1 stroke(s) on the pad"
    assert dock.search_query().strokes == [[[10.0, 12.0], [40.0, 30.0]]]
    dock.clear_sketch()
    assert dock.example is None
    canvas.setRotation(45)  # a square dragged on a rotated map: the map rectangle round it, not its two corners
    dock.place_button.setChecked(True)
    side = min(x1 - x0, y1 - y0)
    drag(canvas.viewport(), [(x0, y0), (x0 + side, y0 + side)])
    dock.place_button.setChecked(False)
    to_map = canvas.getCoordinateTransform()
    corners = [to_map.toMapCoordinates(QPoint(x, y)) for x in (x0, x0 + side) for y in (y0, y0 + side)]
    around = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:3857"), rmnp_layer.crs(), QgsProject.instance()
                                    ).transformBoundingBox(QgsRectangle(min(p.x() for p in corners),
                                                                        min(p.y() for p in corners),
                                                                        max(p.x() for p in corners),
                                                                        max(p.y() for p in corners)))
    assert dock.example["bbox"] == pytest.approx([around.xMinimum(), around.yMinimum(), around.xMaximum(),
                                                  around.yMaximum()]), "was a line at 45 degrees: an empty box"
    canvas.setRotation(0)
    dock.clear_sketch()
    dock.index_combo.clear()


def test_marks_are_stored_sent_and_refine_adds_a_layer(plugin, worker, rmnp_layer, qgis_iface, tmp_path):
    dock = plugin.dock
    connected(dock, worker)
    dock.top_spin.setValue(5)
    dock.clear_sketch()
    dock.place_button.setChecked(True)
    drag(qgis_iface.mapCanvas().viewport(), list(inside_raster(qgis_iface.mapCanvas())))
    dock.place_button.setChecked(False)
    first = search_and_wait(dock, dock.search_button.click)
    assert "id" in [f.name() for f in first.fields()] and "feedback" in [f.name() for f in first.fields()]
    assert first.featureCount() == 5
    saved = json.loads(first.customProperty("sketch_search/query"))
    assert saved["example"] == dock.example and saved["index"] == "rmnp"
    assert json.loads(first.customProperty("sketch_search/model"))["model"], "the model's identity is kept"

    # 👍 the second hit with the button, 👎 the first with the keyboard
    dock.results_list.setCurrentRow(1)
    dock.good_button.click()
    dock.results_list.setCurrentRow(0)
    dock.results_list.setFocus()
    QTest.keyClick(dock.results_list, Qt.Key_Minus)
    by_rank = {f["rank"]: f for f in first.getFeatures()}
    assert by_rank[2]["feedback"] == 1 and by_rank[1]["feedback"] == -1
    assert not by_rank[3]["feedback"], "an unmarked hit's feedback is NULL"
    assert "👍" in dock.results_list.item(1).text() and "👎" in dock.results_list.item(0).text()

    sent = []
    original = dock.controller.search
    dock.controller.search = lambda query: (sent.append(query), original(query))
    try:
        refined = search_and_wait(dock, dock.refine_button.click)
    finally:
        dock.controller.search = original
    feedback = sent[0].message()[1]["feedback"]
    assert feedback == {"positive": [by_rank[2]["id"]], "negative": [by_rank[1]["id"]]}
    assert refined is not first and refined.featureCount() > 0
    assert by_rank[1]["id"] not in {f["id"] for f in refined.getFeatures()}, "a hit marked 👎 does not come back"
    assert json.loads(refined.customProperty("sketch_search/query"))["feedback"] == feedback

    # More like this: the selected hit's square as the example
    dock.results_list.setCurrentRow(0)
    more = search_and_wait(dock, dock.more_button.click)
    example = json.loads(more.customProperty("sketch_search/query"))["example"]
    assert example["raster"].endswith("rmnp-rgb.tif") and example["crs"] == "EPSG:3857"


def test_run_again_on_a_reloaded_geopackage_repeats_the_search(plugin, worker, rmnp_layer, qgis_iface, tmp_path):
    dock = plugin.dock
    connected(dock, worker)
    dock.top_spin.setValue(4)
    dock.clear_sketch()
    dock.draw_button.setChecked(True)
    drag(qgis_iface.mapCanvas().viewport(), [(80, 120), (160, 170), (240, 160), (330, 260)])
    dock.draw_button.setChecked(False)
    first = search_and_wait(dock, dock.search_button.click)
    dock.results_list.setCurrentRow(0)
    dock.good_button.click()
    path = str(tmp_path / "hits.gpkg")
    dock.controller.save_results(path)
    name, first_ids = first.name(), sorted(f["id"] for f in first.getFeatures())
    QgsProject.instance().removeMapLayer(first.id())
    assert dock.shown_layer is None and dock.results_list.count() == 0, "a removed layer's hits are not shown"

    reloaded = QgsVectorLayer(f"{path}|layername={name}", "saved hits", "ogr")
    assert reloaded.isValid()
    assert not reloaded.customProperty("sketch_search/query"), "a GeoPackage keeps no custom properties"
    assert [f["feedback"] for f in reloaded.getFeatures() if f["rank"] == 1] == [1], "marks survive the file"
    QgsProject.instance().addMapLayer(reloaded)
    qgis_iface.setActiveLayer(reloaded)
    again = search_and_wait(dock, dock.again_button.click)
    query = json.loads(again.customProperty("sketch_search/query"))
    assert query["strokes"] and query["index"] == "rmnp" and query["top"] == 4
    assert sorted(f["id"] for f in again.getFeatures()) == first_ids, \
        "the same search on the same index finds the same places"


def test_a_box_over_most_of_the_only_raster_says_why_nothing_was_found(plugin, worker, rmnp_layer, qgis_iface):
    """Every place of the index lies in the box dragged, or overlaps the example's own place:
    the dock said "No places found." alone, as for a search gone wrong."""
    from qgis.core import Qgis, QgsPointXY

    dock = plugin.dock
    connected(dock, worker)
    dock.clear_sketch()
    canvas = qgis_iface.mapCanvas()
    extent = canvas.mapSettings().layerExtentToOutputExtent(rmnp_layer, rmnp_layer.extent())
    to_screen = canvas.getCoordinateTransform()
    (x0, y0), (x1, y1) = [(p.x(), p.y()) for p in (to_screen.transform(QgsPointXY(extent.xMinimum(), extent.yMaximum())),
                                                    to_screen.transform(QgsPointXY(extent.xMaximum(), extent.yMinimum())))]
    inset_x, inset_y = 0.03 * (x1 - x0), 0.03 * (y1 - y0)
    dock.place_button.setChecked(True)
    drag(canvas.viewport(), [(int(x0 + inset_x), int(y0 + inset_y)), (int(x1 - inset_x), int(y1 - inset_y))])
    dock.place_button.setChecked(False)
    layers = set(QgsProject.instance().mapLayers())
    qgis_iface.messageBar().clear_messages()
    dock.search_button.click()
    assert process_until(lambda: not dock.searching and qgis_iface.messageBar().get_messages(Qgis.Warning), 90)
    warnings = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert any(m.startswith("Sketch search:No places found.") and "Every place found is the example's own place" in m
               and "choose a smaller box" in m for m in warnings), warnings
    assert set(QgsProject.instance().mapLayers()) == layers
    dock.clear_sketch()


def test_the_list_follows_the_results_layer_made_active_and_its_edits(plugin, worker, rmnp_layer, qgis_iface):
    """Only the newest search's layer could be marked and refined: an older one made active, or
    a reopened project's, was refused as "holds no sketch search". And in a layer being edited,
    the dock's marks went beneath the edit buffer: hidden by the buffer's, and kept by a roll
    back (probe)."""
    from qgis.core import Qgis

    dock, canvas = plugin.dock, qgis_iface.mapCanvas()
    connected(dock, worker)
    dock.top_spin.setValue(3)
    dock.clear_sketch()
    dock.draw_button.setChecked(True)
    drag(canvas.viewport(), [(80, 120), (160, 170), (240, 160), (330, 260)])
    first = search_and_wait(dock, dock.search_button.click)
    drag(canvas.viewport(), [(100, 300), (300, 280)])
    second = search_and_wait(dock, dock.search_button.click)
    dock.draw_button.setChecked(False)
    assert dock.shown_layer is second

    qgis_iface.setActiveLayer(first)
    qgis_iface.currentLayerChanged.emit(canvas)  # as QGIS says a layer was made active (the mock's signal)
    assert dock.shown_layer is first and dock.results_list.count() == first.featureCount()
    dock.results_list.setCurrentRow(0)
    dock.good_button.click()
    by_rank = {f["rank"]: f for f in first.getFeatures()}
    assert by_rank[1]["feedback"] == 1 and not any(f["feedback"] for f in second.getFeatures())
    sent = []
    original = dock.controller.search
    dock.controller.search = lambda query: (sent.append(query), original(query))
    try:
        search_and_wait(dock, dock.refine_button.click)
    finally:
        dock.controller.search = original
    assert sent[0].message()[1]["feedback"] == {"positive": [by_rank[1]["id"]], "negative": []}

    qgis_iface.setActiveLayer(first)
    qgis_iface.currentLayerChanged.emit(canvas)
    first.startEditing()
    feedback = first.fields().indexOf("feedback")
    first.changeAttributeValue(by_rank[2].id(), feedback, -1)  # as the attribute table does
    assert "👎" in dock.results_list.item(1).text(), "the list shows the layer's marks as edited"
    dock.results_list.setCurrentRow(1)
    dock.good_button.click()
    assert first.getFeature(by_rank[2].id())["feedback"] == 1 and "👍" in dock.results_list.item(1).text()
    first.rollBack()
    assert not first.getFeature(by_rank[2].id())["feedback"], "a roll back takes back the marks made meanwhile"
    assert not any(m in dock.results_list.item(1).text() for m in ("👍", "👎"))
    assert "👍" in dock.results_list.item(0).text()

    for layer in [l for l in QgsProject.instance().mapLayers().values() if l.customProperty("sketch_search/query")]:
        QgsProject.instance().removeMapLayer(layer.id())
    qgis_iface.messageBar().clear_messages()
    dock.refine_button.click()
    assert any("No search results are listed" in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning))
    dock.clear_sketch()
