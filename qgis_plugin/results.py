"""Search hits -> a styled, labelled polygon layer in the project CRS; the user's marks on hits;
the query the layer answers (kept with it, so it can be run again); saving to GeoPackage.

Every search's hits are written to a GeoPackage at once (results_file: beside the saved project,
else in the plugin's folder of the QGIS profile) and shown from there: QGIS 3.22 saves no
features of a memory layer with a project, so a reopened project had lost its results and marks.

The query lives in the layer's custom properties (saved in the project) and, in a GeoPackage,
in a side table QUERIES_TABLE (layer name -> query JSON): a GeoPackage file keeps no QGIS custom
properties, and a side table is read back by any QGIS (and by sqlite3) without a project.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Optional, Union

from qgis.core import (QgsApplication, QgsCategorizedSymbolRenderer, QgsCoordinateReferenceSystem, QgsCoordinateTransform,
                       QgsFeature, QgsField, QgsFields, QgsFillSymbol, QgsGeometry, QgsPalLayerSettings, QgsPointXY,
                       QgsProject, QgsRendererCategory, QgsTextFormat, QgsVectorFileWriter, QgsVectorLayer,
                       QgsVectorLayerSimpleLabeling)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

# the hit properties kept as attributes (a property a worker does not send is null), then the round trip
FIELDS = [("rank", QVariant.Int), ("score", QVariant.Double), ("shortlist_score", QVariant.Double),
          ("raster", QVariant.String), ("window", QVariant.String), ("scale", QVariant.Int),
          ("angle", QVariant.Double), ("query_ms", QVariant.Double), ("id", QVariant.String),
          ("feedback", QVariant.Int)]
GOOD, BAD = 1, -1  # the `feedback` field: the user's mark of a hit (NULL: none)
QUERY_PROPERTY = "sketch_search/query"  # the layer's custom property holding the query's JSON
MODEL_PROPERTY = "sketch_search/model"  # which model answered (the worker's fingerprint, JSON)
QUERIES_TABLE = "sketch_search_queries"


def polygon_from_geojson(geometry: dict) -> QgsGeometry:
    """A GeoJSON Polygon as a QgsGeometry (QgsJsonUtils.geometryFromGeoJson needs QGIS 3.28)."""
    if geometry.get("type") != "Polygon":
        raise ValueError(f"expected a Polygon, got {geometry.get('type')}")
    return QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y, *_ in ring] for ring in geometry["coordinates"]])


def _rank_colour(rank: int, count: int) -> QColor:
    t = 0.0 if count <= 1 else (rank - 1) / (count - 1)
    return QColor.fromHsvF(0.0 + 0.15 * t, 0.9, 0.95 - 0.3 * t)  # red (best) to dark amber


def hit_fields() -> QgsFields:
    """The attributes of a hit feature, in the order features_from_hits fills them."""
    fields = QgsFields()
    for name, kind in FIELDS:
        fields.append(QgsField(name, kind))
    return fields


def features_from_hits(collection: dict, fields: QgsFields, transform: Optional[QgsCoordinateTransform],
                       query_ms: float) -> list:
    """One polygon feature per hit of a search reply's `hits` (a GeoJSON FeatureCollection),
    reprojected by `transform` (None: the hits are in the layer's CRS already; a hit's square
    may be turned: any polygon is kept as it is);
    `query_ms` is the search's round trip as the user waited for it."""
    features = []
    for item in collection.get("features", []):
        props = item.get("properties") or {}
        geometry = polygon_from_geojson(item["geometry"])
        if transform is not None:
            geometry.transform(transform)
        feature = QgsFeature(fields)
        feature.setGeometry(geometry)
        window = props.get("window")
        feature.setAttributes([props.get("rank"), props.get("score"), props.get("shortlist_score"), props.get("raster"),
                               None if window is None else json.dumps(window), props.get("scale"), props.get("angle"),
                               query_ms, props.get("id"), None])
        features.append(feature)
    return features


def hits_layer(collection: dict, name: str, hits_crs: QgsCoordinateReferenceSystem,
               layer_crs: QgsCoordinateReferenceSystem, query_ms: float) -> QgsVectorLayer:
    """A memory layer with one polygon per hit, styled by rank and labelled with it."""
    layer = QgsVectorLayer(f"Polygon?crs={layer_crs.authid() or 'EPSG:4326'}", name, "memory")
    if not layer_crs.authid():
        layer.setCrs(layer_crs)
    provider = layer.dataProvider()
    provider.addAttributes(hit_fields().toList())
    layer.updateFields()
    transform = QgsCoordinateTransform(hits_crs, layer_crs, QgsProject.instance())
    features = features_from_hits(collection, layer.fields(), transform, query_ms)
    provider.addFeatures(features)
    layer.updateExtents()
    style_by_rank(layer, len(features))
    return layer


