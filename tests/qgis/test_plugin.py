"""The plugin in real QGIS: loading, sketching on the canvas, searching a real worker, errors."""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager

import pytest
from qgis.core import (NULL, Qgis, QgsApplication, QgsCoordinateReferenceSystem, QgsCoordinateTransform,
                       QgsPointXY, QgsProject, QgsRasterLayer, QgsRectangle, QgsVectorLayer)
from qgis.PyQt.QtCore import QEvent, QPoint, QPointF, Qt, QTimer
from qgis.PyQt.QtGui import QMouseEvent
from qgis.PyQt.QtWidgets import QApplication

from conftest import process_until, show_rmnp
from mouse import drag


def test_plugin_loads_like_in_qgis(plugin):
    import qgis.utils

    assert "sketch_search" in qgis.utils.active_plugins
    assert plugin.action is not None and plugin.dock.windowTitle() == "Sketch search"
    ids = {a.id() for a in QgsApplication.processingRegistry().providerById("sketchsearch").algorithms()}
    assert ids == {"sketchsearch:build_index", "sketchsearch:search_by_sketch"}


def test_a_drawn_stroke_becomes_the_request(plugin, rmnp_layer, qgis_iface):
    dock = plugin.dock
    dock.clear_sketch()
    dock.draw_button.setChecked(True)
    canvas = qgis_iface.mapCanvas()
    viewport = canvas.viewport()
    drag(viewport, [(100, 100), (150, 140), (200, 150), (260, 210)])
    drag(viewport, [(120, 300), (300, 280)])
    strokes = dock.map_tool.strokes()
    assert [len(s) for s in strokes] == [4, 2]
    expected = canvas.getCoordinateTransform().toMapCoordinates(QPoint(100, 100))
    assert strokes[0][0] == pytest.approx([expected.x(), expected.y()])
    dock.index_combo.addItem("rmnp")
    dock.index_combo.setCurrentText("rmnp")  # whatever an earlier test left selected (or nothing)
    dock.area_combo.setCurrentIndex(1)
    query = dock.search_query()
    assert query.sketch_png is None and query.strokes == strokes and query.strokes_crs == "EPSG:3857"
    extent = canvas.extent()
    assert query.bbox == pytest.approx([extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()])
    assert query.bbox_crs == "EPSG:3857" and query.index == "rmnp"
    frames, fields = query.message()
    assert frames == () and fields["strokes"] == strokes and fields["bbox"] == query.bbox
    assert "strokes_frame" not in fields, "strokes on the map are framed by their own extent"

    canvas.setRotation(30)  # the map view searched is what is on screen
    corners = [canvas.getCoordinateTransform().toMapCoordinates(QPoint(x, y))
               for x in (0, viewport.width()) for y in (0, viewport.height())]
    on_screen = [min(p.x() for p in corners), min(p.y() for p in corners), max(p.x() for p in corners),
                 max(p.y() for p in corners)]
    assert dock.search_query().bbox == pytest.approx(on_screen, rel=0.02)
    canvas.setRotation(0)

    mercator, first = canvas.mapSettings().destinationCrs(), strokes[0][0]
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))  # strokes stay where they were drawn
    query = dock.search_query()
    lon_lat = QgsCoordinateTransform(mercator, QgsCoordinateReferenceSystem("EPSG:4326"),
                                     QgsProject.instance()).transform(QgsPointXY(*first))
    assert query.strokes_crs == "EPSG:4326" and query.strokes[0][0] == pytest.approx([lon_lat.x(), lon_lat.y()])
    custom = QgsCoordinateReferenceSystem.fromProj("+proj=merc +lon_0=10 +datum=WGS84 +units=m +no_defs")
    canvas.setDestinationCrs(custom)  # no authority code: named by its WKT2, which the worker reads
    assert dock.search_query().strokes_crs.startswith("PROJCRS[")
    canvas.setDestinationCrs(mercator)
    assert dock.search_query().strokes[0][0] == pytest.approx(first)
    qgis_iface.messageBar().clear_messages()
    far_side = QgsCoordinateReferenceSystem.fromProj("+proj=ortho +lat_0=-40 +lon_0=74 +datum=WGS84 +units=m +no_defs")
    canvas.setDestinationCrs(far_side)  # cannot place them: they were cleared, unsaid
    query = dock.search_query()
    assert query.strokes[0][0] == pytest.approx(first) and query.strokes_crs == "EPSG:3857", "kept, searched as drawn"
    assert dock.sketch_label.text() == "2 stroke(s) on the map"
    assert any("cannot be shown in this projection" in m for m in qgis_iface.messageBar().get_messages(Qgis.Info))
    canvas.setDestinationCrs(mercator)  # shown again where they were drawn
    assert dock.search_query().strokes_crs == "EPSG:3857"
    assert [c for s in dock.map_tool.strokes() for p in s for c in p] == pytest.approx([c for s in strokes for p in s for c in p])
    canvas.setDestinationCrs(far_side)
    drag(viewport, [(120, 300), (300, 280)])  # drawing there starts a new sketch
    assert len(dock.map_tool.strokes()) == 1 and dock.search_query().strokes_crs.startswith("PROJCRS[")
    canvas.setDestinationCrs(mercator)
    dock.map_tool.clear()
    drag(viewport, [(100, 100), (150, 140), (200, 150), (260, 210)])
    drag(viewport, [(120, 300), (300, 280)])
    dock.map_tool.undo()
    assert len(dock.map_tool.strokes()) == 1
    dock.draw_button.setChecked(False)
    drag(dock.pad, [(10, 12), (40, 30)])  # the pad is the place's frame: strokes go with it
    query = dock.search_query()
    assert query.strokes == [[[10.0, 12.0], [40.0, 30.0]]] and query.strokes_crs == "pixel"
    assert query.message()[1]["strokes_frame"] == [0, 0, dock.pad.width(), dock.pad.height()]
    dock.clear_sketch()
    assert dock.sketch_label.text() == "draw on the map or the pad", "not '0 stroke(s) on the pad'"
    dock.index_combo.clear()


def test_the_sketch_in_use_is_the_one_drawn_on_and_left_after_an_undo(plugin, rmnp_layer, qgis_iface):
    """With strokes on the pad and the map, undoing the map's left the pad's neither searched
    nor undone, and the label said there was no sketch; a click on the pad made it the sketch
    in use, with no strokes, over the map's (probe)."""
    dock, viewport = plugin.dock, qgis_iface.mapCanvas().viewport()
    dock.index_combo.addItem("rmnp")
    dock.index_combo.setCurrentText("rmnp")
    dock.clear_sketch()
    drag(dock.pad, [(10, 12), (80, 60)])
    drag(dock.pad, [(20, 90), (120, 30)])
    dock.draw_button.setChecked(True)
    drag(viewport, [(100, 100), (200, 150), (260, 210)])
    assert dock.sketch_label.text() == "1 stroke(s) on the map"
    dock.undo()
    assert dock.sketch_label.text() == "2 stroke(s) on the pad" and dock.search_query().strokes_crs == "pixel"
    dock.undo()
    assert dock.sketch_label.text() == "1 stroke(s) on the pad" and len(dock.pad.strokes()) == 1

    dock.clear_sketch()
    drag(viewport, [(100, 100), (200, 150), (260, 210)])
    drag(viewport, [(120, 300), (300, 280)])
    drag(dock.pad, [(30, 30)])  # a click
    drag(dock.pad, [(30, 30), (31, 32)])  # and its slip
    assert dock.sketch_label.text() == "2 stroke(s) on the map" and dock.pad.strokes() == []
    drag(dock.pad, [(10, 12), (80, 60)])
    dock.draw_button.setChecked(True)
    drag(viewport, [(120, 200), (300, 180)])
    right = QMouseEvent(QEvent.MouseButtonRelease, QPointF(30, 30), Qt.RightButton, Qt.NoButton, Qt.NoModifier)
    QApplication.sendEvent(dock.pad, right)  # another button's release ends no stroke
    assert dock.sketch_label.text() == "3 stroke(s) on the map"
    dock.undo()
    dock.undo()
    assert len(dock.map_tool.strokes()) == 1 and dock.search_query().strokes_crs == "EPSG:3857"
    dock.draw_button.setChecked(False)

    dock.clear_sketch()
    dock.index_combo.clear()


