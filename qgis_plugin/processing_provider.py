"""Processing algorithms, so indexing and sketch search fit models and batch runs."""

from __future__ import annotations

import os
import re
import time

from qgis.core import (QgsCoordinateReferenceSystem, QgsFeatureSink, QgsProcessing, QgsProcessingAlgorithm,
                       QgsProcessingException, QgsProcessingOutputLayerDefinition, QgsProcessingOutputNumber,
                       QgsProcessingOutputString, QgsProcessingParameterCrs, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile,
                       QgsProcessingParameterMultipleLayers, QgsProcessingParameterNumber,
                       QgsProcessingParameterString, QgsProcessingProvider, QgsWkbTypes)
from qgis.PyQt.QtGui import QIcon

from .controller import WITHOUT_TILES, info_lacks, search_wait_s, tiles_held, tiles_held_said
from .crs_names import crs_name
from .error_hints import told
from .raster_layers import raster_file
from .results import features_from_hits, hit_fields
from .settings import Setting
from .user_requests import Connection, endpoint_problem
from .wire import job_states as states
from .wire.client import WorkerClient
from .wire.errors import NotAWorker, RequestCancelled, WorkerError
from .wire.protocol import DEFAULT_TOP, MAX_TILE, MAX_TOP, MIN_TILE

ICON = os.path.join(os.path.dirname(__file__), "icon.svg")
WGS84 = "EPSG:4326"
POLL_S = 0.5  # how often a running job is asked for its progress
# a worker answers `info` and `job` at once: no answer within this, twice, is no worker there (a run
# waited 4 minutes on an endpoint where none ran, and on a worker killed mid-job)
REACH_S = 5.0
START_S = 60.0  # an `index` request finds its rasters on disk before it is answered (many files: seconds)
SEARCH_LIMIT_S = 60.0  # a worker's search time limit, where its `info` does not say it (an older worker)
CANCEL_WAIT_S = 5.0  # how long a Cancel waits for each answer of a worker stopping a job
CANCEL_GIVE_UP_S = 120.0  # how long it waits for the job to stop while the worker answers
# QGIS checks a file parameter's suffix against its filter as written, case and all: a camera's or
# scanner's "SKETCH.JPG", and "sketch.Png", were refused with "Incorrect parameter value for SKETCH"
# alone. Any file is taken: the worker reads any image, and says so of a file that is none
SKETCH_FILES = "Images (*.png *.jpg *.jpeg *.PNG *.JPG *.JPEG);;All files (*)"


class _WorkerAlgorithm(QgsProcessingAlgorithm):
    def group(self) -> str:
        return ""

    def groupId(self) -> str:  # noqa: N802
        return ""

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def _add_endpoint(self) -> None:
        self.addParameter(QgsProcessingParameterString("ENDPOINT", "Worker endpoint", Setting.ENDPOINT.get()))

    def _index_name(self, parameters, context) -> str:
        """The index named, without the spaces around it ("rmnp " built a second index beside rmnp)."""
        return self.parameterAsString(parameters, "INDEX", context).strip()

    def _reached(self, parameters, context, feedback) -> tuple[WorkerClient, dict] | None:
        """A client of the endpoint given, with the CURVE keys chosen in the plugin's settings
        (a remote worker must be reached encrypted, from the dock and from Processing alike),
        and the worker's `info`; QgsProcessingException within seconds when no worker answers,
        None when the user cancelled meanwhile (said in the log)."""
        endpoint = self.parameterAsString(parameters, "ENDPOINT", context).strip()  # pasted with a space: as the dock
        problem = endpoint_problem(endpoint)
        if problem:
            raise QgsProcessingException(problem)
        try:
            curve = Connection("", Setting.SERVER_KEY.as_path(), Setting.CLIENT_KEY.as_path()).curve_keys()
        except (OSError, ValueError) as exc:
            raise QgsProcessingException(f"CURVE keys not usable: {exc}. Choose both key files, or neither, in "
                                         "the Sketch search settings.") from None
        client = WorkerClient(endpoint, timeout=REACH_S, retries=1, curve=curve)
        try:
            info = client.info(cancelled=feedback.isCanceled)
            lacking = info_lacks(info)
            if lacking:  # an "ok" of another service: its missing fields were tracebacks later (probe)
                raise NotAWorker(endpoint, f"its info has no {lacking}")
            return client, info
        except RequestCancelled:
            feedback.pushInfo("Canceled before the worker answered: nothing was asked of it.")
            client.close()
            return None
        except WorkerError as exc:
            client.close()
            raise QgsProcessingException(f"Worker: {told(exc)}") from None


