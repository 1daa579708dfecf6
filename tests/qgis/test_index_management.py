"""Index management in the dock, against a real worker: the list, the tiles layer, building with
tile settings of one's own (the manifest records them), deleting after confirming."""

from __future__ import annotations

import json
from pathlib import Path

from qgis.core import Qgis, QgsProject
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QApplication, QMessageBox

from conftest import process_until


def connect(dock, worker) -> None:
    listed = []  # a listing after this connect: the table may still show an earlier one's rows
    dock.controller.indexes_listed.connect(listed.append)
    try:
        dock.connect_worker(worker.bind)
        assert process_until(lambda: dock.worker_panel.status_label.text().startswith("connected"), 30)
        assert process_until(lambda: listed and row_of(dock.index_panel, "rmnp") >= 0, 10), "this worker's indexes listed"
    finally:
        dock.controller.indexes_listed.disconnect(listed.append)


def row_of(panel, name: str) -> int:
    names = [panel.table.item(row, 0).text() for row in range(panel.table.rowCount())]
    return names.index(name) if name in names else -1


def cells(panel, name: str) -> list:
    row = row_of(panel, name)
    return [panel.table.item(row, column).text() for column in range(panel.table.columnCount())]


def answer_the_next_question(button: int) -> None:
    """Press `button` of the message box about to open (as a user would, a moment later)."""
    def press() -> None:
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox):
            box.button(button).click()
        else:
            QTimer.singleShot(50, press)
    QTimer.singleShot(50, press)


def test_the_list_shows_each_index_and_its_tiles_become_a_layer(plugin, worker):
    dock = plugin.dock
    panel = dock.index_panel
    connect(dock, worker)
    listed = dock.controller.index_named("rmnp")
    name, tiles, rasters, searchable, job = cells(panel, "rmnp")
    assert (name, tiles, rasters, searchable, job) == ("rmnp", str(listed["tile_count"]), "1", "yes", "—")
    assert int(tiles) > 0
    assert panel.table.item(row_of(panel, "rmnp"), 2).toolTip().endswith("rmnp-rgb.tif")
    panel.table.selectRow(row_of(panel, "rmnp"))
    assert panel.name_edit.text() == "rmnp", "a selected index is the one Build / extend extends"
    assert (panel.tiling_form.tile_spin.value(), panel.tiling_form.scales_edit.text()) == (112, "1,2"), \
        "with the tile settings it was built with"
    panel.tiles_button.click()
    [layer] = QgsProject.instance().mapLayersByName("Index tiles: rmnp")
    try:
        assert layer.isValid() and layer.featureCount() == listed["tile_count"]
        assert layer.crs().authid() == "EPSG:4326"
    finally:
        QgsProject.instance().removeMapLayer(layer.id())


def test_build_with_tile_settings_of_ones_own_then_delete_after_confirming(plugin, worker, rmnp_layer, qgis_iface):
    dock = plugin.dock
    panel, form = dock.index_panel, dock.index_panel.tiling_form
    connect(dock, worker)
    panel.table.clearSelection()
    form.defaults_button.click()
    defaults = (form.tile_spin.value(), form.overlap_spin.value(), form.scales_edit.text(), form.bands_edit.text())
    assert defaults == (224, 0.25, "1,2,4", ""), "the worker's defaults are shown"
    panel.refresh_raster_layers()
    panel.name_edit.setText("custom")
    form.tile_spin.setValue(160)
    form.overlap_spin.setValue(0.1)
    form.scales_edit.setText("2")
    form.bands_edit.setText("1,2,3")
    qgis_iface.messageBar().clear_messages()
    panel.build_button.click()
    assert process_until(lambda: any("Indexing done" in m for m in qgis_iface.messageBar().get_messages(Qgis.Success)),
                         180), qgis_iface.messageBar().get_messages(Qgis.Warning)
    manifest = json.loads((worker.index_root / "custom" / "manifest.json").read_text())
    assert manifest["tiling"] == {"tile": 160, "overlap": 0.1, "scales": [2], "bands": [1, 2, 3], "min_valid": 0.5}
    assert process_until(lambda: (dock.controller.index_named("custom") or {}).get("tiles_layer"), 10), \
        "listed again once the job is done, with its tiles layer"
    assert dock.index_combo.findText("custom") >= 0, "searchable, so offered for search"

    panel.table.selectRow(row_of(panel, "custom"))
    panel.tiles_button.click()
    assert QgsProject.instance().mapLayersByName("Index tiles: custom")
    answer_the_next_question(QMessageBox.Cancel)
    panel.delete_button.click()
    assert (worker.index_root / "custom" / "manifest.json").is_file(), "Cancel keeps the index"
    dock.index_combo.setCurrentText("custom")
    answer_the_next_question(QMessageBox.Yes)
    panel.delete_button.click()
    assert process_until(lambda: row_of(panel, "custom") < 0, 30)
    assert dock.index_combo.currentIndex() == -1, "no other index is searched in its place"
    assert any("“custom” is no longer offered" in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning))
    assert not (worker.index_root / "custom").exists()
    assert not QgsProject.instance().mapLayersByName("Index tiles: custom"), "its tiles layer went with it"
    assert dock.index_combo.findText("custom") < 0
    assert any("deleted" in m for m in qgis_iface.messageBar().get_messages(Qgis.Success))