def test_strokes_drawn_across_180_stay_whole_when_the_map_s_crs_changes(plugin, qgis_iface):
    """A sketch over Fiji drawn across 180 degrees in a Mercator centred on the Pacific, then
    shown in lon/lat and in web Mercator: PROJ puts the points past 180 at the CRS's other edge,
    and the strokes were drawn across the whole world. They stay one piece a few km wide, where
    they were drawn, whichever side of 180 they start on. A map with no CRS wraps nowhere."""
    from sketch_search.sketch_tool import world_width

    assert world_width(QgsCoordinateReferenceSystem()) is None
    dock, canvas = plugin.dock, qgis_iface.mapCanvas()
    was_crs, was_extent = canvas.mapSettings().destinationCrs(), canvas.extent()
    pacific, lon_lat = QgsCoordinateReferenceSystem("EPSG:3832"), QgsCoordinateReferenceSystem("EPSG:4326")
    x180 = QgsCoordinateTransform(lon_lat, pacific, QgsProject.instance()).transform(QgsPointXY(180.0, -17.0))
    try:
        dock.clear_sketch()
        canvas.setDestinationCrs(pacific)
        canvas.setExtent(QgsRectangle(x180.x() - 20_000, x180.y() - 20_000, x180.x() + 20_000, x180.y() + 20_000))
        dock.draw_button.setChecked(True)
        width = canvas.viewport().width()
        drag(canvas.viewport(), [(3 * width // 4, 300), (width // 4, 280)])  # from east of 180
        drag(canvas.viewport(), [(width // 4, 100), (width // 2, 140), (3 * width // 4, 150)])
        for crs, km in ((lon_lat, 1 / 111.32), (QgsCoordinateReferenceSystem("EPSG:3857"), 1000 * 1.05)):
            canvas.setDestinationCrs(crs)
            xs = [p[0] for stroke in dock.map_tool.strokes() for p in stroke]
            assert max(xs) - min(xs) < 40 * km, (crs.authid(), xs)
            assert min(xs) < QgsCoordinateTransform(lon_lat, crs, QgsProject.instance()).transform(
                QgsPointXY(180.0, -17.0)).x() < max(xs), "drawn across 180 degrees, kept there"
        canvas.setDestinationCrs(pacific)
        back = [p[0] for stroke in dock.map_tool.strokes() for p in stroke]
        assert max(back) - min(back) < 40_000 and min(back) < x180.x() < max(back)
    finally:
        dock.draw_button.setChecked(False)
        dock.clear_sketch()
        canvas.setDestinationCrs(was_crs)
        canvas.setExtent(was_extent)


def test_a_service_that_is_no_worker_of_this_version_is_named_so_and_a_worker_then_connects(plugin, worker,
                                                                                            qgis_iface):
    """A ZeroMQ service answering `info` without a worker's fields (another program, or a worker
    of another version): its reply was kept, every later status update raised (an internal
    error), and the light said "connecting…" for good."""
    import json
    import threading

    import zmq

    from lab.worker_process import free_port

    dock = plugin.dock
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    router.bind(endpoint)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            if router.poll(50):
                peer, *body = router.recv_multipart()
                request = json.loads(body[-1])
                router.send_multipart([peer, *body[:-1], json.dumps({"v": 1, "id": request["id"], "ok": True}).encode()])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        qgis_iface.messageBar().clear_messages()
        dock.connect_worker(endpoint)
        assert process_until(lambda: dock.worker_panel.status_label.text() == "not a sketch search worker", 20), \
            dock.worker_panel.status_label.text()
        assert any("not as a sketch search worker" in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning))
        assert not qgis_iface.messageBar().get_messages(Qgis.Critical), "no internal error"
    finally:
        stop.set()
        thread.join()
        router.close(0)
        context.term()
    dock.connect_worker(worker.bind)
    assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30), \
        dock.worker_panel.status_label.text()


def test_a_search_of_an_index_gone_meanwhile_says_so_and_stops_offering_it(plugin, worker, rmnp_layer, qgis_iface):
    """An index deleted by another client after the list was shown: the search said "<the
    worker's path> is not an index; build one with `index`", and the list kept offering it."""
    dock = plugin.dock
    dock.connect_worker(worker.bind)
    assert process_until(lambda: dock.index_combo.count() > 0, 30)
    dock.index_combo.addItem("gone")  # listed before another client deleted it
    dock.index_combo.setCurrentText("gone")
    dock.clear_sketch()
    dock.draw_button.setChecked(True)
    drag(qgis_iface.mapCanvas().viewport(), [(80, 120), (160, 170), (240, 160), (330, 260)])
    dock.draw_button.setChecked(False)
    qgis_iface.messageBar().clear_messages()
    dock.search_button.click()
    assert process_until(lambda: not dock.searching and dock.index_combo.findText("gone") < 0, 30)
    said = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert any("index 'gone' does not exist" in m for m in said) and not any(str(worker.index_root) in m for m in said)
    dock.clear_sketch()


def test_a_box_dragged_over_two_sheets_takes_the_one_under_most_of_it(plugin, raster_root, tmp_path):
    """Two neighbouring sheets, the western one above in the layer tree: a box lying mostly on the
    eastern one, the western's edge in its corner, was taken from the western sheet (the topmost
    it touched) and searched as a sliver of it (a probe's). The sheet under most of it is taken;
    an active layer under half of it or more is taken first, as the user chose it."""
    from osgeo import gdal

    from sketch_search.place_tool import example_of, raster_under

    sheets = {}
    for name, srcwin in (("west", [0, 0, 240, 373]), ("east", [240, 0, 245, 373])):
        gdal.Translate(str(tmp_path / f"{name}.tif"), str(raster_root / "rmnp-rgb.tif"), srcWin=srcwin)
        sheets[name] = QgsRasterLayer(str(tmp_path / f"{name}.tif"), name)
    QgsProject.instance().addMapLayers([sheets["west"], sheets["east"]])  # the first added is on top
    try:
        root = QgsProject.instance().layerTreeRoot()
        assert [node.layer().name() for node in root.findLayers()][:2] == ["west", "east"]
        west, east = sheets["west"].extent(), sheets["east"].extent()
        box = QgsRectangle(east.xMinimum() - 0.02 * east.width(), east.yMinimum() + 0.3 * east.height(),
                           east.xMinimum() + 0.5 * east.width(), east.yMinimum() + 0.6 * east.height())
        assert box.intersects(west) and box.intersect(east).area() > 0.9 * box.area()
        lon_lat = QgsCoordinateReferenceSystem("EPSG:4326")
        assert raster_under(box, lon_lat).name() == "east"
        assert example_of(box, lon_lat, raster_under(box, lon_lat))["raster"].endswith("east.tif")
        assert raster_under(box, lon_lat, active=sheets["west"]).name() == "east", "the active one under a sliver"
        assert raster_under(box, lon_lat, active=sheets["east"]).name() == "east"
        on_west = QgsRectangle(west.xMinimum(), west.yMinimum(), west.xMinimum() + 0.3 * west.width(),
                               west.yMinimum() + 0.3 * west.height())
        assert raster_under(on_west, lon_lat, active=sheets["east"]).name() == "west"
    finally:
        QgsProject.instance().removeMapLayers([layer.id() for layer in sheets.values()])


def test_search_against_a_real_worker_adds_a_georeferenced_layer(plugin, worker, rmnp_layer, qgis_iface, tmp_path):
    from sketch_search.results import saved_query

    dock = plugin.dock
    qgis_iface.messageBar().clear_messages()
    dock.connect_worker(worker.bind)
    assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30), dock.worker_panel.status_label.text()
    assert "cpu" in dock.worker_panel.status_label.text()
    assert process_until(lambda: dock.index_combo.count() > 0, 10)
    dock.index_combo.setCurrentText("rmnp")
    dock.area_combo.setCurrentIndex(0)
    dock.top_spin.setValue(3)
    dock.clear_sketch()
    dock.draw_button.setChecked(True)
    drag(qgis_iface.mapCanvas().viewport(), [(80, 120), (160, 170), (240, 160), (330, 260)])
    dock.draw_button.setChecked(False)
    layers_before = set(QgsProject.instance().mapLayers())
    dock.controller.link.timeout_s = 0.01  # a search waits for the worker's own limit, not for other requests'
    dock.search_button.click()
    starting = (dock.more_button, dock.refine_button, dock.again_button)
    assert not any(b.isEnabled() for b in starting), "a second search (Run again clicked twice) waits for the first"
    assert dock.search_button.text() == "Cancel search" and dock.search_button.isEnabled()
    assert process_until(lambda: not dock.searching and dock.controller.result_layer is not None, 60), \
        qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert all(b.isEnabled() for b in starting) and dock.search_button.text() == "Search"
    dock.controller.link.timeout_s = dock.controller.request_timeout_s
    [new_id] = set(QgsProject.instance().mapLayers()) - layers_before
    layer = QgsProject.instance().mapLayer(new_id)
    assert layer.name().startswith("Sketch search 1: rmnp")
    assert layer.crs().authid() == "EPSG:3857"
    assert [f.name() for f in layer.fields()] == ["fid", "rank", "score", "shortlist_score", "raster", "window",
                                                  "scale", "angle", "query_ms", "id", "feedback"]
    source = layer.source().split("|")[0]  # written at once, so that the project keeps its results
    assert layer.providerType() == "ogr" and source.endswith("results.gpkg")
    reopened = QgsVectorLayer(layer.source(), "reopened", "ogr")
    assert reopened.featureCount() == 3 and saved_query(reopened) == saved_query(layer)
    del reopened
    assert sorted(f["rank"] for f in layer.getFeatures()) == [1, 2, 3]
    assert layer.extent().intersects(qgis_iface.mapCanvas().mapSettings().layerExtentToOutputExtent(rmnp_layer, rmnp_layer.extent()))
    assert dock.results_list.count() == 3
    assert process_until(lambda: not dock.results_list.item(0).icon().isNull(), 20), "its picture, drawn in the background"
    dock.results_list.itemClicked.emit(dock.results_list.item(0))  # zoom to the best hit
    best = next(f for f in layer.getFeatures() if f["rank"] == 1).geometry().boundingBox()
    assert qgis_iface.mapCanvas().extent().contains(best)
    out = tmp_path / "hits.gpkg"
    dock.controller.save_results(str(out))
    saved = QgsVectorLayer(f"{out}|layername={layer.name()}", "saved", "ogr")
    assert saved.isValid() and saved.featureCount() == 3
    del saved
    assert f"Results saved to {out}" in qgis_iface.messageBar().get_messages(Qgis.Success)[-1]
    dock.controller.save_results(str(out))  # a layer of that name saved there before (another session's 1)
    again = QgsVectorLayer(f"{out}|layername={layer.name()} (2)", "saved again", "ogr")
    assert again.isValid() and again.featureCount() == 3, "added beside the first, not over it"
    assert f"“{layer.name()} (2)”" in qgis_iface.messageBar().get_messages(Qgis.Success)[-1]
    del again
    name = layer.name()
    layer.setName("Sketch search 1: coast|2024")  # an index named with a "|", which a layer URI ends at
    dock.controller.save_results(str(out))
    piped = QgsVectorLayer(f"{out}|layername=Sketch search 1: coast¦2024", "saved with a bar", "ogr")
    assert piped.isValid() and piped.featureCount() == 3
    del piped
    layer.setName(name)
    typed = tmp_path / "typed"  # Qt's dialog leaves a name typed without .gpkg as it is
    for _ in range(2):
        dock.controller.save_results(str(typed))
    assert not typed.exists(), "no stray file beside the GeoPackage (it held the query, the layer had none)"
    both = [QgsVectorLayer(f"{typed}.gpkg|layername={table}", "saved", "ogr") for table in (name, f"{name} (2)")]
    assert [(s.isValid(), s.featureCount(), bool(saved_query(s))) for s in both] == [(True, 3, True)] * 2, \
        "the second save added beside the first, not over it"
    del both
    assert f"Results saved to {typed}.gpkg as “{name} (2)”" in qgis_iface.messageBar().get_messages(Qgis.Success)[-1]
    other = tmp_path / "notes.gpkg"  # a file named so that is no GeoPackage: left as it was, and said so
    other.write_text("a user's notes")
    dock.controller.save_results(str(other))
    assert other.read_text() == "a user's notes"
    assert f"Saving failed: {other} is not a GeoPackage; it is left as it was: choose another file." in \
        qgis_iface.messageBar().get_messages(Qgis.Critical)[-1]

    project = QgsProject.instance()
    try:  # in a saved project, the hits go beside it
        project.setFileName(str(tmp_path / "survey.qgz"))
        dock.controller.run_again(layer)
        assert process_until(lambda: dock.controller.result_layer is not layer and not dock.searching, 60)
        assert dock.controller.result_layer.source().split("|")[0] == str(tmp_path / "survey_sketch_search.gpkg")
    finally:
        project.setFileName("")

    dock.top_spin.setValue(15)  # past the verified hits: no score, and the list says so
    done = dock.controller.result_layer
    dock.search_button.click()
    assert process_until(lambda: not dock.searching and dock.controller.result_layer is not done, 60)
    scores = [f["score"] for f in sorted(dock.controller.result_layer.getFeatures(), key=lambda f: f["rank"])]
    verified = [s for s in scores if s not in (None, NULL)]
    assert 3 <= len(verified) < len(scores) == 15 and verified == sorted(verified, reverse=True), scores
    assert all(s in (None, NULL) for s in scores[len(verified):]), scores
    texts = [dock.results_list.item(n).text() for n in range(dock.results_list.count())]
    assert "not verified" in texts[-1] and "not verified" not in texts[0], texts


def line_sketch(path):
    """A sketch image of one line in three strokes, saved to `path` (returned)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (256, 256), 255)
    ImageDraw.Draw(img).line([(10, 200), (120, 60), (240, 120)], fill=0, width=4)
    img.save(path)
    return path


PARTIAL_INDEX = """
import sys
from pathlib import Path
from worker.model.loading import load_model
from worker.store import IndexWriter
from worker.tiling import TileSettings
committed = []
IndexWriter(Path(sys.argv[1]), load_model(device="cpu", sketch_modules="none"), TileSettings(tile=112, scales=(1,)),
            chunk_tiles=8).build([Path(sys.argv[2])], progress=committed.append, should_stop=lambda: len(committed) >= 2)  # the plan, a chunk
"""


def test_a_raster_being_indexed_that_is_left_out_is_named_in_the_message(plugin, raster_root, rmnp_layer, qgis_iface,
                                                                          tmp_path):
    """A worker whose --max-partial-maps-mb holds no raster still being indexed: a search leaves
    the raster out, and the dock's message says so by name, as a warning; Processing's search, in
    its log. A worker whose budget holds it searches it in part, and both say that (they said
    nothing, after a run that stopped too)."""
    import subprocess

    import processing
    from qgis.core import QgsProcessingFeedback

    from conftest import REPO, WORKER_PYTHON
    from lab.worker_process import WorkerProcess

    index_root = tmp_path / "indexes"
    index_root.mkdir()
    subprocess.run([WORKER_PYTHON, "-c", PARTIAL_INDEX, str(index_root / "partial"), str(raster_root / "rmnp-rgb.tif")],
                   cwd=REPO, check=True, timeout=300)  # the indexer's own code, stopped after its first chunk
    proc = WorkerProcess(index_root, raster_root, python=WORKER_PYTHON, extra=["--max-partial-maps-mb", "0"]).start()
    sketch = line_sketch(tmp_path / "sketch.png")
    dock = plugin.dock
    try:
        qgis_iface.messageBar().clear_messages()
        dock.connect_worker(proc.bind)
        assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30)
        assert process_until(lambda: dock.index_combo.findText("partial") >= 0, 10)
        dock.index_combo.setCurrentText("partial")
        dock.area_combo.setCurrentIndex(0)
        dock.clear_sketch()
        dock.draw_button.setChecked(True)
        drag(qgis_iface.mapCanvas().viewport(), [(80, 120), (160, 170), (240, 160), (330, 260)])
        dock.draw_button.setChecked(False)
        dock.search_button.click()
        assert process_until(lambda: not dock.searching and qgis_iface.messageBar().get_messages(Qgis.Warning), 60)
        warnings = qgis_iface.messageBar().get_messages(Qgis.Warning)  # nothing else was searched: no hits
        assert any("No places found. Not searched: rmnp-rgb.tif, still being indexed" in m for m in warnings), warnings
        feedback = QgsProcessingFeedback()  # Processing's search says so in its log
        processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": proc.bind, "INDEX": "partial",
                                                         "SKETCH": str(sketch), "OUTPUT": "memory:"},
                       feedback=feedback)
        assert f"Not searched: {raster_root / 'rmnp-rgb.tif'}: still being indexed" in feedback.textLog()
        proc.stop()
        proc = WorkerProcess(index_root, raster_root, python=WORKER_PYTHON).start()
        qgis_iface.messageBar().clear_messages()
        dock.connect_worker(proc.bind)
        assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30)
        dock.search_button.click()
        assert process_until(lambda: not dock.searching and qgis_iface.messageBar().get_messages(Qgis.Warning), 60)
        warnings = qgis_iface.messageBar().get_messages(Qgis.Warning)
        assert any(re.search(r"Searched in part, still being indexed or stopped: rmnp-rgb.tif, \d+% indexed", m)
                   for m in warnings), warnings
        feedback = QgsProcessingFeedback()
        processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": proc.bind, "INDEX": "partial",
                                                         "SKETCH": str(sketch), "OUTPUT": "memory:"},
                       feedback=feedback)
        assert f"Searched in part: {raster_root / 'rmnp-rgb.tif'}: indexed in part (" in feedback.textLog()
    finally:
        proc.stop()
        dock.clear_sketch()
        dock.index_combo.clear()  # the next test waits for its own worker's list, not this one's


def test_an_error_reply_becomes_a_message(plugin, worker, qgis_iface, tmp_path):
    from PIL import Image

    dock = plugin.dock
    dock.connect_worker(worker.bind)
    assert process_until(lambda: dock.index_combo.count() > 0, 30)
    qgis_iface.messageBar().clear_messages()
    dock.load_sketch_image(str(tmp_path / "gone.png"))  # raised out of the file dialog's slot
    assert qgis_iface.messageBar().get_messages(Qgis.Warning)[-1].endswith(
        f"Cannot read {tmp_path / 'gone.png'} (No such file or directory): choose another image.")
    blank, notes = tmp_path / "blank.png", tmp_path / "notes.png"
    Image.new("L", (200, 200), 255).save(blank)
    notes.write_text("a user's notes")
    # the worker's words alone: a hint by the error's code ("Check the sketch or rasters.") was
    # wrong for most errors of its code (tile settings out of range), and PIL's named a BytesIO
    for image, said in ((blank, "sketch is blank: no dark strokes on a light background."),
                        (notes, "sketch is not a readable PNG/JPEG image (no image format recognised).")):
        dock.load_sketch_image(str(image))
        qgis_iface.messageBar().clear_messages()
        dock.search_button.click()
        assert process_until(lambda: qgis_iface.messageBar().get_messages(Qgis.Warning), 30)
        assert qgis_iface.messageBar().get_messages(Qgis.Warning)[0].endswith(f"Search failed: {said}")
    dock.clear_sketch()


def connected_to(dock, worker) -> None:
    dock.connect_worker(worker.bind)
    assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30), \
        dock.worker_panel.status_label.text()


def test_a_mosaic_missing_a_sheet_is_searched_and_its_unread_places_named(plugin, raster_root, rmnp_layer, qgis_iface,
                                                                            tmp_path):
    """A VRT mosaic whose eastern sheet was moved away: the whole mosaic was left out, "No places
    found. Not searched: mosaic.vrt, cannot be read". Its western sheet is searched now, and the
    dock's message and Processing's log name the places that could not be read."""
    import os
    import subprocess
    from pathlib import Path

    import processing
    from qgis.core import QgsProcessingFeedback

    from conftest import REPO, WORKER_PYTHON
    from lab.worker_process import WorkerProcess

    sheets, index_root = tmp_path / "sheets", tmp_path / "indexes"
    sheets.mkdir()
    index_root.mkdir()
    made = subprocess.run([WORKER_PYTHON, str(REPO / "tests" / "two_sheets.py"), str(raster_root / "rmnp-rgb.tif"),
                           str(sheets)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    mosaic, sketch = made.stdout.split()
    proc = WorkerProcess(index_root, sheets, python=WORKER_PYTHON).start()
    dock = plugin.dock
    try:
        assert proc.index("mosaic", [Path(mosaic)], tile=112, scales=[1, 2])["state"] == "done"
        (sheets / "east.tif").rename(sheets / "east.moved")
        qgis_iface.messageBar().clear_messages()
        dock.index_combo.clear()
        dock.connect_worker(proc.bind)
        assert process_until(lambda: dock.index_combo.findText("mosaic") >= 0, 30)
        dock.index_combo.setCurrentText("mosaic")
        dock.area_combo.setCurrentIndex(0)
        dock.load_sketch_image(sketch)
        dock.search_button.click()
        assert process_until(lambda: not dock.searching and qgis_iface.messageBar().get_messages(Qgis.Warning), 60)
        warnings = qgis_iface.messageBar().get_messages(Qgis.Warning)
        assert any(re.search(r"\d+ hit\(s\) in .* Places that cannot be read, left out: mosaic.vrt", m)
                   for m in warnings), warnings
        assert not any("Not searched" in m for m in warnings), warnings
        feedback = QgsProcessingFeedback()  # the same worker's second search says so too
        processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": proc.bind, "INDEX": "mosaic", "SKETCH": sketch,
                                                         "OUTPUT": "memory:"}, feedback=feedback)
        assert f"Places that cannot be read, left out: {mosaic}: " in feedback.textLog(), feedback.textLog()
    finally:
        proc.stop()
        dock.clear_sketch()
        dock.index_combo.clear()  # the next test waits for its own worker's list, not this one's


def ready_to_search(dock, worker, tmp_path) -> None:
    """The dock connected to `worker`, its index rmnp chosen and a line sketch loaded."""
    dock.index_combo.clear()  # the last test's list: this connect's own is waited for
    connected_to(dock, worker)
    assert process_until(lambda: dock.index_combo.count() > 0, 10)
    dock.index_combo.setCurrentText("rmnp")
    dock.load_sketch_image(str(line_sketch(tmp_path / "sketch.png")))


def test_connecting_again_during_a_search_gives_the_search_button_back(plugin, worker, rmnp_layer, tmp_path,
                                                                       qgis_iface):
    """The connection a search waits on is closed (Connect pressed again, or another worker): the
    search ends at once, saying so, and Search can be pressed again. It stayed greyed for good."""
    dock = plugin.dock
    ready_to_search(dock, worker, tmp_path)
    qgis_iface.messageBar().clear_messages()
    dock.search_button.click()
    assert dock.searching
    connected_to(dock, worker)
    assert not dock.searching
    assert any("Search stopped" in m for m in qgis_iface.messageBar().get_messages(Qgis.Info))
    dock.clear_sketch()


def test_search_can_be_cancelled_and_its_late_answer_adds_nothing(plugin, worker, rmnp_layer, tmp_path, qgis_iface):
    """A worker far away or frozen kept Search greyed for its whole time limit (70 s by default),
    with nothing to press. While a search runs, the button now cancels it, on the worker too (it
    ran it to its end, and the next search waited behind it); an answer adds no layer, and the
    next search runs as usual."""
    dock = plugin.dock
    ready_to_search(dock, worker, tmp_path)
    layers = set(QgsProject.instance().mapLayers())
    qgis_iface.messageBar().clear_messages()
    with worker.client() as c:  # answered once the worker's one search thread is free (an earlier test's)
        c.search("rmnp", sketch_png=line_sketch(tmp_path / "idle.png").read_bytes(), top=1)
    logged = len(worker.log.read_text())
    dock.search_button.click()
    assert dock.searching and dock.search_button.text() == "Cancel search", qgis_iface.messageBar().get_messages(Qgis.Warning)
    process_until(lambda: False, 0.1)  # sent, and taken by the worker's search thread
    dock.search_button.click()
    assert not dock.searching and dock.search_button.text() == "Search" and dock.again_button.isEnabled()
    assert any("Search stopped: cancelled" in m for m in qgis_iface.messageBar().get_messages(Qgis.Info))
    assert process_until(lambda: "cancelled by its client ended" in worker.log.read_text()[logged:], 10), \
        "the worker stopped the search"
    process_until(lambda: False, 1)  # a late answer would come meanwhile
    assert set(QgsProject.instance().mapLayers()) == layers, "a cancelled search's answer adds nothing"
    dock.search_button.click()
    assert process_until(lambda: len(set(QgsProject.instance().mapLayers()) - layers) == 1, 60)
    dock.clear_sketch()


def test_a_worker_gone_silent_or_killed_ends_the_search_soon_and_one_started_again_is_used(plugin, worker, rmnp_layer,
                                                                                          raster_root, tmp_path,
                                                                                          qgis_iface):
    """The probe's case: a worker at an endpoint killed (or frozen, its machine gone) left the
    light saying "connected", and each search waited its whole time limit, 70 s. A frozen worker
    is now dropped by ZeroMQ's heartbeat within some 20 s, a killed one at once; searches while
    it is gone fail at once; started again at the endpoint, it is used with no Connect pressed."""
    import os
    import signal

    from conftest import WORKER_PYTHON
    from lab.worker_process import WorkerProcess

    dock = plugin.dock
    own = WorkerProcess(worker.index_root, raster_root, python=WORKER_PYTHON).start()
    again = None
    try:
        ready_to_search(dock, own, tmp_path)
        qgis_iface.messageBar().clear_messages()
        os.kill(own.proc.pid, signal.SIGSTOP)  # frozen: its connection open, its heartbeat unanswered
        began = time.monotonic()
        dock.search_button.click()
        assert dock.searching
        assert process_until(lambda: not dock.searching, 40)
        assert time.monotonic() - began < 30, "ended by the heartbeat, not the search's time limit"
        assert any("dropped before it answered" in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning))
        assert dock.worker_panel.status_label.text().startswith("not answering")
        own.kill(signal.SIGKILL)
        qgis_iface.messageBar().clear_messages()
        dock.search_button.click()
        assert process_until(lambda: not dock.searching, 2), "failed at once while the worker is gone"
        again = WorkerProcess(worker.index_root, raster_root, bind=own.bind, python=WORKER_PYTHON).start()
        assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30), \
            dock.worker_panel.status_label.text()
        layers = set(QgsProject.instance().mapLayers())
        dock.search_button.click()
        assert process_until(lambda: len(set(QgsProject.instance().mapLayers()) - layers) == 1, 60)
    finally:
        for process in (own, again):
            if process is not None and process.proc.poll() is None:
                os.kill(process.proc.pid, signal.SIGCONT)
                process.stop()
        dock.clear_sketch()


def test_a_clicks_slip_is_no_stroke_and_a_sketch_drawn_tiny_is_refused_until_drawn_larger(plugin, rmnp_layer,
                                                                                          qgis_iface):
    """The probe's cases: a click whose mouse slipped 2 px counted as a stroke, and a place
    drawn some 10 px across (the map zoomed far out); each was searched, with confident hits in
    unrelated places. Zooming out after drawing (to search the map view) refuses nothing."""
    from qgis.core import Qgis

    dock = plugin.dock
    dock.clear_sketch()
    dock.draw_button.setChecked(True)
    dock.index_combo.addItem("rmnp")
    dock.index_combo.setCurrentText("rmnp")
    canvas = qgis_iface.mapCanvas()
    viewport = canvas.viewport()
    drag(viewport, [(300, 300), (302, 301)])
    assert dock.map_tool.strokes() == []
    drag(viewport, [(40, 40), (46, 44), (50, 50)])
    drag(viewport, [(40, 50), (50, 40)])
    qgis_iface.messageBar().clear_messages()
    assert dock.search_query() is None
    assert any("drawn 10 px across" in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning))
    dock.clear_sketch()
    canvas.setRotation(45)  # a 40 px line across the turned map: 28 px along each of the map's axes
    drag(viewport, [(40, 40), (80, 40)])
    qgis_iface.messageBar().clear_messages()
    assert dock.search_query() is not None, qgis_iface.messageBar().get_messages(Qgis.Warning)
    canvas.setRotation(0)
    dock.clear_sketch()
    drag(viewport, [(40, 40), (100, 80), (140, 140)])
    canvas.zoomByFactor(8.0)
    assert dock.search_query().strokes == dock.map_tool.strokes()
    dock.clear_sketch()


def test_a_sketch_drawn_on_the_pad_in_strokes_of_different_lengths_is_searched(plugin, worker, rmnp_layer, tmp_path,
                                                                              qgis_iface):
    """The pad sends its frame with the strokes: since the last stop's frame check, strokes of
    different lengths (every hand drawing) were answered `internal`, and no pad search worked."""
    dock = plugin.dock
    ready_to_search(dock, worker, tmp_path)
    dock.clear_sketch()
    drag(dock.pad, [(10, 12), (40, 30), (80, 20), (120, 60)])
    drag(dock.pad, [(20, 80), (90, 90)])
    layers = set(QgsProject.instance().mapLayers())
    qgis_iface.messageBar().clear_messages()
    dock.search_button.click()
    assert process_until(lambda: not dock.searching, 60)
    assert len(set(QgsProject.instance().mapLayers()) - layers) == 1, qgis_iface.messageBar().get_messages(Qgis.Warning)
    dock.clear_sketch()


def test_a_place_traced_larger_than_the_index_finds_is_said_with_its_hits(plugin, worker, rmnp_layer, tmp_path,
                                                                          qgis_iface):
    """Strokes across most of the raster (about 400 of its pixels) in an index of 112 px tiles at
    scales 1 and 2, which finds places up to about 360 px a side: the hits came with a green
    message, as if the place could be among them. The message says the place is too large and
    which scales would find it."""
    dock = plugin.dock
    ready_to_search(dock, worker, tmp_path)
    dock.area_combo.setCurrentIndex(0)
    dock.clear_sketch()
    dock.draw_button.setChecked(True)
    viewport = qgis_iface.mapCanvas().viewport()
    width, height = viewport.width(), viewport.height()
    drag(viewport, [(0.1 * width, 0.3 * height), (0.4 * width, 0.6 * height), (0.9 * width, 0.4 * height)])
    drag(viewport, [(0.2 * width, 0.7 * height), (0.7 * width, 0.35 * height)])
    dock.draw_button.setChecked(False)
    qgis_iface.messageBar().clear_messages()
    dock.search_button.click()
    assert process_until(lambda: not dock.searching and qgis_iface.messageBar().get_messages(Qgis.Warning), 60)
    warnings = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert any(re.search(r"\d+ hit\(s\) in .* rmnp-rgb\.tif: the place traced on the map is about [\d,]+ px of this raster "
                         r"a side, "
                         r"larger than the index finds .*: sketch a part of it, or search an index built with "
                         r"scales 1,2,4\.$", m) for m in warnings), warnings
    dock.clear_sketch()


def test_a_search_slower_than_it_could_be_says_why_with_its_hits(plugin, worker, qgis_iface, tmp_path):
    """A search that scanned every window although its index should have had a shortlist answer
    (minutes at 10M tiles, where the shortlist takes a third of a second) came with a green message:
    the reply's `scan` advice is said with the hits. The reply is the real worker's, to a search
    asking the shortlist of an index that has none; the dock asks `auto`, which an index of the
    tests' size never needs."""
    from sketch_search.user_requests import SearchQuery

    dock = plugin.dock
    ready_to_search(dock, worker, tmp_path)
    query = SearchQuery(index="rmnp", top=2, crs="EPSG:3857", sketch_png=line_sketch(tmp_path / "line.png").read_bytes())
    with worker.client() as c:
        reply = c.search("rmnp", sketch_png=query.sketch_png, top=2, crs=query.crs, ann="on")
    qgis_iface.messageBar().clear_messages()
    dock.controller._on_hits(reply, None, query, time.perf_counter())
    said = qgis_iface.messageBar().get_messages(Qgis.Info)
    assert any(re.search(r"2 hit\(s\) in \d+ ms, added as layer “Sketch search \d+: rmnp”\. rmnp: the index has "
                         r"no ANN shortlist; scanning exactly \(`build-ann` builds one", m) for m in said), said
    assert not qgis_iface.messageBar().get_messages(Qgis.Success)


def test_a_search_that_finds_nothing_says_where_and_adds_no_layer(plugin, worker, rmnp_layer, tmp_path, qgis_iface):
    """A map view with no indexed raster in it: the search said "0 hit(s)" as a success and added
    an empty layer."""
    dock = plugin.dock
    ready_to_search(dock, worker, tmp_path)
    canvas = qgis_iface.mapCanvas()
    shown = canvas.extent()
    canvas.setExtent(QgsRectangle(0, 0, 100_000, 100_000))  # the Gulf of Guinea in EPSG:3857, far from the raster
    dock.area_combo.setCurrentIndex(1)
    layers = set(QgsProject.instance().mapLayers())
    qgis_iface.messageBar().clear_messages()
    dock.search_button.click()
    assert process_until(lambda: not dock.searching, 60)
    assert set(QgsProject.instance().mapLayers()) == layers
    assert any("No places found in the map view" in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning))
    canvas.setExtent(shown)
    dock.area_combo.setCurrentIndex(0)
    dock.clear_sketch()


def test_the_light_turns_green_again_once_a_silent_worker_answers(plugin, worker, tmp_path):
    """A worker that did not answer in time (stopped, swapping) and answers later is shown connected
    again. A set-up begun and cancelled meanwhile does not turn the light green."""
    import signal

    from test_first_run import fake_checkout, set_up_running

    dock = plugin.dock
    dock.controller.connect_timeout_s = 1.0
    worker.proc.send_signal(signal.SIGSTOP)
    try:
        dock.connect_worker(worker.bind)
        assert process_until(lambda: dock.worker_panel.status_label.text() == "not answering", 20)
        with set_up_running(dock, fake_checkout(tmp_path / "checkout", "sleep 120\n"), worker.bind):
            assert dock.worker_panel.status_label.text() == "not answering"
            dock.controller.finder.cancel_setup()
            assert process_until(lambda: not dock.controller.finder.setting_up, 10)
            assert dock.worker_panel.status_label.text() == "not answering"
    finally:
        worker.proc.send_signal(signal.SIGCONT)
        dock.controller.connect_timeout_s = 10.0
    dock.index_panel.refresh_button.click()
    assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30), \
        dock.worker_panel.status_label.text()
    assert "model" in dock.worker_panel.status_label.text(), "who the worker is, asked again"


def test_an_endpoint_zeromq_cannot_dial_is_explained_and_the_connection_stays(plugin, worker, qgis_iface):
    from sketch_search.settings import Setting

    dock = plugin.dock
    connected_to(dock, worker)
    qgis_iface.messageBar().clear_messages()
    dock.worker_panel.endpoint_edit.setText("localhost:5555")
    dock.worker_panel.connect_button.click()
    [said] = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert "“localhost:5555”" in said and "tcp://HOST:PORT" in said
    assert dock.worker_panel.status_label.text().startswith("connected") and Setting.ENDPOINT.get() == worker.bind
    qgis_iface.messageBar().clear_messages()
    dock.worker_panel.endpoint_edit.setText("tcp://127.0.0.1:99999")  # ZeroMQ dials it; it was saved, then unanswered
    dock.worker_panel.connect_button.click()
    [said] = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert "a port is 1 to 65535" in said
    assert dock.worker_panel.status_label.text().startswith("connected") and Setting.ENDPOINT.get() == worker.bind
    dock.worker_panel.endpoint_edit.setText(worker.bind)


def test_a_reopened_project_s_results_keep_their_names(reloaded_plugin, worker, rmnp_layer, raster_root, tmp_path,
                                                      qgis_iface):
    """Results layers are numbered on from those in the project: a new session (a reloaded plugin,
    a reopened project) named its first search "Sketch search 1" beside another of that name. A
    new project's are numbered from its own: its first was "Sketch search 9", after the last's."""
    dock = reloaded_plugin.dock
    earlier = QgsVectorLayer("Polygon?crs=EPSG:3857", "Sketch search 7: rmnp", "memory")
    QgsProject.instance().addMapLayer(earlier)
    connected_to(dock, worker)
    assert process_until(lambda: dock.index_combo.count() > 0, 10)
    dock.index_combo.setCurrentText("rmnp")
    dock.load_sketch_image(str(line_sketch(tmp_path / "sketch.png")))
    dock.search_button.click()
    assert process_until(lambda: dock.controller.result_layer is not None and not dock.searching, 60)
    assert dock.controller.result_layer.name() == "Sketch search 8: rmnp"
    QgsProject.instance().clear()  # File > New Project
    show_rmnp(raster_root, qgis_iface)
    dock.search_button.click()
    assert process_until(lambda: dock.controller.result_layer is not None and not dock.searching, 60)
    assert dock.controller.result_layer.name() == "Sketch search 1: rmnp"
    dock.clear_sketch()


def test_results_searched_before_the_project_is_first_saved_are_kept_beside_it(plugin, worker, rmnp_layer, tmp_path,
                                                                               qgis_iface):
    """The probe's case: a search made before the project's first save stayed in the QGIS
    profile's results.gpkg, named by an absolute path: the saved project, opened on another
    machine or after a profile reset, had lost it. Saving writes it beside the project, its mark
    and query kept, and takes it out of the profile; the project read from another folder has it."""
    import shutil
    import sqlite3

    from sketch_search.results import saved_query, set_mark, unsaved_results_file

    dock, project = plugin.dock, QgsProject.instance()
    ready_to_search(dock, worker, tmp_path)
    dock.search_button.click()
    assert process_until(lambda: not dock.searching and dock.controller.result_layer is not None, 60)
    layer = dock.controller.result_layer
    path, table = layer.source().split("|layername=")
    assert path == str(unsaved_results_file())
    marked = min(f.id() for f in layer.getFeatures())
    assert set_mark(layer, marked, 1)
    name, query, count = layer.name(), saved_query(layer), layer.featureCount()
    (tmp_path / "survey").mkdir()
    qgis_iface.messageBar().clear_messages()
    project.setFileName(str(tmp_path / "survey" / "survey.qgz"))  # as QGIS's Save and Save As do, then write
    assert project.write()
    assert layer.source().split("|")[0] == str(tmp_path / "survey" / "survey_sketch_search.gpkg")
    assert any("now kept beside it" in m for m in qgis_iface.messageBar().get_messages(Qgis.Info))
    with sqlite3.connect(path) as db:
        assert table not in {row[0] for row in db.execute("SELECT table_name FROM gpkg_contents")}
    shutil.copytree(tmp_path / "survey", tmp_path / "moved")
    project.clear()
    assert project.read(str(tmp_path / "moved" / "survey.qgz"))
    [reopened] = [lay for lay in project.mapLayers().values() if lay.name() == name]
    assert reopened.isValid() and reopened.source().startswith(str(tmp_path / "moved"))
    assert reopened.featureCount() == count and saved_query(reopened) == query
    assert [f["feedback"] for f in reopened.getFeatures() if f.id() == marked] == [1]
    project.clear()
    dock.clear_sketch()


def test_a_worker_that_is_down_gives_a_message_and_the_ui_stays_live(plugin, qgis_iface):
    from lab.worker_process import free_port

    dock = plugin.dock
    qgis_iface.messageBar().clear_messages()
    dock.controller.connect_timeout_s = 1.5
    try:
        dock.connect_worker(f"tcp://127.0.0.1:{free_port()}")
    finally:
        dock.controller.connect_timeout_s = 10.0
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(50)
    assert process_until(lambda: qgis_iface.messageBar().get_messages(Qgis.Warning), 20)
    timer.stop()
    assert len(ticks) > 10, "the event loop kept running while the worker was silent"
    assert "Is the worker running" in qgis_iface.messageBar().get_messages(Qgis.Warning)[0]
    assert dock.worker_panel.status_label.text() == "not answering"


def small_raster_layer(raster_root, name: str = "small"):
    """A corner of the sample raster, 40 px a side: smaller than any tile, so it holds none to
    search. In the project (removed with the others)."""
    from osgeo import gdal
    from qgis.core import QgsProject, QgsRasterLayer

    path = raster_root / f"{name}.tif"
    gdal.Translate(str(path), str(raster_root / "rmnp-rgb.tif"), srcWin=[0, 0, 40, 40])
    layer = QgsRasterLayer(str(path), name)
    assert layer.isValid()
    return QgsProject.instance().addMapLayer(layer)


def test_processing_algorithms_run(plugin, worker, rmnp_layer, raster_root, tmp_path, monkeypatch):
    """Processing builds an index (its log naming a raster it holds no tile of) and searches it,
    the hits in the project's CRS; what the reply says of its scan is logged (asked here of a
    shortlist the index has none of: the algorithm asks `auto`, which so small an index never needs)."""
    import processing
    from qgis.core import QgsProcessingException, QgsProcessingFeedback
    from sketch_search.processing_provider import WorkerClient

    layer, small = rmnp_layer, small_raster_layer(raster_root)
    asked_in, search = [], WorkerClient.search
    monkeypatch.setattr(WorkerClient, "search",
                        lambda self, *a, **kw: asked_in.append(kw["crs"]) or search(self, *a, **kw, ann="on"))
    build = {"ENDPOINT": f" {worker.bind} ", "INDEX": "from-processing ", "RASTERS": [layer, small], "TILE": 224,
             "SCALES": "1", "OVERLAP": 0.5, "BANDS": "1,2,3"}  # spaces as pasted: was a second index, "… "
    feedback = QgsProcessingFeedback()
    built = processing.run("sketchsearch:build_index", build, feedback=feedback)
    with worker.client() as client:
        [(held, tiling)] = [(i["tile_count"], i["tiling"]) for i in client.list_indexes()
                            if i["name"] == "from-processing"]
    assert built["INDEX"] == "from-processing" and built["TILES"] == held > 0
    assert (tiling["overlap"], tiling["bands"]) == (0.5, [1, 2, 3])
    assert f"Not searchable: {small.source()}: no tile with enough data to search" in feedback.textLog()
    assert "rmnp-rgb.tif: no tile" not in feedback.textLog()
    assert processing.run("sketchsearch:build_index", build)["TILES"] == held, "run again: what the index holds"
    sketch = line_sketch(tmp_path / "SKETCH.PNG")  # as a camera or scanner names it: was refused by QGIS's check
    feedback = QgsProcessingFeedback()
    result = processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": worker.bind, "INDEX": "from-processing",
                                                              "SKETCH": str(sketch), "TOP": 2, "OUTPUT": "memory:"},
                            feedback=feedback)
    hits = result["OUTPUT"]
    assert hits.featureCount() == 2 and "rank" in hits.fields().names() and "2 hit(s) in" in feedback.textLog()
    assert "from-processing: the index has no ANN shortlist; scanning exactly" in feedback.textLog()
    project_crs = QgsProject.instance().crs()
    assert project_crs.isValid() and project_crs != layer.crs()
    assert hits.crs() == project_crs and asked_in == ["EPSG:3857"]  # asked in the project's CRS, as the dock asks
    on_raster = QgsCoordinateTransform(layer.crs(), project_crs, QgsProject.instance()).transformBoundingBox(layer.extent())
    centres = [f.geometry().centroid().asPoint() for f in hits.getFeatures()]
    assert all(on_raster.contains(c) for c in centres), (on_raster.toString(), centres)
    (tmp_path / "a file").write_text("")
    with pytest.raises(QgsProcessingException, match="Could not create layer .*hits.gpkg"):  # said before the search
        processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": worker.bind, "INDEX": "from-processing",
                                                         "SKETCH": str(sketch), "TOP": 2,
                                                         "OUTPUT": str(tmp_path / "a file" / "hits.gpkg")})
    assert len(asked_in) == 1, "the search ran, and its hits were lost"
    del hits, layer, small


