"""What the dock asks for, done: it owns the connection to the worker (and a local worker),
the indexing job and the searches, and tells the dock what changed through Qt signals."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from qgis.core import Qgis, QgsCoordinateReferenceSystem, QgsProject
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .local_worker import LocalWorker
from .results import hits_layer, save_gpkg
from .settings import Setting
from .wire import errors as codes
from .wire import job_states as states
from .wire.errors import WorkerError
from .wire.sockets import CurveKeys
from .worker_link import WorkerLink

# what a user can do about each error reply
HINTS = {codes.UNAVAILABLE: "Is the worker running? Start it or check the endpoint.",
         codes.INDEX_MISMATCH: "Build a new index with this worker's model.",
         codes.BAD_INPUT: "Check the sketch or rasters.",
         codes.FORBIDDEN: "The worker does not serve that path."}


class Status:
    """What the worker light shows: (text, colour name)."""

    DISCONNECTED = ("disconnected", "grey")
    CONNECTING = ("connecting…", "orange")
    STARTING = ("starting local worker…", "orange")
    NOT_ANSWERING = ("not answering", "red")

    @staticmethod
    def connected(info: dict) -> tuple:
        """From the worker's info reply: where it runs and which model it has."""
        device = info["device"] + (" (GPU)" if info.get("cuda") else "")
        return f"connected · {device} · model {info['model']['model']}", "green"


@dataclass(frozen=True)
class Connection:
    """A worker to connect to; both key files (paths) for a remote worker, neither for a local one."""

    endpoint: str
    server_key: str = ""  # the worker's public key (server.key)
    client_key: str = ""  # this client's secret key (client.key_secret), authorised on the worker

    def curve_keys(self) -> Optional[CurveKeys]:
        """The CURVE keys, or None; ValueError or OSError says what is wrong with them."""
        if not self.server_key and not self.client_key:
            return None
        if not (self.server_key and self.client_key):
            raise ValueError("give both the server's public key and your client secret key, or neither")
        return CurveKeys.from_files(self.server_key, self.client_key)


@dataclass(frozen=True)
class SearchQuery:
    """One search as the user set it up: exactly one of a sketch image or strokes."""

    index: str
    top: int
    crs: str  # of the hits (the project's)
    sketch_png: Optional[bytes] = None
    strokes: Optional[list] = None  # [[[x, y], ...], ...]
    strokes_crs: Optional[str] = None  # a CRS, or "pixel" for the pad (y down)
    strokes_frame: Optional[list] = None  # [x0, y0, x1, y1]: the pad the strokes were drawn in
    bbox: Optional[list] = None  # the search area, in bbox_crs
    bbox_crs: Optional[str] = None

    def message(self) -> tuple:
        """(payload frames, fields) of the search request."""
        fields = {"index": self.index, "top": self.top, "crs": self.crs}
        frames: tuple = ()
        if self.sketch_png is not None:
            frames, fields["sketch_frame"] = (self.sketch_png,), 1
        else:
            fields.update(strokes=self.strokes, strokes_crs=self.strokes_crs)
            if self.strokes_frame is not None:
                fields["strokes_frame"] = self.strokes_frame
        if self.bbox is not None:
            fields.update(bbox=self.bbox, bbox_crs=self.bbox_crs)
        return frames, fields


