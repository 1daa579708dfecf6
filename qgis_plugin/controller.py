"""What the dock asks for, done: it owns the connection to the worker (and a local worker, found
or set up on first use), the indexes and their jobs, and the searches, and tells the dock what
changed through Qt signals."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

import zmq

from qgis.core import Qgis, QgsCoordinateReferenceSystem, QgsProject
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .crs_names import crs_name
from .error_hints import told
from .index_layers import tiles_layer, tiles_layer_name, why_no_tiles_layer
from .local_worker import LocalWorker, WorkerExit
from .user_requests import Connection, IndexBuild, SearchQuery, endpoint_problem
from .results import (BAD, GOOD, free_table, gpkg_path, hits_layer, keep_query, kept_on_disk, marks, results_file,
                      save_gpkg, saved_query, set_mark, take_results_beside)
from .settings import Setting, followed_job, keep_followed_job
from .wire import errors as codes
from .wire import job_states as states
from .wire.errors import WorkerError
from .wire.protocol import others_unfinished
from .wire.sockets import CurveKeys, dialable
from .worker_command import WorkerCommand
from .worker_finder import WorkerFinder
from .worker_link import WorkerLink

SEARCH_GRACE_S = 10.0  # waited past the worker's own search limit, for its `timeout` answer to arrive


def search_wait_s(info: dict, fallback_s: float) -> float:
    """How long to wait for a search or a list of the indexes: the worker answers `timeout` at
    its own limit (its `info`, else `fallback_s`), counted from their arrival, with its advice;
    wait for that answer."""
    return ((info.get("limits") or {}).get("search_timeout") or fallback_s) + SEARCH_GRACE_S


class Status:
    """What the worker light shows: (text, colour name)."""

    DISCONNECTED = ("disconnected", "grey")
    CONNECTING = ("connecting…", "orange")
    STARTING = ("starting local worker…", "orange")
    SETTING_UP = ("setting up the worker…", "orange")
    NOT_ANSWERING = ("not answering", "red")
    NOT_A_WORKER = ("not a sketch search worker", "red")
    STOPPED = ("local worker stopped", "red")

    @staticmethod
    def connected(info: dict) -> tuple:
        """From the worker's info reply: where it runs and which model it has."""
        device = info["device"] + (" (GPU)" if info.get("cuda") else "")
        return f"connected · {device} · model {info['model']['model']}", "green"


def info_lacks(info: dict) -> str:
    """What the plugin needs of a worker's info reply and it lacks ('' when nothing)."""
    if not isinstance(info.get("device"), str):
        return "device"
    model = info.get("model")
    return "" if isinstance(model, dict) and isinstance(model.get("model"), str) else "model"


SEARCH_LAYER_PREFIX = "Sketch search"  # results layers are "Sketch search N: INDEX", N counting on in a project


def _search_numbers(project: QgsProject) -> list[int]:
    """The N of the project's results layers (a reopened project's too, so none gets a name twice)."""
    named = (re.match(rf"{SEARCH_LAYER_PREFIX} (\d+): ", layer.name()) for layer in project.mapLayers().values())
    return [int(m.group(1)) for m in named if m]


def _reasons(rasters: list[dict]) -> str:
    """Each raster of a reply's list with its whole reason, a line each (a message's details)."""
    return "\n".join(f"{r['raster']}: {r['reason']}" for r in rasters)


LEFT_OUT_BECAUSE = {"indexing": "still being indexed", "unreadable": "cannot be read"}  # a reply's left_out kinds


def _names(rasters: list[dict]) -> str:
    """A few rasters of a reply's list by file name (and why, where the worker says), for a
    one-line message."""
    def named(r: dict) -> str:
        why = LEFT_OUT_BECAUSE.get(r.get("kind"))
        if r.get("tiles_total"):  # partly indexed
            why = f"{100 * r['tiles_done'] // r['tiles_total']}% indexed"  # never 100% while a tile is not
        return f"{os.path.basename(r['raster'])}{f', {why}' if why else ''}"
    return "; ".join(map(named, rasters[:3])) + ("…" if len(rasters) > 3 else "")


# what a job's `without_tiles` rasters are, for the dock's message and Processing's log
WITHOUT_TILES = ("no tile with enough data to search (nodata, or smaller than a tile: an index with a smaller tile "
                 "size takes those)")