class BuildIndexAlgorithm(_WorkerAlgorithm):
    def name(self) -> str:
        return "build_index"

    def displayName(self) -> str:  # noqa: N802
        return "Build sketch index"

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Tiles the rasters and precomputes their search features in the worker, into the index of that "
                "name in its index root: a new index, or one to extend with more rasters (with its own tile "
                "settings: others are refused). Resumable: run it again after a failure or a cancel, and what was "
                "committed is kept. The rasters must be files the worker may read (inside its raster roots); a "
                "GeoPackage, in-memory or web raster: save it as a GeoTIFF first. Tile size, overlap, scales and "
                "bands left empty take the worker's defaults for a new index and the index's own settings for one "
                "that exists. Bands: the red, green and blue band numbers (e.g. 3,2,1; one number for grey), for "
                "rasters whose colours the worker cannot tell. A build queued behind another job says so and "
                "waits for it. Tiles: how many tiles the index holds once done (tiles with too little data are "
                "skipped). A build whose job is cancelled elsewhere (the dock's Indexing list, another client) "
                "fails, saying what the index holds. Cancel stops the job this run started; a run that found the "
                "same build already running (started by the dock or another run) stops following it, and the job "
                "goes on.")

    def createInstance(self):  # noqa: N802
        return BuildIndexAlgorithm()

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self._add_endpoint()
        self.addParameter(QgsProcessingParameterString("INDEX", "Index name"))
        self.addParameter(QgsProcessingParameterMultipleLayers("RASTERS", "Rasters", QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterNumber("TILE", "Tile size (px)", optional=True, minValue=MIN_TILE,
                                                       maxValue=MAX_TILE))
        self.addParameter(QgsProcessingParameterNumber("OVERLAP", "Overlap of neighbouring tiles (fraction)",
                                                       QgsProcessingParameterNumber.Double, optional=True,
                                                       minValue=0.0, maxValue=0.89))
        self.addParameter(QgsProcessingParameterString("SCALES", "Scales (comma-separated window sizes in tiles)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString("BANDS", "Bands (R,G,B band numbers, comma-separated)",
                                                       optional=True))
        self.addOutput(QgsProcessingOutputString("INDEX", "Index name"))
        self.addOutput(QgsProcessingOutputNumber("TILES", "Tiles in the index"))

    def _tiling(self, parameters, context) -> dict:
        """The tile settings the user gave; the worker fills in the rest."""
        settings = {}
        if parameters.get("TILE") not in (None, ""):
            settings["tile"] = self.parameterAsInt(parameters, "TILE", context)
        if parameters.get("OVERLAP") not in (None, ""):
            settings["overlap"] = self.parameterAsDouble(parameters, "OVERLAP", context)
        for name, key, example in (("SCALES", "scales", "1,2,4"), ("BANDS", "bands", "3,2,1")):
            given = self.parameterAsString(parameters, name, context).strip()
            if given:
                try:
                    settings[key] = [int(s) for s in given.split(",")]
                except ValueError:
                    raise QgsProcessingException(f"{name.capitalize()} {given!r}: give whole numbers separated by "
                                                 f"commas, e.g. {example}") from None
        return settings

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        layers = self.parameterAsLayerList(parameters, "RASTERS", context)
        if not layers:
            raise QgsProcessingException("Choose the raster layers to index.")
        found = [raster_file(layer) for layer in layers]
        rasters = [path for path, _ in found]
        not_files = [f"{layer.name()}: {why_not}" for layer, (path, why_not) in zip(layers, found) if path is None]
        if not_files:  # the worker refused the whole build for one of them
            raise QgsProcessingException(f"{'; '.join(not_files)}. Nothing was indexed.")
        name, tiling = self._index_name(parameters, context), self._tiling(parameters, context)
        reached = self._reached(parameters, context, feedback)
        if reached is None:
            return {}
        job, (client, _) = None, reached
        with client:
            try:
                started = client.request("index", timeout=START_S, cancelled=feedback.isCanceled, index=name,
                                         rasters=rasters, **tiling)
                # the job another run started (the dock, another client): this run's Cancel leaves it to
                # that one; it stopped it, and that run failed as "cancelled elsewhere" (probe)
                job, joined = started["job"], started.get("joined") is True
                queued = False
                while job["state"] in states.ACTIVE:
                    if job["state"] == states.QUEUED and not queued:  # sat silent at 0% for as long as the other ran
                        queued = True
                        feedback.pushInfo("Queued: the worker is running another indexing job, and starts this one "
                                          "after it (the dock's Indexing list shows it).")
                    time.sleep(POLL_S)
                    job = client.job(job["id"], cancelled=feedback.isCanceled)
                    feedback.setProgress(100 * job["progress"])
            except RequestCancelled:
                if job is None:
                    feedback.pushWarning("Canceled before the worker answered: if it takes the request later, the "
                                         "job runs there (the dock's Indexing list shows it).")
                    return {}
                if joined:
                    feedback.pushWarning(f"Canceled: this run stopped following indexing job {job['id']}, which "
                                         "another run or client started: it goes on in the worker (the dock's "
                                         "Indexing list shows it, and cancels it).")
                    return {}
                job = _cancel(client, job, feedback)
                if job is None:
                    return {}
            except WorkerError as exc:
                raise QgsProcessingException(f"Worker: {told(exc)}") from exc
        if job["state"] == states.FAILED:
            raise QgsProcessingException(f"Indexing failed: {job['error']['message']}")
        if job["state"] != states.DONE and not feedback.isCanceled():  # a model went on to search a part of it
            how = ("was cancelled elsewhere (the dock's Indexing list, or another client), not by this run"
                   if job["state"] == states.CANCELLED else "stopped with its worker, which resumes it when started")
            raise QgsProcessingException(f"Indexing job {job['id']} {how}: {tiles_held_said(job)}. Run this build "
                                         "again to finish it.")
        held = tiles_held(job)
        feedback.pushInfo(f"{job['state']}: {tiles_held_said(job)}")
        for raster in job.get("without_tiles") or []:
            feedback.pushWarning(f"Not searchable: {raster}: {WITHOUT_TILES}")
        if held == 0 and job["state"] == states.DONE:
            feedback.reportError("No tile of the index holds enough data to search (nodata, or rasters smaller than "
                                 "a tile): a search finds nothing. Try a smaller tile size.")
        return {"INDEX": name, "TILES": held}


def _cancel(client: WorkerClient, job: dict, feedback) -> dict | None:
    """The job once the worker has stopped it (after its batch in progress, which may take a
    while); None, said in the log, as soon as the worker leaves a request unanswered for
    CANCEL_WAIT_S (hung, or gone) or answers with an error, or has not stopped the job within
    CANCEL_GIVE_UP_S."""
    deadline = time.monotonic() + CANCEL_GIVE_UP_S
    try:
        stopping = client.cancel(job["id"], timeout=CANCEL_WAIT_S / 2)  # the client tries each request twice
        while stopping["state"] in states.ACTIVE and time.monotonic() < deadline:
            time.sleep(POLL_S)
            stopping = client.job(job["id"], timeout=CANCEL_WAIT_S / 2)
        why = f"it was still {stopping['state']} after {CANCEL_GIVE_UP_S:.0f} s"
    except WorkerError as exc:  # WorkerUnavailable too
        stopping, why = None, exc.message
    if stopping is not None and stopping["state"] not in states.ACTIVE:
        return stopping
    feedback.pushWarning(f"Canceled, but the worker at {client.endpoint} did not confirm that indexing job "
                         f"{job['id']} stopped ({why}): it may still be running there (the dock's Indexing list "
                         "shows it).")
    return None


class SearchBySketchAlgorithm(_WorkerAlgorithm):
    def name(self) -> str:
        return "search_by_sketch"

    def displayName(self) -> str:  # noqa: N802
        return "Search by sketch image"

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Finds the places of an index that look like a sketch: a PNG or JPEG image of the place's main "
                "lines, drawn on a plain background. Hits come best first, in the CRS chosen (else the project's). "
                "Search area: only the places that meet it (else the whole index), in its own CRS, else the "
                "project's. Cancel stops the search on the worker too.")

    def createInstance(self):  # noqa: N802
        return SearchBySketchAlgorithm()

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self._add_endpoint()
        self.addParameter(QgsProcessingParameterString("INDEX", "Index name"))
        self.addParameter(QgsProcessingParameterFile("SKETCH", "Sketch image", fileFilter=SKETCH_FILES))
        self.addParameter(QgsProcessingParameterNumber("TOP", "Number of hits", defaultValue=DEFAULT_TOP, minValue=1,
                                                    maxValue=MAX_TOP))
        # the worker's advice names both (a search too long: a smaller area; hits a CRS cannot place:
        # another CRS), which a Processing run could not follow (probe)
        self.addParameter(QgsProcessingParameterExtent("AREA", "Search area", optional=True))
        self.addParameter(QgsProcessingParameterCrs("OUTPUT_CRS", "CRS of the hits (empty: the project's)",
                                                    optional=True))
        self.addParameter(QgsProcessingParameterFeatureSink("OUTPUT", "Hits", QgsProcessing.TypeVectorPolygon))

    def _area(self, parameters, context, out_crs: QgsCoordinateReferenceSystem) -> dict:
        """The search's `bbox` and `bbox_crs` from the AREA given (an extent in its own CRS, else
        in the project's, as QGIS reads one), or nothing: the whole index."""
        given = parameters.get("AREA")
        if given in (None, ""):
            return {}
        named = re.search(r"\[(.+)\]\s*$", given) if isinstance(given, str) else None
        if named and not QgsCoordinateReferenceSystem(named.group(1)).isValid():  # read in the project's unsaid
            raise QgsProcessingException(f"Search area: QGIS knows no CRS {named.group(1)!r}; name one such as "
                                         "[EPSG:4326], or none for the project's.")
        extent = self.parameterAsExtent(parameters, "AREA", context)
        if extent.isNull() or extent.isEmpty():
            raise QgsProcessingException("Search area: an extent of no width or height; give one, or leave it empty "
                                         "to search the whole index.")
        crs = self.parameterAsExtentCrs(parameters, "AREA", context)
        return {"bbox": [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()],
                "bbox_crs": crs_name(crs if crs.isValid() else out_crs)}

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        sketch = self.parameterAsFile(parameters, "SKETCH", context)
        try:
            with open(sketch, "rb") as f:
                png = f.read()
        except OSError as exc:
            raise QgsProcessingException(f"The sketch {sketch} cannot be read: {exc.strerror or exc}.") from None
        project = context.project()
        # hits are asked in the CRS they are shown in (the project's, as the dock asks them): the worker draws
        # a footprint across 180 degrees, round a pole or past a Mercator map's edge whole in it
        out_crs = self.parameterAsCrs(parameters, "OUTPUT_CRS", context)
        if not out_crs.isValid():
            out_crs = project.crs() if project and project.crs().isValid() else QgsCoordinateReferenceSystem(WGS84)
        area = self._area(parameters, context, out_crs)
        reached = self._reached(parameters, context, feedback)
        if reached is None:
            return {}
        client, info = reached
        # a path that cannot be written is said before the search (after it, its hits were lost);
        # the output itself is made once there are hits: made first, a failed search emptied the
        # file of the last run's hits
        unwritable = _unwritable(_destination(parameters.get("OUTPUT"), context))
        if unwritable:
            client.close()
            raise QgsProcessingException(unwritable)
        with client:
            started = time.perf_counter()
            index = self._index_name(parameters, context)
            try:  # not sent again: a worker silent past its own limit would only run it twice
                reply = client.search(index, sketch_png=png,
                                      top=self.parameterAsInt(parameters, "TOP", context), crs=crs_name(out_crs),
                                      timeout=search_wait_s(info, SEARCH_LIMIT_S), retries=0,
                                      cancelled=feedback.isCanceled, **area)
            except RequestCancelled:
                feedback.pushInfo("Search canceled: no hits written.")
                return {}
            except WorkerError as exc:
                raise QgsProcessingException(f"Worker: {told(exc)}") from exc
        query_ms = (time.perf_counter() - started) * 1e3
        for raster in reply.get("left_out") or []:
            feedback.pushWarning(f"Not searched: {raster['raster']}: {raster['reason']}")
        for raster in reply.get("changed") or []:
            feedback.pushWarning(f"Changed since indexed: {raster['raster']}: {raster['reason']}")
        for raster in reply.get("partly_indexed") or []:
            feedback.pushWarning(f"Searched in part: {raster['raster']}: {raster['reason']}")
        for raster in reply.get("unread_places") or []:
            feedback.pushWarning(f"Places that cannot be read, left out: {raster['raster']}: {raster['reason']}")
        slower = (reply.get("scan") or {}).get("advice")  # a worker before it did not say
        if slower:  # the shortlist missing or out of date: seconds a search at 10M tiles
            feedback.pushInfo(f"{index}: {slower}.")
        found, asked = len(reply["hits"]["features"]), self.parameterAsInt(parameters, "TOP", context)
        feedback.pushInfo(f"{found} hit(s) in {query_ms:.0f} ms.")
        if found == 0 and area:
            feedback.pushWarning("No places found in the search area: check it and its CRS, or search without it.")
        if 0 < found < asked:  # 15 of 1,000, and no word why (probe)
            feedback.pushInfo(f"Fewer hits than the {asked} asked: the places found beyond them overlap better hits, "
                              "and a place is given once" + (" (in the search area)" if area else "") + ".")
        fields = hit_fields()
        sink, dest = self.parameterAsSink(parameters, "OUTPUT", context, fields, QgsWkbTypes.Polygon, out_crs)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, "OUTPUT"))
        for feature in features_from_hits(reply["hits"], fields, None, query_ms):  # asked in out_crs
            sink.addFeature(feature, QgsFeatureSink.FastInsert)
        return {"OUTPUT": dest}


def _destination(value, context) -> str:
    """Where an output parameter's value writes, as given ('' when it says none). Not
    parameterAsOutputLayer: that registers the destination as a layer to load, so a dialog run
    reported a temporary output "not correctly generated", and loaded a failed run's file, the
    last run's hits, as this one's (review)."""
    if isinstance(value, QgsProcessingOutputLayerDefinition):
        value = value.sink.valueAsString(context.expressionContext())[0]
    return value if isinstance(value, str) and value != QgsProcessing.TEMPORARY_OUTPUT else ""


def _unwritable(destination: str) -> str:
    """Why an output file cannot be written at `destination` ('' when it can, or when it is no
    file: a memory layer, a database table), checked without touching it."""
    path = destination.split("|")[0]
    if not path or destination.startswith("memory:") or (":" in path and not os.path.isabs(path)
                                                        and not re.match(r"^[A-Za-z]:[\\/]", path)):
        return ""  # memory:, ogr:, postgis: ... (a Windows drive's C:\ is a file's)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"Could not create layer {path}: {folder} is not a folder. Choose another place for the hits."
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        return f"Could not create layer {path}: it cannot be written there. Choose another place for the hits."
    return ""


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
