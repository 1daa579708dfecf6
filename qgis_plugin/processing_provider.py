"""Processing algorithms, so indexing and sketch search fit models and batch runs."""

from __future__ import annotations

import json
import os
import time

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeature, QgsFeatureSink, QgsFields,
                       QgsField, QgsProcessing, QgsProcessingAlgorithm,
                       QgsProcessingException, QgsProcessingOutputNumber, QgsProcessingOutputString,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile, QgsProcessingParameterMultipleLayers,
                       QgsProcessingParameterNumber, QgsProcessingParameterString, QgsProcessingProvider, QgsWkbTypes)
from qgis.PyQt.QtGui import QIcon

from .results import FIELDS, polygon_from_geojson
from .wire import job_states as states
from .wire.client import WorkerClient
from .wire.errors import WorkerError

ICON = os.path.join(os.path.dirname(__file__), "icon.svg")


class _WorkerAlgorithm(QgsProcessingAlgorithm):
    def group(self) -> str:
        return ""

    def groupId(self) -> str:  # noqa: N802
        return ""

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def _add_endpoint(self) -> None:
        self.addParameter(QgsProcessingParameterString("ENDPOINT", "Worker endpoint", "tcp://127.0.0.1:5555"))

    def _client(self, parameters, context) -> WorkerClient:
        return WorkerClient(self.parameterAsString(parameters, "ENDPOINT", context), timeout=120.0, retries=1)


class BuildIndexAlgorithm(_WorkerAlgorithm):
    def name(self) -> str:
        return "build_index"

    def displayName(self) -> str:  # noqa: N802
        return "Build sketch index"

    def shortHelpString(self) -> str:  # noqa: N802
        return "Tiles the rasters and precomputes their tokens in the worker (resumable; extends an existing index)."

    def createInstance(self):  # noqa: N802
        return BuildIndexAlgorithm()

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self._add_endpoint()
        self.addParameter(QgsProcessingParameterString("INDEX", "Index name"))
        self.addParameter(QgsProcessingParameterMultipleLayers("RASTERS", "Rasters", QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterNumber("TILE", "Tile size (px)", defaultValue=224, minValue=32))
        self.addParameter(QgsProcessingParameterString("SCALES", "Scales", "1,2,4"))
        self.addOutput(QgsProcessingOutputString("INDEX", "Index name"))
        self.addOutput(QgsProcessingOutputNumber("TILES", "Tiles indexed"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        layers = self.parameterAsLayerList(parameters, "RASTERS", context)
        rasters = [layer.source().split("|")[0] for layer in layers]
        name = self.parameterAsString(parameters, "INDEX", context)
        scales = [int(s) for s in self.parameterAsString(parameters, "SCALES", context).split(",")]
        with self._client(parameters, context) as client:
            try:
                job = client.start_index(name, rasters, tile=self.parameterAsInt(parameters, "TILE", context), scales=scales)
                while job["state"] in states.ACTIVE:
                    if feedback.isCanceled():
                        client.cancel(job["id"])
                    time.sleep(0.5)
                    job = client.job(job["id"])
                    feedback.setProgress(100 * job["progress"])
            except WorkerError as exc:
                raise QgsProcessingException(f"worker: {exc.message}") from exc
        if job["state"] == states.FAILED:
            raise QgsProcessingException(f"indexing failed: {job['error']['message']}")
        feedback.pushInfo(f"{job['state']}: {job['tiles_done']} tiles ({job['tiles_skipped']} empty, skipped)")
        return {"INDEX": name, "TILES": job["tiles_done"]}


class SearchBySketchAlgorithm(_WorkerAlgorithm):
    def name(self) -> str:
        return "search_by_sketch"

    def displayName(self) -> str:  # noqa: N802
        return "Search by sketch image"

    def shortHelpString(self) -> str:  # noqa: N802
        return "Finds the places of an index that look like a sketch (PNG/JPEG of dark strokes on white)."

    def createInstance(self):  # noqa: N802
        return SearchBySketchAlgorithm()

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self._add_endpoint()
        self.addParameter(QgsProcessingParameterString("INDEX", "Index name"))
        self.addParameter(QgsProcessingParameterFile("SKETCH", "Sketch image", fileFilter="Images (*.png *.jpg *.jpeg)"))
        self.addParameter(QgsProcessingParameterNumber("TOP", "Hits", defaultValue=10, minValue=1, maxValue=1000))
        self.addParameter(QgsProcessingParameterFeatureSink("OUTPUT", "Hits", QgsProcessing.TypeVectorPolygon))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        with open(self.parameterAsFile(parameters, "SKETCH", context), "rb") as f:
            png = f.read()
        started = time.perf_counter()
        with self._client(parameters, context) as client:
            try:
                reply = client.search(self.parameterAsString(parameters, "INDEX", context), sketch_png=png,
                                      top=self.parameterAsInt(parameters, "TOP", context), crs="EPSG:4326")
            except WorkerError as exc:
                raise QgsProcessingException(f"worker: {exc.message}") from exc
        query_ms = (time.perf_counter() - started) * 1e3
        fields = QgsFields()
        for name, kind in FIELDS:
            fields.append(QgsField(name, kind))
        out_crs = context.project().crs() if context.project() and context.project().crs().isValid() \
            else QgsCoordinateReferenceSystem("EPSG:4326")
        sink, dest = self.parameterAsSink(parameters, "OUTPUT", context, fields, QgsWkbTypes.Polygon, out_crs)
        transform = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:4326"), out_crs, context.transformContext())
        for item in reply["hits"]["features"]:
            p = item["properties"]
            geometry = polygon_from_geojson(item["geometry"])
            geometry.transform(transform)
            feature = QgsFeature(fields)
            feature.setGeometry(geometry)
            feature.setAttributes([p["rank"], p["score"], p["shortlist_score"], p["raster"], json.dumps(p["window"]),
                                   p["scale"], query_ms])
            sink.addFeature(feature, QgsFeatureSink.FastInsert)
        return {"OUTPUT": dest}


class SketchSearchProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "sketchsearch"

    def name(self) -> str:
        return "Sketch search"

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def loadAlgorithms(self) -> None:  # noqa: N802
        self.addAlgorithm(BuildIndexAlgorithm())
        self.addAlgorithm(SearchBySketchAlgorithm())