def test_a_failed_processing_search_keeps_the_last_hits_and_any_image_name_is_a_sketch(plugin, worker, tmp_path):
    """A search into the file of the last run's hits, failing (an index name mistyped), left the
    GeoPackage empty of them: the output was made before the search. It is made once there are
    hits. A sketch named "sketch.Png" was refused by QGIS's check of its suffix alone (probe)."""
    import processing
    from qgis.core import (QgsProcessing, QgsProcessingContext, QgsProcessingException,
                           QgsProcessingOutputLayerDefinition, QgsVectorLayer)

    sketch = line_sketch(tmp_path / "sketch.Png")
    kept = tmp_path / "hits.gpkg"
    search = {"ENDPOINT": worker.bind, "INDEX": "rmnp", "SKETCH": str(sketch), "TOP": 3, "OUTPUT": str(kept)}
    processing.run("sketchsearch:search_by_sketch", search)
    assert QgsVectorLayer(str(kept), "hits").featureCount() == 3
    # as the Processing dialog runs it, its output to be loaded into the project: a failed run
    # registered the last run's file as its own, which the dialog then loaded (review)
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    into_project = {**search, "INDEX": "rnmp", "OUTPUT": QgsProcessingOutputLayerDefinition(str(kept),
                                                                                            QgsProject.instance())}
    with pytest.raises(QgsProcessingException, match="rnmp"):
        processing.run("sketchsearch:search_by_sketch", into_project, context=context)
    assert QgsVectorLayer(str(kept), "hits").featureCount() == 3, "the last run's hits kept"
    assert list(context.layersToLoadOnCompletion()) == [], "nothing of the failed run to load"
    temporary = QgsProcessingOutputLayerDefinition(QgsProcessing.TEMPORARY_OUTPUT, QgsProject.instance())
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    done = processing.run("sketchsearch:search_by_sketch", {**search, "OUTPUT": temporary}, context=context)
    assert list(context.layersToLoadOnCompletion()) == [done["OUTPUT"].id()], "the hits alone, to load"