def style_by_rank(layer: QgsVectorLayer, count: int) -> None:
    categories = []
    for rank in range(1, count + 1):
        colour = _rank_colour(rank, count)
        symbol = QgsFillSymbol.createSimple({"color": f"{colour.red()},{colour.green()},{colour.blue()},40",
                                             "outline_color": colour.name(), "outline_width": "0.8" if rank > 1 else "1.4"})
        categories.append(QgsRendererCategory(rank, symbol, f"#{rank}"))
    layer.setRenderer(QgsCategorizedSymbolRenderer("rank", categories))
    labels = QgsPalLayerSettings()
    labels.fieldName = "concat('#', \"rank\")"
    labels.isExpression = True
    text = QgsTextFormat()
    text.setSize(11)
    text.setColor(QColor("white"))
    buffer = text.buffer()
    buffer.setEnabled(True)
    buffer.setColor(QColor("black"))
    labels.setFormat(text)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(labels))
    layer.setLabelsEnabled(True)


def results_file(project: QgsProject) -> Path:
    """The GeoPackage a search's hits are written to: beside the saved project
    (NAME_sketch_search.gpkg), else results.gpkg in the plugin's folder of the QGIS profile (a
    project not yet saved, or kept in a database: its name is no folder)."""
    if project.fileName() and project.projectStorage() is None:
        saved = Path(project.fileName())
        return saved.with_name(f"{saved.stem}_sketch_search.gpkg")
    return unsaved_results_file()


def unsaved_results_file() -> Path:
    return Path(QgsApplication.qgisSettingsDirPath()) / "sketch_search" / "results.gpkg"


def gpkg_table(layer: QgsVectorLayer) -> tuple[Optional[Path], str]:
    """The GeoPackage a layer is read from (None for another source) and its table."""
    source = layer.source().split("|")
    if layer.providerType() != "ogr" or not source[0].lower().endswith(".gpkg"):
        return None, ""
    return Path(source[0]), next((p.split("=", 1)[1] for p in source[1:] if p.startswith("layername=")), layer.name())


def take_results_beside(project: QgsProject) -> tuple[int, list[str]]:
    """The results layers a named project still reads from the profile's GeoPackage (searched
    before it was first saved) written beside it (results_file) and read from there, marks,
    query and style kept, and taken out of the profile's file. They stayed in the profile, named
    by an absolute path: on another machine, or after a profile reset, the saved project's first
    results were gone. Returns how many moved, and why others could not be."""
    unsaved, beside = unsaved_results_file(), results_file(project)
    moved, problems, taken = 0, [], []
    for layer in project.mapLayers().values():
        path, table = gpkg_table(layer) if isinstance(layer, QgsVectorLayer) else (None, "")
        if path is None or path != unsaved or beside == unsaved:
            continue
        new_table = free_table(str(beside), table)
        error = save_gpkg(layer, str(beside), new_table)
        if error:
            problems.append(f"{layer.name()}: {error}")
            continue
        layer.setDataSource(f"{beside}|layername={new_table}", layer.name(), "ogr")
        moved += 1
        taken.append(table)
    if taken:
        _drop_tables(unsaved, taken)
    return moved, problems


def _drop_tables(path: Path, tables: list[str]) -> None:
    """Remove tables (and their queries) from a GeoPackage; what cannot be removed stays (it
    only takes room)."""
    from osgeo import ogr

    try:  # OGR raises only where a plugin asked it to (ogr.UseExceptions)
        data = ogr.Open(str(path), update=1)
        for n in reversed(range(data.GetLayerCount() if data is not None else 0)):
            if data.GetLayerByIndex(n).GetName() in tables:
                data.DeleteLayer(n)
    except RuntimeError:
        pass
    data = None
    try:
        with closing(sqlite3.connect(path)) as db, db:
            db.execute(f"DELETE FROM {QUERIES_TABLE} WHERE layer IN ({','.join('?' * len(tables))})", tables)
    except sqlite3.Error:
        pass