def test_a_raster_is_taken_out_of_an_index_after_choosing_it(plugin, worker, raster_root, qgis_iface):
    """A raster indexed by mistake, or deleted for good, could only go with the whole index."""
    import shutil

    from qgis.PyQt.QtCore import Qt

    (raster_root / "removal").mkdir(exist_ok=True)
    mistake = Path(shutil.copy(raster_root / "rmnp-rgb.tif", raster_root / "removal" / "mistake.tif"))
    worker.index("pair", [raster_root / "rmnp-rgb.tif", mistake], tile=112, scales=[1])
    dock = plugin.dock
    panel = dock.index_panel
    connect(dock, worker)
    chosen = []

    def tick_the_mistake_and_remove() -> None:
        dialog = QApplication.activeModalWidget()
        if type(dialog).__name__ != "RasterRemovalDialog":  # the plugin's class, as QGIS loaded it
            return QTimer.singleShot(50, tick_the_mistake_and_remove)
        items = [dialog.raster_list.item(i) for i in range(dialog.raster_list.count())]
        chosen.append((sorted(i.text() for i in items), dialog.remove_button.isEnabled()))
        next(i for i in items if i.text() == "mistake.tif").setCheckState(Qt.Checked)
        dialog.remove_button.click()

    try:
        assert process_until(lambda: row_of(panel, "pair") >= 0, 10)
        panel.table.selectRow(row_of(panel, "pair"))
        assert cells(panel, "pair")[2] == "2"
        panel.tiles_button.click()
        [tiles] = QgsProject.instance().mapLayersByName("Index tiles: pair")
        assert tiles.featureCount() == dock.controller.index_named("pair")["tile_count"]
        qgis_iface.messageBar().clear_messages()
        QTimer.singleShot(50, tick_the_mistake_and_remove)
        panel.remove_button.click()
        assert chosen == [(["mistake.tif", "rmnp-rgb.tif"], False)], "the index's rasters, none ticked: Remove waits"
        assert process_until(lambda: any("Removed 1 raster(s) from “pair”" in m
                                         for m in qgis_iface.messageBar().get_messages(Qgis.Success)), 60), \
            qgis_iface.messageBar().get_messages(Qgis.Warning)
        assert process_until(lambda: row_of(panel, "pair") >= 0 and cells(panel, "pair")[2] == "1", 10)
        assert dock.controller.index_named("pair")["rasters"] == [str(raster_root / "rmnp-rgb.tif")]
        assert mistake.is_file(), "the raster file stays"
        [shown] = QgsProject.instance().mapLayersByName("Index tiles: pair")
        assert shown.featureCount() == dock.controller.index_named("pair")["tile_count"], "the shown tiles follow"
        left = shown.featureCount()
        worker.index("pair", [raster_root / "rmnp-rgb.tif", mistake], tile=112, scales=[1])  # by another client
        assert process_until(lambda: shown.featureCount() == 2 * left, 30), "another client's job too"
    finally:
        for layer in QgsProject.instance().mapLayersByName("Index tiles: pair"):
            QgsProject.instance().removeMapLayer(layer.id())
        with worker.client() as c:
            c.request("delete_index", index="pair")
        shutil.rmtree(raster_root / "removal")