def test_a_processing_search_takes_an_area_and_a_crs_for_its_hits(plugin, worker, raster_root, tmp_path):
    """A Processing search searched the whole index in the project's CRS: the worker's advice of
    a smaller area or another CRS could not be followed there (probe)."""
    import processing
    from qgis.core import QgsGeometry, QgsProcessingException, QgsProcessingFeedback, QgsRectangle

    layer = QgsRasterLayer(str(raster_root / "rmnp-rgb.tif"), "rmnp")
    box = layer.extent()  # the raster is in EPSG:4326
    east = QgsRectangle(box.center().x(), box.yMinimum(), box.xMaximum(), box.yMaximum())
    search = {"ENDPOINT": worker.bind, "INDEX": "rmnp", "SKETCH": str(line_sketch(tmp_path / "sketch.png")),
              "TOP": 5, "OUTPUT": "memory:", "OUTPUT_CRS": "EPSG:32613",
              "AREA": f"{east.xMinimum()},{east.xMaximum()},{east.yMinimum()},{east.yMaximum()} [EPSG:4326]"}
    hits = processing.run("sketchsearch:search_by_sketch", search)["OUTPUT"]
    assert hits.crs().authid() == "EPSG:32613" and hits.featureCount() > 0
    to_utm = QgsCoordinateTransform(layer.crs(), hits.crs(), QgsProject.instance())
    area = QgsGeometry.fromRect(to_utm.transformBoundingBox(east))
    assert all(f.geometry().intersects(area) for f in hits.getFeatures()), "every hit meets the area"
    feedback = QgsProcessingFeedback()
    everywhere = processing.run("sketchsearch:search_by_sketch", {**search, "AREA": None, "TOP": 1000},
                                feedback=feedback)["OUTPUT"]
    assert everywhere.featureCount() < 1000 and "Fewer hits than the 1000 asked" in feedback.textLog()
    assert not all(f.geometry().intersects(area) for f in everywhere.getFeatures()), "the area changed the search"
    feedback = QgsProcessingFeedback()
    nowhere = processing.run("sketchsearch:search_by_sketch", {**search, "AREA": "10,11,10,11 [EPSG:4326]"},
                             feedback=feedback)["OUTPUT"]
    assert nowhere.featureCount() == 0 and "No places found in the search area" in feedback.textLog()
    with pytest.raises(QgsProcessingException, match="QGIS knows no CRS 'FOO:1'"):  # was read in the project's
        processing.run("sketchsearch:search_by_sketch", {**search, "AREA": "10,11,10,11 [FOO:1]"})
    flat = f"{east.xMinimum()},{east.xMinimum()},{east.yMinimum()},{east.yMaximum()} [EPSG:4326]"
    with pytest.raises(QgsProcessingException, match="no width or height"):
        processing.run("sketchsearch:search_by_sketch", {**search, "AREA": flat})
    del hits, everywhere, nowhere, layer  # left to the interpreter's exit, a layer crashes QGIS there