def without_tiles_said(paths: Optional[list]) -> str:
    """A job's `without_tiles` rasters, named for a one-line message ("" when it has none)."""
    return f"{len(paths)} raster(s) with {WITHOUT_TILES}: {_names([{'raster': p} for p in paths])}" if paths else ""


def tiles_held(job: dict) -> int:
    """The tiles an ended indexing job's index holds (its progress counts the run's own, skipped
    ones included: the dock said "38 tiles" of an index of 36, and "12" of an index of 1,000 it
    extended and then cancelled); of a worker that does not say, the run's tiles indexed."""
    held = job.get("tile_count")
    return job["tiles_done"] - job["tiles_skipped"] if held is None else held


def tiles_held_said(job: dict) -> str:
    """What an indexing job's index holds once it ended, for the dock's message and Processing's
    log; the index's other rasters an earlier run left unfinished (the job ended done, and the
    user took the index as complete)."""
    if job.get("tile_count") is None:  # a worker that does not say
        return f"this run indexed {tiles_held(job)} tiles"
    skipped = f" ({job['tiles_skipped']} with too little data skipped)" if job["state"] == states.DONE else ""
    unfinished = job.get("unfinished") or []
    others = (f"; {others_unfinished(unfinished)}: build again with them to finish them: "
              f"{_names([{'raster': p} for p in unfinished])}" if unfinished else "")
    return f"the index holds {tiles_held(job)} tiles{skipped}{others}"


def _job_ended(job: dict) -> tuple:
    """What the message bar says of an ended job (an indexing run or a removal), and how loud."""
    what = "Removing rasters" if job.get("kind") == "remove" else "Indexing"
    if job["state"] == states.FAILED:
        return f"{what} failed: {job['error']['message']}", Qgis.Critical
    level = Qgis.Success if job["state"] == states.DONE else Qgis.Info
    if job.get("kind") != "remove":
        said = f"Indexing {job['state']}: {tiles_held_said(job)}."
        empty = without_tiles_said(job.get("without_tiles"))
        # indexed, and yet a search finds nothing of them
        if empty:
            return f"{said} {empty}", Qgis.Warning
        return said, Qgis.Warning if job.get("unfinished") else level
    if job["state"] == states.DONE:
        return f"Removed {len(job['removed'])} raster(s) from “{job['index']}”.", level
    return f"{what} {job['state']}.", level