def test_bad_tile_settings_say_which_field_to_correct(plugin, worker, rmnp_layer, qgis_iface):
    dock = plugin.dock
    panel = dock.index_panel
    connect(dock, worker)
    panel.table.clearSelection()
    panel.name_edit.setText("never-built")
    panel.tiling_form.scales_edit.setText("1, two")
    qgis_iface.messageBar().clear_messages()
    panel.build_button.click()
    [message] = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert "Scales" in message and "1,2,4" in message
    panel.tiling_form.defaults_button.click()
    assert not (worker.index_root / "never-built").exists()


def test_a_raster_layer_the_worker_cannot_read_is_greyed_with_why_and_not_sent(plugin, rmnp_layer, tmp_path,
                                                                               qgis_iface):
    """A raster the worker cannot read as a file (an in-memory one, a GeoPackage's raster table)
    was ticked, and the worker refused the whole build with it; a web layer was not listed at
    all. A file deleted once listed stayed ticked, and was greyed as "not a file" once listed
    again: the build now lists again first, and builds nothing while a ticked one is gone."""
    import shutil

    from osgeo import gdal
    from qgis.core import QgsRasterLayer
    from qgis.PyQt.QtCore import Qt

    panel = plugin.dock.index_panel
    gdal.Translate("/vsimem/in-memory.tif", rmnp_layer.source())
    gdal.Translate(str(tmp_path / "rasters.gpkg"), rmnp_layer.source(), format="GPKG")
    copy = shutil.copy(rmnp_layer.source(), tmp_path / "copy.tif")
    layers = [QgsRasterLayer("/vsimem/in-memory.tif", "in memory", "gdal"),
              QgsRasterLayer(str(tmp_path / "rasters.gpkg"), "geopackage", "gdal"),
              QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/%7Bz%7D/%7Bx%7D/%7By%7D.png", "web", "wms"),
              QgsRasterLayer(str(copy), "copy", "gdal")]
    try:
        assert all(layer.isValid() for layer in layers)
        QgsProject.instance().addMapLayers(layers)
        items = {panel.raster_list.item(i).text(): panel.raster_list.item(i) for i in range(panel.raster_list.count())}
        greyed = {name: items[name].toolTip().splitlines()[-1] for name in ("in memory", "geopackage", "web")}
        assert not any(items[name].flags() & Qt.ItemIsEnabled for name in greyed)
        assert greyed == {"in memory": "Not a file (a GDAL virtual path, a connection string): save it as a GeoTIFF "
                                       "(Export > Save As…) to index it.",
                          "geopackage": "A GPKG file, a format the worker does not read: save it as a GeoTIFF "
                                        "(Export > Save As…) to index it.",
                          "web": "A raster from a wms source (a web service, a database), not a file: save it as a "
                                 "GeoTIFF (Export > Save As…) to index it."}
        assert sorted(panel.checked_rasters()) == sorted([rmnp_layer.source(), str(copy)])
        copy.unlink()
        panel.name_edit.setText("never-built")
        panel.build_button.click()
        assert "1 ticked raster layer(s) cannot be indexed now, and are greyed: nothing was built" in \
            qgis_iface.messageBar().get_messages(Qgis.Warning)[-1]
        items = {panel.raster_list.item(i).text(): panel.raster_list.item(i) for i in range(panel.raster_list.count())}
        assert not items["copy"].flags() & Qt.ItemIsEnabled
        assert f"Its file {copy} is not there (moved or deleted)" in items["copy"].toolTip()
        assert panel.checked_rasters() == [rmnp_layer.source()]
    finally:
        QgsProject.instance().removeMapLayers([layer.id() for layer in layers])
        gdal.Unlink("/vsimem/in-memory.tif")