def test_a_raster_layer_opened_by_a_relative_path_is_indexed_by_its_whole_path(plugin, raster_root, monkeypatch):
    """qgis_process, or a model run from a folder, opens a raster by a relative path; the worker
    resolved it from its own folder, and indexed another file of that name there (probe)."""
    from sketch_search.raster_layers import raster_file

    monkeypatch.chdir(raster_root)
    layer = QgsRasterLayer("rmnp-rgb.tif", "relative")
    assert layer.isValid()
    path, why_not = raster_file(layer)
    assert os.path.isabs(path) and os.path.realpath(path) == os.path.realpath(raster_root / "rmnp-rgb.tif"), path


def test_a_processing_run_answered_by_no_worker_says_so_without_a_traceback(plugin, tmp_path):
    """A service at the endpoint that is no sketch search worker (garbage, or an "ok" without the
    worker's fields) gave Processing's user a Python traceback (probe)."""
    import json
    import threading

    import processing
    import zmq
    from qgis.core import QgsProcessingException

    from lab.worker_process import free_port

    sketch = line_sketch(tmp_path / "sketch.png")
    for answer in ([b"not json"], [json.dumps({"v": 1, "id": None, "ok": True}).encode()]):
        other = zmq.Context.instance().socket(zmq.ROUTER)
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        other.bind(endpoint)

        done = threading.Event()

        def answer_all(other=other, answer=answer, done=done) -> None:
            while not done.is_set():
                if other.poll(100):
                    identity, delimiter, *_ = other.recv_multipart()  # a REQ client's envelope
                    other.send_multipart([identity, delimiter, *answer])

        serving = threading.Thread(target=answer_all, daemon=True)
        serving.start()
        try:
            with pytest.raises(QgsProcessingException) as refused:
                processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": endpoint, "INDEX": "any",
                                                                  "SKETCH": str(sketch), "OUTPUT": "memory:"})
        finally:
            done.set()
            serving.join(5)
            other.close(linger=0)
        said = str(refused.value)
        assert "not as a sketch search worker" in said and "Traceback" not in said, said