class SearchController(QObject):
    status_changed = pyqtSignal(str, str)  # text, colour name
    notice = pyqtSignal(str, object, str)  # text, Qgis message level, details for the log
    indexes_listed = pyqtSignal(list)  # the worker's indexes (list_indexes items)
    job_changed = pyqtSignal(dict)  # the indexing job started from here, after each event
    search_running = pyqtSignal(bool)
    results_ready = pyqtSignal(object)  # the new hits layer, already in the project

    def __init__(self, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.link: Optional[WorkerLink] = None
        self.local_worker: Optional[LocalWorker] = None
        self.job_id: Optional[str] = None
        self.result_layer = None
        self.search_count = 0
        self.connect_timeout_s = 10.0  # for the first answer of a worker
        self.request_timeout_s = 60.0

    # -- connection -------------------------------------------------------------------------------
    def connect_worker(self, connection: Connection) -> None:
        """Connect to a worker and remember it (endpoint and key paths) for the next QGIS session."""
        try:
            curve = connection.curve_keys()
        except (OSError, ValueError) as exc:
            self.notice.emit(f"CURVE keys not usable: {exc}", Qgis.Warning, "")
            return
        Setting.ENDPOINT.set(connection.endpoint)
        Setting.SERVER_KEY.set(connection.server_key)
        Setting.CLIENT_KEY.set(connection.client_key)
        self._open_link(connection.endpoint, curve)

    def start_local_worker(self, endpoint: str) -> None:
        """Start `python -m worker serve` here (settings WORKER_PYTHON, WORKER_DIR) and connect to it."""
        if self.local_worker is not None:
            self.local_worker.stop()
        self.local_worker = LocalWorker(endpoint, self)
        self.local_worker.ready.connect(lambda bound, pub: self._open_link(bound, None, pub))
        self.local_worker.failed.connect(lambda message: self.notice.emit(message, Qgis.Critical, ""))
        self.status_changed.emit(*Status.STARTING)
        self.local_worker.start()

    def _open_link(self, endpoint: str, curve: Optional[CurveKeys], pub: Optional[str] = None) -> None:
        self._close_link()
        self.link = WorkerLink(endpoint, pub_endpoint=pub, curve=curve, timeout_s=self.request_timeout_s, parent=self)
        self.link.job_event.connect(self._on_job)
        self.link.callback_failed.connect(lambda tb: self.notice.emit(
            "Sketch search hit an internal error; details are in the log panel.", Qgis.Critical, tb))
        self.status_changed.emit(*Status.CONNECTING)
        self.link.request("info", self._on_info, timeout_s=self.connect_timeout_s)

    def _close_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link.deleteLater()
            self.link = None

    def _on_info(self, reply: Optional[dict], err: Optional[WorkerError]) -> None:
        if err:
            return self._failed("Connecting to the worker", err)
        if reply.get("pub"):
            self.link.subscribe(reply["pub"])
        self.status_changed.emit(*Status.connected(reply))
        self.refresh_indexes()

    def _ready(self) -> bool:
        if self.link is None:
            self.notice.emit("Connect to a worker first.", Qgis.Warning, "")
        return self.link is not None

    def _failed(self, what: str, err: WorkerError) -> None:
        hint = HINTS.get(err.code, "See the log panel for details.")
        self.notice.emit(f"{what} failed: {err.message} {hint}",
                         Qgis.Critical if err.code == codes.INTERNAL else Qgis.Warning,
                         f"{what} failed ({err.code}): {err.message}")
        if err.code == codes.UNAVAILABLE:
            self.status_changed.emit(*Status.NOT_ANSWERING)

    # -- indexes ----------------------------------------------------------------------------------
    def refresh_indexes(self) -> None:
        if self.link is not None:
            self.link.request("list_indexes", self._on_indexes)

    def _on_indexes(self, reply: Optional[dict], err: Optional[WorkerError]) -> None:
        if err:
            return self._failed("Listing indexes", err)
        self.indexes_listed.emit(reply["indexes"])

    def build_index(self, name: str, rasters: list) -> None:
        """Start (or join) the worker's indexing job for `name`; progress arrives as job_changed."""
        if not self._ready():
            return
        if not rasters:
            return self.notice.emit("Add raster layers to the project and tick the ones to index.", Qgis.Warning, "")
        self.link.request("index", self._on_job_started, index=name, rasters=rasters)

    def _on_job_started(self, reply: Optional[dict], err: Optional[WorkerError]) -> None:
        if err:
            return self._failed("Starting the index", err)
        self.job_id = reply["job"]["id"]
        self._on_job(reply["job"])

    def _on_job(self, job: dict) -> None:
        if job["id"] != self.job_id:
            return  # another client's job
        self.job_changed.emit(job)
        if job["state"] not in states.FINISHED:
            return
        self.job_id = None
        if job["state"] == states.FAILED:
            self.notice.emit(f"Indexing failed: {job['error']['message']}", Qgis.Critical, "")
        else:
            self.notice.emit(f"Indexing {job['state']}: {job['tiles_done']} tiles.",
                             Qgis.Success if job["state"] == states.DONE else Qgis.Info, "")
        self.refresh_indexes()

    def cancel_job(self) -> None:
        """Stop the indexing job after its batch in progress (what was committed stays)."""
        if self.link is not None and self.job_id:
            self.link.request("cancel", lambda r, e: e and self._failed("Cancelling", e), job=self.job_id)

    # -- search -----------------------------------------------------------------------------------
    def search(self, query: SearchQuery) -> None:
        """Send the search; the hits come back as a new layer (results_ready)."""
        if not self._ready():
            return
        frames, fields = query.message()
        self.search_running.emit(True)
        started = time.perf_counter()
        self.link.request("search", lambda r, e: self._on_hits(r, e, query, started), frames=frames, **fields)

    def _on_hits(self, reply: Optional[dict], err: Optional[WorkerError], query: SearchQuery, started: float) -> None:
        self.search_running.emit(False)
        if err:
            return self._failed("Search", err)
        query_ms = (time.perf_counter() - started) * 1e3
        self.search_count += 1
        name = f"Sketch search {self.search_count}: {query.index}"
        hits_crs = QgsCoordinateReferenceSystem(query.crs)
        project_crs = QgsProject.instance().crs()
        layer = hits_layer(reply["hits"], name, hits_crs, project_crs if project_crs.isValid() else hits_crs, query_ms)
        QgsProject.instance().addMapLayer(layer)
        self.result_layer = layer
        self.results_ready.emit(layer)
        self.notice.emit(f"{layer.featureCount()} hit(s) in {query_ms:.0f} ms, added as layer “{name}”.",
                         Qgis.Success, "")

    def save_results(self, path: str) -> None:
        """Write the last search's layer to a GeoPackage."""
        if self.result_layer is None:
            return self.notice.emit("Search first: there are no results to save.", Qgis.Warning, "")
        error = save_gpkg(self.result_layer, path)
        if error:
            self.notice.emit(f"Saving failed: {error}", Qgis.Critical, "")
        else:
            self.notice.emit(f"Results saved to {path}", Qgis.Success, "")

    def shutdown(self) -> None:
        """Close sockets and stop a local worker (on unload and when QGIS quits)."""
        self._close_link()
        if self.local_worker is not None:
            self.local_worker.stop()
            self.local_worker = None