class SearchController(QObject):
    status_changed = pyqtSignal(str, str)  # text, colour name
    notice = pyqtSignal(str, object, str)  # text, Qgis message level, details for the log
    worker_info = pyqtSignal(dict)  # the info reply of the worker connected to
    worker_stopped = pyqtSignal(object)  # a WorkerExit: the local worker stopped by itself
    indexes_listed = pyqtSignal(list)  # the worker's indexes (list_indexes items)
    set_up_ended = pyqtSignal(bool, str, bool)  # success, what to tell the user, whether its worker starts now
    job_changed = pyqtSignal(dict)  # the indexing job started from here, after each event
    job_lost = pyqtSignal(dict)  # its last event, when the connection it was followed on closed
    # the index item of a lost job the worker, listing it again, no longer runs ({"name", "missing"}: not listed)
    lost_job_ended = pyqtSignal(dict)
    index_job_changed = pyqtSignal(dict)  # any client's indexing job, after each event
    search_running = pyqtSignal(bool)
    results_ready = pyqtSignal(object)  # the new hits layer, already in the project

    def __init__(self, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.link: Optional[WorkerLink] = None
        self.local_worker: Optional[LocalWorker] = None
        self.finder = WorkerFinder(self)
        self.finder.setup_started.connect(lambda _: self._show_status_now(Status.SETTING_UP))
        self.finder.setup_ended.connect(self._set_up)
        self.endpoint_to_start = Setting.ENDPOINT.get()  # where a worker found or set up will be started
        self.info: dict = {}
        self._not_answering = False  # the light says so (an unanswered request), until a reply comes
        self.indexes: list = []
        self.job_id: Optional[str] = None  # the indexing job started here, followed in the dock
        self._followed_job: dict = {}  # its last progress
        self.result_layer = None
        self._search_id: Optional[str] = None  # the search waited for (cancel_search)
        self.search_count = 0  # this project's last, so that no layer gets a name twice (one removed too)
        QgsProject.instance().cleared.connect(self._project_cleared)
        QgsProject.instance().fileNameChanged.connect(self._project_named)
        self.connect_timeout_s = 10.0  # for the first answer of a worker
        self.request_timeout_s = 60.0

    @property
    def _resumable(self) -> Optional[tuple]:
        """(endpoint, index, job id) of the job followed until the connection closed or the worker
        stopped (by this plugin, or by the one before a reload or a restart of QGIS:
        settings.followed_job): followed again when that worker lists a job of the index (one it
        resumed, or runs on) or says the job runs, else said as the index was left (lost_job_ended)."""
        return followed_job()

    @_resumable.setter
    def _resumable(self, job: Optional[tuple]) -> None:
        keep_followed_job(job)

    # -- connection -------------------------------------------------------------------------------
    def connect_worker(self, connection: Connection) -> None:
        """Connect to a worker and remember its endpoint for the next QGIS session (the key files are
        the settings' own)."""
        try:
            curve = connection.curve_keys()
        except (OSError, ValueError) as exc:
            self.notice.emit(f"CURVE keys not usable: {exc}. Choose both key files, or neither, in Settings.",
                             Qgis.Warning, "")
            return
        if self._open_link(connection.endpoint, curve):
            Setting.ENDPOINT.set(connection.endpoint)

    def find_worker(self) -> None:
        """Look for a usable local worker (the finder says what it found)."""
        self.finder.find()

    def start_local_worker(self, endpoint: str) -> None:
        """Start the configured worker Python's `python -m worker serve` here and connect to it;
        with none configured, look for one (the finder offers it, or explains what is needed),
        or, while one is being set up, say that it starts once it is."""
        command = WorkerCommand.configured()
        if command is None and self.finder.setting_up:  # it starts where the set-up was asked to start it
            self.notice.emit(f"The worker is being set up: it starts at {self.endpoint_to_start} once it is "
                             "(its log is in the dock).", Qgis.Info, "")
            return
        if not self._aim_at(endpoint):
            return
        if command is None:
            self.finder.find()
        else:
            self._start(command)

    def use_worker(self, command: WorkerCommand, endpoint: str) -> None:
        """Save a worker the finder offered as the configured one, and start it at `endpoint`."""
        command.save()
        if self._aim_at(endpoint):
            self._start(command)

    def set_up_worker(self, checkout: Path, endpoint: str) -> None:
        """Run the checkout's scripts/setup in the background, then start its worker at `endpoint`
        (or, connected meanwhile to another worker, make it the one Start local worker starts)."""
        if not self._aim_at(endpoint):  # told now, not once the set-up's minutes are over
            return
        refused = self.finder.set_up(checkout)
        if refused:
            self.notice.emit(f"Cannot set up the worker: {refused}.", Qgis.Warning, "")

    def _set_up(self, ok: bool, message: str, command: Optional[WorkerCommand]) -> None:
        starts = ok and not self._linked_elsewhere()  # a worker the user chose meanwhile is not taken from them
        if ok and not starts:
            command.save()
            message = (f"{message} It was not started, as this dock is connected to the worker at "
                       f"{self.link.endpoint}: to use it, press Start local worker with the endpoint "
                       f"{self.endpoint_to_start}.")
        self.notice.emit(message, Qgis.Success if ok else Qgis.Critical, "")
        self.set_up_ended.emit(ok, message, starts)
        if starts:
            self.use_worker(command, self.endpoint_to_start)
        elif not ok:
            self._show_status_now(Status.DISCONNECTED)

    def _linked_elsewhere(self) -> bool:
        """Connected to another worker than this dock's local one (which a set-up restarts)."""
        return self.link is not None and not self._linked_to(self.local_worker)

    def _aim_at(self, endpoint: str) -> bool:
        """Make `endpoint` where the next local worker starts (endpoint_to_start), or say why
        ZeroMQ cannot dial it and leave the last one: an endpoint is checked before it is kept, so
        a set-up that ends minutes later never finds it unusable (it said "Starting it…" while
        nothing started)."""
        problem = endpoint_problem(dialable(endpoint, endpoint))
        if problem:
            self.notice.emit(problem, Qgis.Warning, "")
            return False
        self.endpoint_to_start = endpoint
        return True

    def _start(self, command: WorkerCommand) -> None:
        """Start `command`'s worker at endpoint_to_start (dialable: _aim_at), in place of the last one."""
        self.stop_local_worker()
        Setting.ENDPOINT.set(self.endpoint_to_start)
        self.local_worker = LocalWorker(command, self.endpoint_to_start, Setting.INDEX_ROOT.as_path(), self)
        self.local_worker.ready.connect(lambda bound: self._open_link(bound, None))
        self.local_worker.stopped.connect(self._local_worker_stopped)
        self.status_changed.emit(*Status.STARTING)
        self.local_worker.start()

    def _local_worker_stopped(self, exit_: WorkerExit) -> None:
        stopped, self.local_worker = self.local_worker, None
        if self._linked_to(stopped):
            self._close_link()
        stopped.deleteLater()
        self._show_status_now(Status.STOPPED)
        self.worker_stopped.emit(exit_)
        self.notice.emit(exit_.message, Qgis.Critical, "\n".join(exit_.last_lines))

    def _linked_to(self, worker: Optional[LocalWorker]) -> bool:
        """Whether the connection is to `worker` (None: no local worker): one that never served is
        not what the dock is connected to, even at its endpoint (a worker there already, this one
        refused the port)."""
        return (worker is not None and worker.serving and self.link is not None
                and self.link.endpoint == dialable(worker.endpoint, worker.endpoint))

    def stop_by_user(self) -> None:
        """The user's Stop: the local worker asked to stop, and this plugin no longer connected to it."""
        if self._linked_to(self.local_worker):
            self._close_link()
        self.stop_local_worker()
        self._show_status_now(Status.DISCONNECTED)

    def _show_status_now(self, otherwise: tuple) -> None:
        """The light once a worker stopped or a set-up began or ended: the worker this dock is
        linked to as it last was (connected, not answering, connecting), else a local worker
        starting, else a set-up under way; else `otherwise`."""
        if self.link is not None:
            status = (Status.NOT_ANSWERING if self._not_answering
                      else Status.connected(self.info) if self.info else Status.CONNECTING)
        elif self.local_worker is not None:
            status = Status.STARTING
        elif self.finder.setting_up:
            status = Status.SETTING_UP
        else:
            status = otherwise
        self.status_changed.emit(*status)

    def stop_local_worker(self) -> None:
        """Ask the local worker to stop; it finishes in the background (LocalWorker.stop)."""
        if self.local_worker is not None:
            self.local_worker.stop()
            self.local_worker = None

    def _open_link(self, endpoint: str, curve: Optional[CurveKeys]) -> bool:
        """Connect to the worker at `endpoint`, closing the last connection; False, and a message,
        for an endpoint ZeroMQ cannot dial (the last connection then stays). Job progress is
        subscribed to once the worker says where it publishes (_on_info)."""
        problem = endpoint_problem(endpoint)
        if problem:
            self.notice.emit(problem, Qgis.Warning, "")
            return False
        link = WorkerLink(endpoint, curve=curve, timeout_s=self.request_timeout_s)
        self._close_link()
        self._not_answering, self.info = False, {}  # until this worker says who it is
        link.setParent(self)
        self.link = link
        self.link.job_event.connect(self._on_job)
        self.link.answered.connect(self._answered)
        self.link.lost.connect(self._link_lost)
        self.link.back.connect(self._link_back)
        self.link.callback_failed.connect(lambda tb: self.notice.emit(
            "Sketch search hit an internal error; details are in the log panel.", Qgis.Critical, tb))
        self.status_changed.emit(*Status.CONNECTING)
        self.link.request("info", self._on_info, timeout_s=self.connect_timeout_s)
        return True

    def _close_link(self, tell_waiting: bool = True) -> None:
        """Close the connection; the requests waiting on it end (WorkerLink.close), and the job
        followed here is no longer (job_lost), until this worker lists it again (_on_indexes:
        followed again, or lost_job_ended)."""
        if self.link is None:
            return
        link, self.link = self.link, None  # what the closed requests' answers do finds no link
        if self.job_id is not None:
            self._resumable = (link.endpoint, self._followed_job["index"], self.job_id)
            self.job_id = None
            self.job_lost.emit(self._followed_job)
        link.close(tell_waiting)
        link.deleteLater()

    def _on_info(self, reply: Optional[dict], err: Optional[WorkerError]) -> None:
        if err:
            return self._failed("Connecting to the worker", err)
        lacking = info_lacks(reply)
        if lacking:  # was kept: every later status update raised, and the light said "connecting…" for good
            self.status_changed.emit(*Status.NOT_A_WORKER)
            return self.notice.emit(f"The service at {self.link.endpoint} answered, but not as a sketch search worker "
                                    f"of this version (its info has no {lacking}): check the endpoint, or update "
                                    "the worker.", Qgis.Warning, "")
        if reply.get("pub"):
            try:
                self.link.subscribe(reply["pub"])
            except zmq.ZMQError as exc:
                self.notice.emit(f"Indexing progress cannot be followed ({reply['pub']}: {exc}); searches work.",
                                 Qgis.Warning, "")
        self.info, self._not_answering = reply, False
        self.status_changed.emit(*Status.connected(reply))
        self.worker_info.emit(reply)
        self.refresh_indexes()

    def _ready(self) -> bool:
        if self.link is None:
            self.notice.emit("Connect to a worker first (Start local worker, or Connect to a running one).",
                             Qgis.Warning, "")
        return self.link is not None

    def _answered(self) -> None:
        """A reply came: a light that said "not answering" shows the worker connected again (asked
        who it is, when its first answer was the one missed)."""
        if not self._not_answering or self.link is None:
            return
        self._not_answering = False
        if self.info:
            self.status_changed.emit(*Status.connected(self.info))
        else:
            self.link.request("info", self._on_info, timeout_s=self.connect_timeout_s)

    def _link_lost(self) -> None:
        """The connection dropped: the light says so at once (it said "connected" until a request
        timed out), and says who answers when a worker takes the connection again (`back`)."""
        self._not_answering = True
        self.status_changed.emit(*Status.NOT_ANSWERING)

    def _link_back(self) -> None:
        if self.link is not None:
            self.link.request("info", self._on_info, timeout_s=self.connect_timeout_s)

    def _failed(self, what: str, err: WorkerError) -> None:
        if err.code == codes.CLOSED:  # connected elsewhere, or the local worker stopped (said apart)
            return self.notice.emit(f"{what} stopped: {err.message}.", Qgis.Info, "")
        self.notice.emit(f"{what} failed: {told(err)}",
                         Qgis.Critical if err.code == codes.INTERNAL else Qgis.Warning,
                         f"{what} failed ({err.code}): {err.message}")
        if err.code == codes.UNAVAILABLE:
            self._not_answering = True
            self.status_changed.emit(*Status.NOT_ANSWERING)

    # -- indexes ----------------------------------------------------------------------------------
    def refresh_indexes(self) -> None:
        if self.link is not None:  # listed beside searches, under their limit (opening large indexes takes seconds)
            self.link.request("list_indexes", self._on_indexes, timeout_s=self._pooled_timeout_s())

    def _on_indexes(self, reply: Optional[dict], err: Optional[WorkerError]) -> None:
        if err:
            return self._failed("Listing indexes", err)
        self.indexes = reply["indexes"]
        resumable = self._resumable
        if resumable and self.link is not None and resumable[0] == self.link.endpoint and self.job_id is None:
            # the worker the job was followed on, listing its indexes; a job started here since is followed instead
            _, index, job_id = resumable
            left = self.index_named(index) or {"name": index, "missing": True}
            self.link.request("job", lambda r, e: self._on_lost_job(r, e, resumable, left), job=job_id)
        self.indexes_listed.emit(self.indexes)

    def _on_lost_job(self, reply: Optional[dict], err: Optional[WorkerError], resumable: tuple, left: dict) -> None:
        """The job followed before, asked of the worker by its id (a job it resumed after a restart
        keeps it): followed again while it runs, else said as its index was left (`left`, its
        listed item). Only by id: by the index's name, another user's job of it was taken over."""
        if self.job_id is not None or self._resumable != resumable:  # a job started here, or asked already
            return
        if err is not None and err.code in (codes.CLOSED, codes.UNAVAILABLE, codes.TIMEOUT):
            return  # asked again at the next listing
        self._resumable = None
        job = reply["job"] if err is None else None
        if job is not None and job["state"] in states.ACTIVE:
            self.job_id = job["id"]
            self._on_job(job)
        else:
            self.lost_job_ended.emit(left)

    def index_named(self, name: str) -> Optional[dict]:
        """The last listed item of an index, or None."""
        return next((item for item in self.indexes if item["name"] == name), None)

    def build_index(self, build: IndexBuild) -> None:
        """Start (or join) the worker's indexing job; progress arrives as job_changed."""
        if not self._ready():
            return
        if not build.name:
            return self.notice.emit("Name the index to build (or select one to extend).", Qgis.Warning, "")
        if not build.rasters:
            return self.notice.emit("Add raster layers to the project and tick the ones to index.", Qgis.Warning, "")
        self.link.request("index", lambda r, e: self._on_job_started(r, e, "Starting the index"), **build.fields())

    def remove_rasters(self, name: str, rasters: list) -> None:
        """Take rasters out of an index on the worker (the dock has asked which): a job, followed
        as an indexing job is."""
        if self._ready():
            self.link.request("remove_rasters", lambda r, e: self._on_job_started(r, e, "Removing rasters"),
                              index=name, rasters=rasters)

    def _on_job_started(self, reply: Optional[dict], err: Optional[WorkerError], what: str) -> None:
        if err:
            return self._failed(what, err)
        self.job_id = reply["job"]["id"]
        self._on_job(reply["job"])
        self.refresh_indexes()  # a new index is listed while it is built

    def _on_job(self, job: dict) -> None:
        self.index_job_changed.emit(job)
        if job["state"] in states.FINISHED:  # this client's job or another's
            for layer in QgsProject.instance().mapLayersByName(tiles_layer_name(job["index"])):
                # the worker wrote the tiles layer again: read afresh (the old file stayed open), keeping its style
                layer.setDataSource(layer.source(), layer.name(), "ogr")
        if job["id"] != self.job_id:
            return  # another client's job
        self._followed_job = job
        self.job_changed.emit(job)
        if job["state"] not in states.FINISHED:
            return
        self.job_id = None
        if job["state"] == states.INTERRUPTED and self.link is not None and job.get("kind") != "remove":
            # the worker stopping: its indexing goes on when it starts again
            self._resumable = (self.link.endpoint, job["index"], job["id"])
        self.notice.emit(*_job_ended(job), "")
        self.refresh_indexes()

    def cancel_job(self) -> None:
        """Stop the indexing job after its batch in progress (what was committed stays)."""
        if self.link is not None and self.job_id:
            self.link.request("cancel", lambda r, e: e and self._failed("Cancelling", e), job=self.job_id)

    def delete_index(self, name: str) -> None:
        """Delete an index on the worker (the dock has asked the user); its tiles layer goes too."""
        if self._ready():
            self.link.request("delete_index", lambda r, e: self._on_deleted(name, e), index=name)

    def _on_deleted(self, name: str, err: Optional[WorkerError]) -> None:
        if err:
            return self._failed(f"Deleting index “{name}”", err)
        project = QgsProject.instance()
        for layer in project.mapLayersByName(tiles_layer_name(name)):
            project.removeMapLayer(layer.id())
        self.notice.emit(f"Index “{name}” deleted.", Qgis.Success, "")
        self.refresh_indexes()

    def show_tiles(self, name: str) -> None:
        """Add the index's tiles layer to the project (or say why it cannot be shown here)."""
        index = self.index_named(name)
        if index is None:
            return self.notice.emit("Select an index in the list first.", Qgis.Warning, "")
        why_not = why_no_tiles_layer(index)
        if why_not:
            return self.notice.emit(why_not, Qgis.Warning, "")
        project = QgsProject.instance()
        for old in project.mapLayersByName(tiles_layer_name(name)):
            project.removeMapLayer(old.id())
        layer = tiles_layer(index)
        if not layer.isValid():
            return self.notice.emit(f"QGIS cannot read {index['tiles_layer']}: build or extend the index again "
                                    "to rewrite it.", Qgis.Warning, "")
        project.addMapLayer(layer)

    # -- search -----------------------------------------------------------------------------------
    def search(self, query: SearchQuery) -> None:
        """Send the search; the hits come back as a new layer (results_ready)."""
        if not self._ready():
            return
        frames, fields = query.message()
        self.search_running.emit(True)
        started = time.perf_counter()
        try:
            self._search_id = self.link.request("search", lambda r, e: self._on_hits(r, e, query, started),
                                                frames=frames, timeout_s=self._pooled_timeout_s(), **fields)
        except Exception:  # never sent: no answer will end it
            self.search_running.emit(False)
            raise

    def cancel_search(self) -> None:
        """Stop waiting for the search running (a worker far away or frozen kept Search disabled
        for its whole time limit, 70 s by default); its answer, if it comes, is dropped. The
        worker is told too (WorkerLink.cancel), so the next search does not wait behind it."""
        if self._search_id is not None and self.link is not None:
            self.link.cancel(self._search_id, "cancelled; its answer, if it comes, is dropped")
        else:  # none is waited for: the dock shows none running
            self.search_running.emit(False)

    def _pooled_timeout_s(self) -> float:
        return search_wait_s(self.info, self.request_timeout_s)

    def _on_hits(self, reply: Optional[dict], err: Optional[WorkerError], query: SearchQuery, started: float) -> None:
        self._search_id = None
        self.search_running.emit(False)
        if err:
            if err.code == codes.NOT_FOUND:  # the index (or a raster) gone: the list offered it still
                self.refresh_indexes()
            return self._failed("Search", err)
        left_out, changed = reply.get("left_out") or [], reply.get("changed") or []
        partly = reply.get("partly_indexed") or []  # a worker before it did not say
        unread = reply.get("unread_places") or []  # nor this
        sized = reply.get("out_of_scale") or []  # nor this: a place traced larger or smaller than the index finds
        own_only = reply.get("own_place_only") or []  # nor this: an example whose own place kept every place out
        cut = reply.get("example_cut") or []  # nor this: an example's box reaching past its raster
        # nor this: an index searched without its ANN shortlist's help, or not all of it (minutes at 10M tiles)
        slower = (reply.get("scan") or {}).get("advice")
        unsearched = [f"Not searched: {_names(left_out)}." if left_out else "",
                      f"Searched in part, still being indexed or stopped: {_names(partly)}." if partly else "",
                      f"Places that cannot be read, left out: {_names(unread)}." if unread else "",
                      *(f"{os.path.basename(s['raster'])}: {s['reason']}." for s in sized),  # "this raster"
                      *(f"{s['reason'][:1].upper()}{s['reason'][1:]}." for s in own_only),
                      *(f"{os.path.basename(s['raster'])}: {s['reason']}." for s in cut),
                      f"{query.index}: {slower}." if slower else ""]
        if not reply["hits"]["features"]:  # was a green "0 hit(s)" and an empty layer
            where = " in the map view: pan or zoom out, or search the whole index" if query.bbox is not None else ""
            return self.notice.emit(" ".join([f"No places found{where}.", *filter(None, unsearched)]),
                                    Qgis.Warning, _reasons(left_out + partly + unread + sized + own_only + cut))
        query_ms = (time.perf_counter() - started) * 1e3
        self.search_count = max([self.search_count, *_search_numbers(QgsProject.instance())]) + 1
        name = f"{SEARCH_LAYER_PREFIX} {self.search_count}: {query.index}"
        hits_crs = QgsCoordinateReferenceSystem(query.crs)
        project_crs = QgsProject.instance().crs()
        layer = hits_layer(reply["hits"], name, hits_crs, project_crs if project_crs.isValid() else hits_crs, query_ms)
        keep_query(layer, query.to_json(), self.info.get("model"))
        path = results_file(QgsProject.instance())
        kept = kept_on_disk(layer, path, f"sketch_search_{time.strftime('%Y%m%d_%H%M%S')}_{self.search_count}")
        if isinstance(kept, str):
            self.notice.emit(f"The hits are kept in memory only, not saved with the project ({path}: {kept}); "
                             "use Save results.", Qgis.Warning, "")
        else:
            layer = kept
        QgsProject.instance().addMapLayer(layer)
        self.result_layer = layer
        self.results_ready.emit(layer)
        found = f"{layer.featureCount()} hit(s) in {query_ms:.0f} ms, added as layer “{name}”."
        said = [*unsearched, f"Changed on disk since indexed, index again: {_names(changed)}." if changed else ""]
        if left_out or partly or unread or changed or sized or cut:  # each raster's whole reason in the details
            self.notice.emit(" ".join([found, *filter(None, said)]), Qgis.Warning,
                             _reasons(left_out + partly + unread + changed + sized + cut))
        else:
            self.notice.emit(" ".join([found, *filter(None, said)]), Qgis.Info if slower else Qgis.Success, "")

    def query_of(self, layer) -> Optional[SearchQuery]:
        """The query a results layer answers (kept with it, or in its GeoPackage), or None and a message."""
        if layer is None:  # said as a layer holding no search, of a reopened project's results (probe)
            self.notice.emit("No search results are listed: search, or select a layer of search results in the "
                             "Layers panel.", Qgis.Warning, "")
            return None
        text = saved_query(layer)
        if not text:
            self.notice.emit("That layer holds no sketch search: choose a layer of search results.", Qgis.Warning, "")
            return None
        try:
            return SearchQuery.from_json(text)
        except ValueError as exc:
            self.notice.emit(f"The layer's saved search cannot be read: {exc}.", Qgis.Warning, "")
            return None

    def run_again(self, layer) -> None:
        """Repeat the search a results layer answers (e.g. on an index built again); a new layer."""
        query = self.query_of(layer)
        if query is not None:
            self.search(query)

    def refine(self, layer) -> None:
        """The layer's search again, with the hits marked good and bad (the `feedback` field): a new layer."""
        query = self.query_of(layer)
        if query is None:
            return
        good, bad = marks(layer)
        if not good and not bad:
            return self.notice.emit("Mark some hits 👍 or 👎 first (buttons under the list, or the + and - keys).",
                                    Qgis.Warning, "")
        self.search(query.with_feedback(good, bad))

    def mark(self, layer, feature_id: int, mark: Optional[int]) -> None:
        """Store the user's mark of a hit (GOOD, BAD or None) in the layer's `feedback` field."""
        if mark not in (GOOD, BAD, None) or not set_mark(layer, feature_id, mark):
            self.notice.emit("That layer cannot hold marks (it has no `feedback` field or is read-only).",
                             Qgis.Warning, "")

    def more_like_this(self, layer, feature) -> None:
        """Search for places like one hit: its square, read from its raster, as the example."""
        query = self.query_of(layer)
        if query is None:
            return
        raster = feature["raster"]
        if not isinstance(raster, str) or not raster:
            return self.notice.emit("That hit names no raster.", Qgis.Warning, "")
        box = feature.geometry().boundingBox()
        crs = layer.crs()
        example = {"raster": raster, "bbox": [box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()],
                   "crs": crs_name(crs) or "EPSG:4326"}
        self.search(SearchQuery(index=query.index, top=query.top, crs=query.crs, example=example))

    def save_results(self, path: str) -> None:
        """Write the results layer listed (the newest search's, or the one selected since) to a
        GeoPackage (`path`, .gpkg added when not typed)."""
        if self.result_layer is None:
            return self.notice.emit("Search first: there are no results to save.", Qgis.Warning, "")
        path = gpkg_path(path)
        table = free_table(path, self.result_layer.name())
        error = save_gpkg(self.result_layer, path, table)
        if error:
            self.notice.emit(f"Saving failed: {error}.", Qgis.Critical, "")
        else:
            self.notice.emit(f"Results saved to {path} as “{table}”.", Qgis.Success, "")

    def _project_cleared(self) -> None:
        """A new or another project: its results are numbered from its own (a new project's first
        search was "Sketch search 7", after the last one's six)."""
        self.search_count = 0

    def _project_named(self) -> None:
        """A project saved for the first time, before QGIS writes it: the results searched
        before, kept in the profile, are written beside it, so the saved project names them there
        (Save As of a saved project leaves its results beside the old file, where they were)."""
        if not QgsProject.instance().fileName():
            return
        moved, problems = take_results_beside(QgsProject.instance())
        if problems:
            self.notice.emit(f"{len(problems)} results layer(s) stay in the QGIS profile, not beside the project "
                             "(use Save results to keep them with it).", Qgis.Warning, "\n".join(problems))
        elif moved:
            self.notice.emit(f"{moved} results layer(s) searched before the project was saved are now kept beside "
                             f"it, in {results_file(QgsProject.instance()).name}.", Qgis.Info, "")

    def shutdown(self) -> None:
        """Close sockets, stop the worker search and set-up, and ask a local worker to stop (on
        unload, and when QGIS quits: then the plugin waits for it, local_worker.finish_stopping)."""
        self._close_link(tell_waiting=False)  # QGIS quitting or the plugin unloaded: no one to tell
        try:
            QgsProject.instance().cleared.disconnect(self._project_cleared)
            QgsProject.instance().fileNameChanged.disconnect(self._project_named)
        except TypeError:  # shut down already: QGIS quitting, then unloading its plugins
            pass
        self.finder.shutdown()
        self.stop_local_worker()