def test_cancelling_a_processing_build_that_joined_another_runs_job_leaves_that_job_running(plugin, worker,
                                                                                            raster_root, tmp_path):
    """Two builds of one index share its job: the second run's Cancel stopped it, and the run
    that started it failed (probe). A run that joined a job stops following it; the job goes on."""
    import shutil

    import processing
    from qgis.core import QgsProcessingFeedback

    from lab.worker_process import wait_job
    from worker.assets import load_asset_paths

    shutil.copy(load_asset_paths()["s2_rgb"], raster_root / "s2-shared.tif")
    layer = QgsRasterLayer(str(raster_root / "s2-shared.tif"), "s2")
    QgsProject.instance().addMapLayer(layer)

    class CancelOnceFollowing(QgsProcessingFeedback):
        def setProgress(self, progress: float) -> None:  # noqa: N802 (a poll of the job: the run follows it)
            super().setProgress(progress)
            self.cancel()

    feedback = CancelOnceFollowing()
    try:
        with worker.client() as other_run:
            job = other_run.start_index("shared", [str(raster_root / "s2-shared.tif")], tile=32, scales=[1])
            result = processing.run("sketchsearch:build_index", {"ENDPOINT": worker.bind, "INDEX": "shared",
                                                                 "RASTERS": [layer], "TILE": 32, "SCALES": "1"},
                                    feedback=feedback)
            assert result.get("TILES") is None and "goes on in the worker" in feedback.textLog()
            assert other_run.job(job["id"])["state"] in ("queued", "running"), "the other run's job goes on"
            other_run.cancel(job["id"])
            wait_job(other_run, job["id"])
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
        with worker.client() as c:
            c.request("delete_index", index="shared")
        (raster_root / "s2-shared.tif").unlink()


ACROSS_180 = """
import sys
from pathlib import Path
import rasterio, rasterio.warp
from rasterio.crs import CRS
from rasterio.transform import from_origin
from lab.pseudo_sketch import pseudo_sketch
from worker.assets import load_asset_paths
from worker.placement import Placement
from worker.tiling import open_raster
pacific = CRS.from_epsg(3832)  # Mercator centred on the Pacific: x runs on across 180 degrees
x180 = float(rasterio.warp.transform(CRS.from_epsg(4326), pacific, [180.0], [-17.0])[0][0])
with rasterio.open(load_asset_paths()["rmnp_rgb"]) as src:
    pixels, profile = src.read(), src.profile
profile.update(crs=pacific, transform=from_origin(x180 - 7000, -1_900_000, 30, 30))
with rasterio.open(sys.argv[1], "w", **profile) as out:
    out.write(pixels)
place = Placement(open_raster(sys.argv[1], None), cx=233, cy=180, side=112.0)  # on 180 degrees
pseudo_sketch(place.read(224)[0], "canny").save(sys.argv[2])
"""


def test_a_processing_search_in_lon_lat_keeps_a_hit_across_180_whole(plugin, worker, raster_root, tmp_path):
    """A raster over Fiji across 180 degrees, searched by Processing in a lon/lat project: each
    hit's footprint is one polygon a few kilometres wide, past 180 where it crosses it (as the
    worker draws it for the dock's zoom), not a sliver round the world."""
    import subprocess

    import processing

    from conftest import REPO, WORKER_PYTHON

    across, sketch = raster_root / "across-180.tif", tmp_path / "sketch.png"
    subprocess.run([WORKER_PYTHON, "-c", ACROSS_180, str(across), str(sketch)], cwd=REPO, check=True, timeout=300)
    layer = QgsRasterLayer(str(across), "across")
    assert layer.isValid()
    project = QgsProject.instance()
    project.setCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    try:
        processing.run("sketchsearch:build_index", {"ENDPOINT": worker.bind, "INDEX": "across-180", "RASTERS": [layer],
                                                    "TILE": 112, "SCALES": "1"})
        hits = processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": worker.bind, "INDEX": "across-180",
                                                                "SKETCH": str(sketch), "TOP": 5,
                                                                "OUTPUT": "memory:"})["OUTPUT"]
        boxes = [f.geometry().boundingBox() for f in hits.getFeatures()]
        assert hits.crs().authid() == "EPSG:4326" and len(boxes) == 5
        assert all(box.width() < 0.1 for box in boxes), [box.toString() for box in boxes]  # 112 px of 30 m: ~0.03
        assert any(box.xMinimum() < 180 < box.xMaximum() for box in boxes), [box.toString() for box in boxes]
        del hits
    finally:
        project.setCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
        with worker.client() as client:  # the session's worker serves the next tests without it
            client.request("delete_index", index="across-180")
        across.unlink()


def test_a_processing_endpoint_zeromq_cannot_dial_is_explained(plugin, tmp_path):
    import processing
    from qgis.core import QgsProcessingException

    sketch = line_sketch(tmp_path / "sketch.png")
    with pytest.raises(QgsProcessingException, match="tcp://HOST:PORT"):
        processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": "localhost:5555", "INDEX": "any",
                                                          "SKETCH": str(sketch), "OUTPUT": "memory:"})


def test_a_processing_run_refuses_what_it_cannot_use_before_asking_the_worker(plugin, raster_root, tmp_path):
    """A sketch file that is not there was a Python traceback; a raster layer that is no file (a
    GeoPackage's, an in-memory one) sank the whole build with the worker's words on GDAL virtual
    file systems. Both are said before any worker is asked (none runs at this endpoint)."""
    import processing
    from osgeo import gdal
    from qgis.core import QgsProcessingException

    from lab.worker_process import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    in_memory = "/vsimem/sketch-search-test.tif"
    gdal.Translate(in_memory, str(raster_root / "rmnp-rgb.tif"))
    # in the project: a layer a refused run's traceback holds, left to the interpreter's exit, crashes QGIS
    layers = [QgsRasterLayer(in_memory, "in memory"), QgsRasterLayer(str(raster_root / "rmnp-rgb.tif"), "on disk")]
    QgsProject.instance().addMapLayers(layers)
    try:
        assert all(layer.isValid() for layer in layers)
        refused = r"^in memory: not a file \(a GDAL virtual path, .*\): save it as a GeoTIFF.*Nothing was indexed"
        with pytest.raises(QgsProcessingException, match=refused):
            processing.run("sketchsearch:build_index", {"ENDPOINT": endpoint, "INDEX": "any", "RASTERS": layers})
    finally:
        QgsProject.instance().removeMapLayers([layer.id() for layer in layers])
        gdal.Unlink(in_memory)
    with pytest.raises(QgsProcessingException, match="nope.png cannot be read: No such file"):
        processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": endpoint, "INDEX": "any",
                                                          "SKETCH": str(tmp_path / "nope.png"), "OUTPUT": "memory:"})