def kept_on_disk(layer: QgsVectorLayer, path: Path, table: str) -> Union[QgsVectorLayer, str]:
    """A memory layer of hits written to the GeoPackage `path` as `table` (with its query) and
    opened from there, named and styled as it was; or why it could not be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return str(exc)
    error = save_gpkg(layer, str(path), table)
    if error:
        return error
    kept = QgsVectorLayer(f"{path}|layername={table}", layer.name(), "ogr")
    if not kept.isValid():
        return f"QGIS cannot read {path} back"
    kept.setRenderer(layer.renderer().clone())
    kept.setLabeling(layer.labeling().clone())
    kept.setLabelsEnabled(True)
    for key in (QUERY_PROPERTY, MODEL_PROPERTY):
        kept.setCustomProperty(key, layer.customProperty(key))
    return kept


def save_gpkg(layer: QgsVectorLayer, path: str, table: Optional[str] = None) -> str | None:
    """Write the layer (marks included) and its query to a GeoPackage, as `table` (the layer's
    name by default) beside the file's other layers; returns an error message or None."""
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = table or layer.name()
    if Path(path).exists():  # add to the file, do not replace it (it may hold other searches)
        # OGR said "Opening of data source in update mode failed (OGR error: )"; one this process
        # may not read is left to OGR, whose error says so
        if os.access(path, os.R_OK) and gpkg_tables(path) is None:
            return f"{path} is not a GeoPackage; it is left as it was: choose another file"
        options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteLayer
    result = QgsVectorFileWriter.writeAsVectorFormatV3(layer, path, QgsProject.instance().transformContext(), options)
    if result[0] != QgsVectorFileWriter.NoError:
        return f"{result[1]}: choose a folder you can write to"
    query = layer.customProperty(QUERY_PROPERTY)
    if query:
        try:
            with closing(sqlite3.connect(path)) as db, db:  # committed, then closed
                db.execute(f"CREATE TABLE IF NOT EXISTS {QUERIES_TABLE} (layer TEXT PRIMARY KEY, query TEXT NOT NULL, "
                           "model TEXT)")
                db.execute(f"INSERT OR REPLACE INTO {QUERIES_TABLE} VALUES (?, ?, ?)",
                           (options.layerName, query, layer.customProperty(MODEL_PROPERTY) or None))
        except sqlite3.Error as exc:
            return f"the hits were written but not their query ({exc})"
    return None


def gpkg_tables(path: str) -> Optional[set]:
    """The tables (lower case) of the GeoPackage `path`, or None for a file that is none."""
    try:
        with closing(sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)) as db:
            return {row[0].lower() for row in db.execute("SELECT table_name FROM gpkg_contents")}
    except sqlite3.Error:
        return None


def gpkg_path(path: str) -> str:
    """A file name chosen for Save results, ending in .gpkg: Qt's dialog leaves "hits" as typed,
    OGR wrote the layer to hits.gpkg and its query to a stray "hits", and a second save there
    looked for names taken in "hits" and replaced the layer saved before in hits.gpkg."""
    return path if Path(path).suffix.lower() == ".gpkg" else path + ".gpkg"


def free_table(path: str, name: str) -> str:
    """`name`, else `name (2)`, `name (3)`...: the first that no layer of the GeoPackage `path`
    has. Save results adds to a file the user chose, never replacing what was saved there before
    (another project's "Sketch search 1"). A "|" (an index named so) becomes "¦": QGIS reads
    it as the end of the file's name in `path|layername=`, and the saved table could not be opened."""
    name = name.replace("|", "¦")
    taken = gpkg_tables(path) if Path(path).is_file() else None
    if taken is None:  # no file yet, or none that is a GeoPackage (save_gpkg says so)
        return name
    table, n = name, 1
    while table.lower() in taken:
        n += 1
        table = f"{name} ({n})"
    return table


def keep_query(layer: QgsVectorLayer, query_json: str, model: Optional[dict]) -> None:
    """Record on the layer the query it answers and the model that answered."""
    layer.setCustomProperty(QUERY_PROPERTY, query_json)
    layer.setCustomProperty(MODEL_PROPERTY, json.dumps(model) if model else "")


def saved_query(layer: QgsVectorLayer) -> Optional[str]:
    """The query JSON a results layer answers: its custom property, or a GeoPackage's side table
    (a layer loaded from a saved file). None for a layer that is not a search's results."""
    query = layer.customProperty(QUERY_PROPERTY)
    if query:
        return query
    path, name = gpkg_table(layer)
    if path is None:
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            row = db.execute(f"SELECT query, model FROM {QUERIES_TABLE} WHERE layer = ?", (name,)).fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    keep_query(layer, row[0], json.loads(row[1]) if row[1] else None)
    return row[0]


def marks(layer: QgsVectorLayer) -> tuple:
    """The ids of the hits marked good and bad (the `feedback` field)."""
    good, bad = [], []
    for feature in layer.getFeatures():
        mark, hit = feature["feedback"], feature["id"]
        if isinstance(hit, str) and mark in (GOOD, BAD):
            (good if mark == GOOD else bad).append(hit)
    return good, bad


def set_mark(layer: QgsVectorLayer, feature_id: int, mark: Optional[int]) -> bool:
    """Store a mark (GOOD, BAD or None) in a hit's `feedback` field; False when the layer cannot be
    written. In a layer being edited, in its edit buffer, as the attribute table's: written
    beneath it, a mark was hidden by the buffer's, and kept by a roll back (probe)."""
    index = layer.fields().indexOf("feedback")
    if index < 0:
        return False
    if layer.isEditable():
        return layer.changeAttributeValue(feature_id, index, mark)
    return layer.dataProvider().changeAttributeValues({feature_id: {index: mark}})