def test_a_processing_run_is_told_within_seconds_that_no_worker_answers_or_that_it_was_killed(plugin, tmp_path):
    """No worker at the endpoint, or one killed mid-build: a run waited 4 minutes (two waits of
    120 s) and said only "no reply". It is told within seconds, with what to do."""
    import shutil
    import threading

    import processing
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    from conftest import WORKER_PYTHON
    from lab.worker_process import WorkerProcess, free_port
    from worker.assets import load_asset_paths

    sketch = line_sketch(tmp_path / "sketch.png")
    asked = time.monotonic()
    with pytest.raises(QgsProcessingException, match="Is the worker running"):
        processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": f"tcp://127.0.0.1:{free_port()}", "INDEX": "any",
                                                          "SKETCH": str(sketch), "OUTPUT": "memory:"})
    assert time.monotonic() - asked < 30, "told within seconds"

    rasters, index_root = tmp_path / "rasters", tmp_path / "indexes"
    rasters.mkdir()
    index_root.mkdir()
    shutil.copy(load_asset_paths()["s2_rgb"], rasters / "s2.tif")  # thousands of tiles at 32 px: still running
    proc = WorkerProcess(index_root, rasters, python=WORKER_PYTHON).start()
    feedback, killed_at, layer = QgsProcessingFeedback(), [], QgsRasterLayer(str(rasters / "s2.tif"), "s2")
    QgsProject.instance().addMapLayer(layer)  # a layer a refused run's traceback holds crashes QGIS at exit otherwise

    def kill_once_running() -> None:
        deadline = time.monotonic() + 120
        while feedback.progress() <= 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_at.append(time.monotonic())
        proc.proc.kill()

    killer = threading.Thread(target=kill_once_running, daemon=True)
    killer.start()
    try:
        with pytest.raises(QgsProcessingException, match="the worker stopped or was killed.*Is the worker running"):
            processing.run("sketchsearch:build_index", {"ENDPOINT": proc.bind, "INDEX": "killed", "RASTERS": [layer],
                                                        "TILE": 32, "SCALES": "1"}, feedback=feedback)
        killer.join(10)
        assert feedback.progress() > 0 and time.monotonic() - killed_at[0] < 5, "told at once"
    finally:
        proc.stop()
        QgsProject.instance().removeMapLayer(layer.id())


def test_cancel_stops_a_processing_search_waiting_on_a_worker_that_does_not_answer(plugin, tmp_path):
    """A hung worker (it takes requests and never answers): Cancel in the Processing dialog ends the
    search at once, not after the client's two waits of 120 s, and writes no hits."""
    import threading

    import processing
    import zmq
    from PIL import Image
    from qgis.core import QgsProcessingFeedback

    from lab.worker_process import free_port

    sketch = tmp_path / "sketch.png"
    Image.new("L", (64, 64), 255).save(sketch)
    hung = zmq.Context.instance().socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    hung.bind(endpoint)
    feedback = QgsProcessingFeedback()
    later = threading.Timer(1.0, feedback.cancel)
    try:
        later.start()
        started = time.monotonic()
        result = processing.run("sketchsearch:search_by_sketch", {"ENDPOINT": endpoint, "INDEX": "any",
                                                                  "SKETCH": str(sketch), "OUTPUT": "memory:"},
                                feedback=feedback)
        waited = time.monotonic() - started
    finally:
        later.cancel()
        hung.close(linger=0)
    assert waited < 30, f"waited {waited:.0f} s after Cancel"
    assert "OUTPUT" not in result


def test_cancel_ends_a_processing_build_at_once_whether_or_not_the_worker_answers(plugin, tmp_path):
    """Cancel during a Processing build: a worker that answers stops the job and the run reports
    the tiles kept; a hung one (a real worker, stopped with SIGSTOP mid-job) is given up on
    within seconds, with a warning that its job may still run, not after the client's two
    waits of 120 s for each of its requests. A job cancelled by another client (the dock's
    Indexing list) fails the run: it ended as a success, and a model searched a part of the index."""
    import json
    import shutil
    import signal
    import threading

    import processing
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    from conftest import WORKER_PYTHON
    from lab.worker_process import WorkerProcess
    from worker.assets import load_asset_paths

    rasters, index_root = tmp_path / "rasters", tmp_path / "indexes"
    rasters.mkdir()
    index_root.mkdir()
    shutil.copy(load_asset_paths()["s2_rgb"], rasters / "s2.tif")  # thousands of tiles at 32 px: still running
    layer = QgsRasterLayer(str(rasters / "s2.tif"), "s2")
    QgsProject.instance().addMapLayer(layer)  # the project's to delete: a failed run's traceback holds it to the exit
    proc = WorkerProcess(index_root, rasters, python=WORKER_PYTHON).start()

    def build(index: str, hang: bool, elsewhere: bool = False) -> tuple[dict, float, str]:
        """Run the build, cancelled once it reports progress (the worker stopped first if `hang`;
        by another client if `elsewhere`): its outputs, the seconds from Cancel to its end, and its log."""
        feedback, cancelled_at = QgsProcessingFeedback(), []

        def cancel_once_running() -> None:
            while feedback.progress() <= 0 and not feedback.isCanceled():
                time.sleep(0.05)
            if hang:
                proc.proc.send_signal(signal.SIGSTOP)
            cancelled_at.append(time.monotonic())
            if elsewhere:
                with proc.client() as other:
                    [running] = [i["job"] for i in other.list_indexes() if i["name"] == index]
                    other.cancel(running)
            else:
                feedback.cancel()

        canceller = threading.Thread(target=cancel_once_running, daemon=True)
        canceller.start()
        try:
            result = processing.run("sketchsearch:build_index", {"ENDPOINT": proc.bind, "INDEX": index,
                                                                 "RASTERS": [layer], "TILE": 32, "SCALES": "1"},
                                    feedback=feedback)
        finally:
            feedback.cancel()  # the canceller ends, whatever happened
            canceller.join(10)
        return result, time.monotonic() - cancelled_at[0], feedback.textLog()

    try:
        result, waited, log = build("answering", hang=False)
        assert waited < 15, f"waited {waited:.0f} s after Cancel"
        # the tiles the index holds: those of chunks committed before the Cancel (the run's progress
        # was reported, tiles of the chunk under way that were never kept)
        manifest = index_root / "answering" / "manifest.json"
        held = json.loads(manifest.read_text())["tile_count"] if manifest.exists() else 0
        assert result == {"INDEX": "answering", "TILES": held} and "cancelled: the index holds" in log, log
        with pytest.raises(QgsProcessingException, match=r"^Indexing job \S+ was cancelled elsewhere \(the dock's "
                                                         r"Indexing list, or another client\), not by this run: the "
                                                         r"index holds \d+ tiles\. Run this build again"):
            build("elsewhere", hang=False, elsewhere=True)
        with proc.client() as other:  # a build queued behind another client's job says so, and can be cancelled
            first = other.start_index("first", [str(rasters / "s2.tif")], tile=32, scales=[1])
            feedback = QgsProcessingFeedback()

            def cancel_once_queued() -> None:
                deadline = time.monotonic() + 30
                while "Queued:" not in feedback.textLog() and time.monotonic() < deadline:
                    time.sleep(0.05)
                feedback.cancel()

            queued = threading.Thread(target=cancel_once_queued, daemon=True)
            queued.start()
            waiting = processing.run("sketchsearch:build_index", {"ENDPOINT": proc.bind, "INDEX": "second",
                                                                  "RASTERS": [layer], "TILE": 32, "SCALES": "1"},
                                     feedback=feedback)
            queued.join(10)
            other.cancel(first["id"])
        assert "Queued: the worker is running another indexing job" in feedback.textLog(), feedback.textLog()
        assert waiting == {"INDEX": "second", "TILES": 0}, waiting
        result, waited, log = build("hung", hang=True)
        assert waited < 30, f"waited {waited:.0f} s after Cancel"
        assert "INDEX" not in result and "did not confirm that indexing job" in log and "may still be running" in log, log
    finally:
        proc.proc.send_signal(signal.SIGCONT)
        proc.stop()
        QgsProject.instance().removeMapLayer(layer.id())


@contextmanager
def encrypted_worker(dock, raster_root, tmp_path, *extra):
    """A worker that serves only CURVE clients (as one serving other machines must), the keys
    chosen in the plugin's settings and the dock connected to it; after: the keys reset, the
    worker stopped."""
    from conftest import WORKER_PYTHON
    from lab.worker_process import WorkerProcess, make_curve_keys
    from sketch_search.settings import Setting

    keys, good = make_curve_keys(tmp_path)
    index_root = tmp_path / "indexes"
    index_root.mkdir()
    proc = WorkerProcess(index_root, raster_root, extra=["--curve-keys", str(keys), *extra],
                         python=WORKER_PYTHON).start(curve=good)
    try:
        Setting.SERVER_KEY.set(str(keys / "server.key"))
        Setting.CLIENT_KEY.set(str(keys / "authorized_clients" / "client.key_secret"))
        dock.connect_worker(proc.bind)
        assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30), \
            dock.worker_panel.status_label.text()
        yield proc
    finally:
        Setting.SERVER_KEY.reset()
        Setting.CLIENT_KEY.reset()
        proc.stop()


def test_connecting_to_a_curve_protected_worker_needs_the_keys(plugin, raster_root, tmp_path, qgis_iface):
    import processing

    from sketch_search.settings import Setting

    dock = plugin.dock
    try:
        with encrypted_worker(dock, raster_root, tmp_path) as proc:
            layer = QgsRasterLayer(str(raster_root / "rmnp-rgb.tif"), "rmnp")  # Processing reaches it with the same keys
            built = processing.run("sketchsearch:build_index", {"ENDPOINT": proc.bind, "INDEX": "encrypted",
                                                                "RASTERS": [layer], "TILE": 224, "SCALES": "1"})
            assert built["TILES"] > 0
            del layer
            Setting.SERVER_KEY.reset()
            Setting.CLIENT_KEY.reset()
            qgis_iface.messageBar().clear_messages()
            dock.controller.connect_timeout_s = 1.5
            dock.connect_worker(proc.bind)
            assert process_until(lambda: dock.worker_panel.status_label.text() == "not answering", 20)
    finally:
        dock.controller.connect_timeout_s = 10.0


def test_a_worker_that_drops_the_plugins_connection_never_freezes_qgis(plugin, raster_root, tmp_path):
    """A worker serving only clients with its keys drops the connection of one without them, a
    second or so after it connects, and ZeroMQ does not dial it again: the next request sent on
    it waited in a blocking send, and QGIS's main thread froze for good (a CI run hung there).
    It now fails at once, saying why, and the link dials afresh."""
    import signal

    import zmq

    from conftest import WORKER_PYTHON
    from lab.worker_process import WorkerProcess, make_curve_keys
    from sketch_search.wire import errors as codes
    from sketch_search.worker_link import WorkerLink

    def frozen(*_):
        raise TimeoutError("a request blocked QGIS's main thread")

    keys, good = make_curve_keys(tmp_path)
    (tmp_path / "indexes").mkdir()
    proc = WorkerProcess(tmp_path / "indexes", raster_root, extra=["--curve-keys", str(keys)],
                         python=WORKER_PYTHON).start(curve=good)
    link = WorkerLink(proc.bind, timeout_s=60)  # no keys
    errors = []
    previous = signal.signal(signal.SIGALRM, frozen)
    try:
        link.request("ping", lambda reply, error: errors.append(error))
        # the worker drops the connection a second or so on: nothing then takes a message (ZeroMQ may
        # dial again later, and a message sent then is lost with that connection: answered at its timeout)
        assert process_until(lambda: not link._sock.poll(0, zmq.POLLOUT), 10), "the connection was never dropped"
        signal.alarm(20)
        link.request("ping", lambda reply, error: errors.append(error), timeout_s=5)
        assert process_until(lambda: errors, 10)
        signal.alarm(0)
        assert errors[0].code == codes.UNAVAILABLE and ("keys" in errors[0].message or "no reply" in errors[0].message)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        link.close(tell_waiting=False)
        proc.stop()


def test_a_worker_serving_every_interface_sends_progress_where_it_was_reached(plugin, raster_root, rmnp_layer,
                                                                             qgis_iface, tmp_path):
    """A worker serving a team binds every interface (tcp://*:PORT) and names its progress
    endpoint so; the plugin dials that at the host it reached the worker at, and an index job's
    progress and end arrive (they come only as events)."""
    from lab.worker_process import free_port

    dock = plugin.dock
    with encrypted_worker(dock, raster_root, tmp_path, "--pub", f"tcp://*:{free_port()}"):
        assert dock.controller.link.subscribed
        panel = dock.index_panel
        panel.refresh_raster_layers()
        panel.table.clearSelection()
        panel.name_edit.setText("everywhere")
        qgis_iface.messageBar().clear_messages()
        panel.build_button.click()
        assert process_until(lambda: any("Indexing done" in m for m in qgis_iface.messageBar().get_messages(Qgis.Success)),
                             120), qgis_iface.messageBar().get_messages(Qgis.Warning)


def test_a_job_followed_when_the_plugin_is_reloaded_is_followed_again(plugin, tmp_path):
    """Reloaded (or QGIS started again, its local worker going on with the job), the dock's bar
    showed a bare "%p%" and Cancel was off, while the index's row said the job ran."""
    import shutil

    import qgis.utils
    from qgis.core import QgsRasterLayer

    from conftest import WORKER_PYTHON
    from lab.worker_process import WorkerProcess
    from worker.assets import load_asset_paths

    rasters, index_root = tmp_path / "rasters", tmp_path / "indexes"
    rasters.mkdir()
    index_root.mkdir()
    shutil.copy(load_asset_paths()["s2_rgb"], rasters / "s2.tif")  # thousands of tiles at 32 px: still running
    proc = WorkerProcess(index_root, rasters, python=WORKER_PYTHON).start()
    layer = QgsRasterLayer(str(rasters / "s2.tif"), "s2 to follow")
    QgsProject.instance().addMapLayer(layer)
    try:
        dock = plugin.dock
        connected_to(dock, proc)
        panel = dock.index_panel
        panel.refresh_raster_layers()
        for i in range(panel.raster_list.count()):
            item = panel.raster_list.item(i)
            if item.flags() & Qt.ItemIsUserCheckable:
                item.setCheckState(Qt.Checked if item.text() == "s2 to follow" else Qt.Unchecked)
        panel.table.clearSelection()
        panel.name_edit.setText("followed")
        panel.tiling_form.tile_spin.setValue(32)
        panel.tiling_form.scales_edit.setText("1")
        panel.build_button.click()
        assert process_until(lambda: panel.progress.format().startswith("running"), 60), panel.progress.format()

        assert qgis.utils.reloadPlugin("sketch_search")
        dock = qgis.utils.plugins["sketch_search"].dock
        connected_to(dock, proc)
        panel = dock.index_panel
        assert process_until(lambda: panel.progress.format().startswith("running"), 60), panel.progress.format()
        assert panel.cancel_button.isEnabled()
        panel.cancel_button.click()
        assert process_until(lambda: panel.progress.format().startswith("cancelled"), 60), panel.progress.format()
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
        proc.stop()


def test_the_index_list_shows_a_job_no_event_told_of_as_the_worker_lists_it(plugin):
    """A job queued behind another, on a new index or an existing one, was shown as running
    until an event told of it; the worker's list says what it is."""
    panel = plugin.dock.index_panel
    panel.show_indexes([
        {"name": "waiting-new", "tile_count": 0, "rasters": [], "compatible": False, "job": "j2",
         "last_job": {"id": "j2", "kind": "index", "state": "queued", "progress": 0.0}},
        {"name": "growing", "tile_count": 40, "rasters": ["a.tif"], "compatible": True, "complete": False, "job": "j3",
         "last_job": {"id": "j3", "kind": "index", "state": "running", "progress": 0.25}},
        {"name": "shrinking", "tile_count": 40, "rasters": ["a.tif"], "compatible": True, "job": "j4",
         "last_job": {"id": "j4", "kind": "remove", "state": "queued", "progress": 0.0}}])
    assert [panel.table.item(row, 4).text() for row in range(3)] == ["queued 0%", "running 25%",
                                                                     "queued: removing rasters"]
    # a job an event told of after the list was made is shown, not the one the list names (a review's case)
    panel._show_any_job({"id": "j5", "kind": "index", "index": "growing", "state": "running", "progress": 0.5,
                         "started": 2.0})
    panel.show_indexes([{"name": "growing", "tile_count": 40, "rasters": ["a.tif"], "compatible": True, "job": "j3",
                         "last_job": {"id": "j3", "kind": "index", "state": "running", "progress": 0.25,
                                      "started": 1.0}}])
    assert panel.table.item(0, 4).text() == "running 50%"
    panel.show_indexes([])


def test_building_an_index_from_the_dock_shows_progress(plugin, worker, rmnp_layer, raster_root, qgis_iface):
    """The dock builds an index of the rasters ticked, its progress from the worker's events; its
    message warns of a raster the index holds no tile of."""
    dock = plugin.dock
    dock.connect_worker(worker.bind)
    assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30)
    panel = dock.index_panel
    panel.refresh_raster_layers()
    assert panel.checked_rasters() == [rmnp_layer.source()]
    panel.raster_list.item(0).setCheckState(Qt.Unchecked)  # left out by the user, then a layer is added (a search's)
    added = QgsVectorLayer("Point?crs=EPSG:4326", "added meanwhile", "memory")
    QgsProject.instance().addMapLayer(added)
    assert panel.checked_rasters() == [], "was ticked again: the next build indexed it"
    QgsProject.instance().removeMapLayer(added.id())
    del added
    panel.raster_list.item(0).setCheckState(Qt.Checked)
    small_raster_layer(raster_root, "small-for-dock")
    assert process_until(lambda: len(panel.checked_rasters()) == 2, 5), "a layer added is ticked"
    panel.table.clearSelection()
    panel.name_edit.setText("from-dock")
    qgis_iface.messageBar().clear_messages()
    seen = []
    panel.progress.valueChanged.connect(seen.append)
    panel.build_button.click()
    assert process_until(lambda: any("Indexing done" in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning)), 120)
    [said] = [m for m in qgis_iface.messageBar().get_messages(Qgis.Warning) if "Indexing done" in m]
    assert "1 raster(s) with no tile with enough data to search" in said and said.endswith("small-for-dock.tif"), said
    assert panel.progress.value() == panel.progress.maximum() and seen, "progress came from the worker's events"
    assert not panel.cancel_button.isEnabled()
    assert process_until(lambda: dock.index_combo.findText("from-dock") >= 0, 10)
    # a job the dock lost with its connection, found ended on the worker's list, is said from the
    # index's last job (how_left): that one said nothing of the raster without tiles
    from sketch_search.index_panel import how_left

    item = lambda: dock.controller.index_named("from-dock") or {}  # noqa: E731
    panel.refresh_button.click()
    assert process_until(lambda: item().get("complete") and item().get("last_job"), 10), item()
    # the tiles the index holds, as listed: it said the tiles done, skipped ones included
    assert f"Indexing done: the index holds {item()['tile_count']} tiles (" in said, said
    left = how_left(item())
    assert left.startswith("from-dock is complete: ") and "; 1 raster(s) with no tile with enough data" in left, left
    assert left.endswith("small-for-dock.tif"), left
    # listed before its first commit, as the worker lists a queued new index, and ended before the job was asked:
    # not said as still waiting behind other jobs
    queued = {"name": "queued", "tile_count": 0, "rasters": [], "complete": False, "compatible": False, "error": None,
              "reason": "nothing to search yet: it is being built by job j1, which waits behind other jobs: search "
                        "again once it runs", "job": "j1", "last_job": {"id": "j1", "state": "queued"}}
    assert how_left(queued) == "queued is incomplete (0 tiles) and no longer being built: Build / extend it to finish it"


def test_every_control_explains_itself_and_the_dock_says_how_to_sketch(plugin):
    from qgis.gui import QgsFileWidget
    from qgis.PyQt.QtWidgets import (QAbstractButton, QAbstractItemView, QAbstractSpinBox, QComboBox, QLineEdit,
                                     QPlainTextEdit, QWidget)

    from sketch_search.help_panel import README_SECTION

    controls = (QAbstractButton, QLineEdit, QAbstractSpinBox, QComboBox, QAbstractItemView, QPlainTextEdit, QgsFileWidget)
    compound = (QAbstractSpinBox, QComboBox, QAbstractItemView, QgsFileWidget)  # their inner parts are theirs

    def inner(widget) -> bool:
        parent = widget.parentWidget()
        while parent is not None:
            if isinstance(parent, compound):
                return True
            parent = parent.parentWidget()
        return False

    dock = plugin.dock
    found = [w for root in (dock, dock.settings_dialog) for w in root.findChildren(QWidget)
             if isinstance(w, controls) and not inner(w) and not w.objectName().startswith("qt_")
             ]
    assert len(found) > 30
    silent = {f"{type(w).__name__} {w.objectName()} {getattr(w, 'text', lambda: '')()!r}" for w in found if not w.toolTip()}
    assert not silent, f"controls without a tooltip: {silent}"
    text = dock.how_to.text.text()
    assert "main lines of the place as they lie in the frame" in text and "several strokes" in text
    assert "turned" in text and f"README.md#{README_SECTION}" in text


def test_a_reload_leaves_nothing_behind(plugin_started, qgis_iface):
    """Reloading the plugin (Plugin Reloader, an upgrade) removes its button and its drawings
    from the canvas; nothing of the old instance stays in QGIS's main window or map."""
    import qgis.utils
    from qgis.gui import QgsRubberBand
    from qgis.PyQt.QtCore import QCoreApplication, QEvent
    from qgis.PyQt.QtWidgets import QAction

    def in_qgis():
        QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
        bands = sum(isinstance(item, QgsRubberBand) for item in qgis_iface.mapCanvas().scene().items())
        actions = sum(a.text() == "Sketch search" for a in qgis_iface.mainWindow().findChildren(QAction))
        return bands, actions

    before = in_qgis()
    for _ in range(2):
        assert qgis.utils.reloadPlugin("sketch_search")
    assert in_qgis() == before
