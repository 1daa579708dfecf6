"""The worker service over real ZeroMQ sockets, in a real subprocess."""

from __future__ import annotations

import io
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zmq
from PIL import Image

from wire import errors as codes
from wire import job_states as states
from wire.client import WorkerClient
from wire.errors import ConnectionDropped, RequestCancelled, WorkerError, WorkerUnavailable
from wire.protocol import decode_progress, decode_reply, encode_request
from wire.sockets import CurveKeys, subscribe_progress
from worker.openmp import USER_CHOICES
from worker.store import TileIndex
from lab.many_shards import split_copy
from lab.worker_process import REPO, WorkerProcess, free_port, make_curve_keys, wait_job


@pytest.fixture(scope="module")
def rasters(tmp_path_factory, assets) -> Path:
    root = tmp_path_factory.mktemp("rasters")
    shutil.copy(assets["rmnp_rgb"], root / "rmnp-rgb.tif")
    shutil.copy(assets["osbs_rgb"], root / "OSBS_029.tif")
    shutil.copy(assets["s2_rgb"], root / "s2.tif")
    return root


@pytest.fixture(scope="module")
def worker(tmp_path_factory, rasters):
    root = tmp_path_factory.mktemp("service") / "indexes"
    root.mkdir()
    proc = WorkerProcess(root, rasters).start()
    proc.index("rmnp", [rasters / "rmnp-rgb.tif"], tile=112, scales=[1, 2])
    yield proc
    proc.stop()


def sketch_png(size: int = 256) -> bytes:
    img = Image.new("L", (size, size), 255)
    from PIL import ImageDraw

    ImageDraw.Draw(img).line([(20, 200), (90, 120), (160, 140), (230, 40)], fill=0, width=4)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_ping_info_and_list_indexes(worker):
    with worker.client() as c:
        assert c.ping()["ok"]
        info = c.info()
        assert info["device"] == "cpu" and info["cuda"] is False
        assert info["model"]["timm_name"] == "vit_small_patch14_dinov2"
        [index] = c.list_indexes()
        assert index["name"] == "rmnp" and index["complete"] and index["compatible"] and index["tile_count"] > 0


def test_info_says_the_tiling_defaults_and_the_list_where_each_index_lies(worker):
    from worker.tiling import TileSettings

    with worker.client() as c:
        defaults = c.info()["tiling_defaults"]
        [index] = c.list_indexes()
    assert defaults == TileSettings().to_json() and defaults["tile"] == 224
    assert index["path"] == str((worker.index_root / "rmnp").resolve())
    assert index["tiles_layer"] == str((worker.index_root / "rmnp" / "tiles.gpkg").resolve())
    assert Path(index["tiles_layer"]).is_file()


def test_delete_index_removes_only_an_index_folder_inside_the_root(worker):
    root = worker.index_root
    shutil.copytree(root / "rmnp", root / "doomed")
    shutil.copytree(root / "rmnp", root / "outer" / "inner")
    shutil.copy(root / "rmnp" / "manifest.json", root / "outer" / "manifest.json")
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("not an index")
    shutil.copytree(root / "rmnp", root / "coast" / "2023" / "a")
    shutil.copytree(root / "rmnp", root / "coast" / "2024" / "b")
    try:
        with worker.client() as c:
            assert c.request("delete_index", index="doomed")["deleted"] == "doomed"
            c.request("delete_index", index="coast/2024/b")  # the folders it leaves empty go with it
            assert not (root / "coast" / "2024").exists() and (root / "coast" / "2023" / "a").is_dir()
            c.request("delete_index", index="coast/2023/a")
            assert not (root / "coast").exists()
            refused = {}
            for name in ("plain", ".", "../elsewhere", "outer", "never-built"):
                with pytest.raises(WorkerError) as err:
                    c.request("delete_index", index=name)
                refused[name] = err.value
            assert c.request("delete_index", index="outer/inner")["deleted"] == "outer/inner"
            assert c.request("delete_index", index="outer")["deleted"] == "outer"
            names = {i["name"] for i in c.list_indexes()}
        assert {n: e.code for n, e in refused.items()} == {
            "plain": codes.NOT_FOUND, ".": codes.FORBIDDEN, "../elsewhere": codes.FORBIDDEN, "outer": codes.FORBIDDEN,
            "never-built": codes.NOT_FOUND}
        assert "outer/inner" in refused["outer"].message, "says which index is in the way"
        assert not (root / "doomed").exists() and not (root / "outer").exists()
        assert (root / "plain" / "notes.txt").read_text() == "not an index", "a folder that is no index stays"
        assert (root / "rmnp" / "manifest.json").is_file() and names == {"rmnp"}
    finally:
        for name in ("doomed", "outer", "plain", "coast"):
            shutil.rmtree(root / name, ignore_errors=True)


def test_deleting_a_large_index_leaves_the_service_answering(worker, s2_index):
    """The folder of a deleted index was removed before the reply, on the service's loop: for
    a 10M-tile index's 39,000 shards, 13.7 s in which no client was answered (the concurrency
    probe). It is moved away at once, its name free, and removed beside the loop: a ping sent
    after the delete is answered while its files are still being removed, and they all go."""
    split_copy(s2_index, worker.index_root / "large", shards=4000, per_shard=1)
    removing = []  # the index's trash as the ping is answered

    def look(reply) -> None:
        if reply.id == "the-ping":
            removing.extend(worker.index_root.glob(".deleted-*"))

    try:
        replies = _replies_in_order(worker, encode_request("delete_index", "the-delete", index="large"),
                                    encode_request("ping", "the-ping"), on_reply=look)
        assert [r.id for r in replies] == ["the-delete", "the-ping"] and replies[0].result()["deleted"] == "large"
        assert removing, "the ping waited for the removal"
        assert not (worker.index_root / "large").exists()
        deadline = time.monotonic() + 120
        while any(worker.index_root.glob(".deleted-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(worker.index_root.glob(".deleted-*")), "every file of the index is removed"
    finally:
        shutil.rmtree(worker.index_root / "large", ignore_errors=True)


def _replies_in_order(worker, *requests: list, on_reply=None) -> list:
    """`requests` sent one after another on one connection, and their replies in the order they
    come (`on_reply` called with each as it comes)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(worker.bind)
    try:
        for request in requests:
            sock.send_multipart(request)
        replies = []
        while len(replies) < len(requests) and sock.poll(120_000):
            replies.append(decode_reply(sock.recv_multipart()))
            if on_reply is not None:
                on_reply(replies[-1])
        return replies
    finally:
        sock.close()


def test_an_index_request_of_a_large_folder_leaves_the_service_answering(worker, rasters):
    """An index request looks at every file of the folders it names (10.6 s for a national
    mosaic's 60,000 sheets, the concurrency probe) and opens the index it extends: on the
    service's loop, no client was answered meanwhile. It is checked beside the loop: a ping sent
    after it is answered first, and the request is answered with its job."""
    archive = _archive(rasters)
    try:
        replies = _replies_in_order(worker, encode_request("index", "the-index", index="archive",
                                                           rasters=[str(archive)], tile=112, scales=[1]),
                                    encode_request("ping", "the-ping"))
        assert [r.id for r in replies] == ["the-ping", "the-index"], "the ping waited for the index request"
        job = replies[1].result()["job"]
        assert job["index"] == "archive" and job["kind"] == "index"
        with worker.client() as c:
            c.cancel(job["id"])
            wait_job(c, job["id"])
    finally:
        shutil.rmtree(archive)
        shutil.rmtree(worker.index_root / "archive", ignore_errors=True)


def _archive(rasters: Path) -> Path:
    """A folder of 5,000 files named as rasters: an index request naming it takes a while to check."""
    archive = rasters / "archive"
    for folder in range(5):
        (archive / f"d{folder}").mkdir(parents=True)
        for sheet in range(1000):
            (archive / f"d{folder}" / f"sheet{sheet:04d}.tif").write_bytes(b"II*\0" + bytes(60))
    return archive


def test_an_index_deleted_while_a_request_to_extend_it_is_checked_is_not_built_again(worker, rasters):
    """A request to extend an index is checked beside the loop; an index deleted meanwhile was
    built again from nothing by the job the request then started (a review's finding). The
    request is answered `busy`, saying why, and the index stays deleted."""
    shutil.copytree(worker.index_root / "rmnp", worker.index_root / "victim")
    archive = _archive(rasters)
    try:
        replies = {reply.id: reply for reply in _replies_in_order(
            worker, encode_request("index", "the-index", index="victim", rasters=[str(archive)], tile=112, scales=[1, 2]),
            encode_request("delete_index", "the-delete", index="victim"))}
        assert replies["the-delete"].result()["deleted"] == "victim"
        with pytest.raises(WorkerError) as err:
            replies["the-index"].result()
        assert err.value.code == codes.BUSY and "changed while this request was checked" in err.value.message
        assert not (worker.index_root / "victim").exists()
    finally:
        shutil.rmtree(archive)
        shutil.rmtree(worker.index_root / "victim", ignore_errors=True)


def test_delete_index_and_a_new_job_are_refused_while_the_index_is_written(worker, rasters):
    root = worker.index_root
    with worker.client() as c:
        job = c.start_index("building", [str(rasters / "rmnp-rgb.tif")], tile=64, scales=[1], chunk_tiles=8)
        deadline = time.time() + 120
        while not (root / "building" / "manifest.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(WorkerError) as err:
            c.request("delete_index", index="building")
        assert err.value.code == codes.BUSY and "cancel" in err.value.message
        c.cancel(job["id"])
        assert wait_job(c, job["id"])["state"] in (states.CANCELLED, states.DONE)
        with open(root / "building" / ".lock", "w") as other_writer:  # as a command-line run holds it
            fcntl.flock(other_writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(WorkerError) as err:
                c.request("delete_index", index="building")
            with pytest.raises(WorkerError) as refused:  # was a job that failed as bad input
                c.start_index("building", [str(rasters / "rmnp-rgb.tif")], tile=64, scales=[1], chunk_tiles=8)
        assert err.value.code == codes.BUSY and "another process" in err.value.message
        assert refused.value.code == codes.BUSY and "another process" in refused.value.message
        assert (root / "building" / "manifest.json").is_file(), "nothing removed under the other writer"
        assert c.request("delete_index", index="building")["deleted"] == "building"
        assert "building" not in {i["name"] for i in c.list_indexes()}
    assert not (root / "building").exists()


def test_an_index_request_is_told_whether_it_joined_a_job_another_request_started(worker, rasters):
    """Two Processing builds of one index share its job; the second one's Cancel stopped it, and
    the first failed as "cancelled elsewhere" (probe). The reply now says `joined` when the job
    is another request's, so a client can leave that job to it; a resent copy of the request that
    started the job (its first reply lost) is that request, not another."""
    first = encode_request("index", "the-start", index="shared", rasters=[str(rasters / "s2.tif")], tile=64,
                           scales=[1], chunk_tiles=8)
    try:
        [started] = _replies_in_order(worker, first)
        [resent] = _replies_in_order(worker, first)
        with worker.client() as c:
            other = c.request("index", index="shared", rasters=[str(rasters / "s2.tif")], tile=64, scales=[1],
                              chunk_tiles=8)
            job = started.result()["job"]
            assert job["state"] in states.ACTIVE, "the job still runs as the other request joins it"
            assert started.result()["joined"] is False and resent.result()["joined"] is False
            assert resent.result()["job"]["id"] == job["id"]
            assert other["joined"] is True and other["job"]["id"] == job["id"]
            c.cancel(job["id"])
            wait_job(c, job["id"])
    finally:
        with worker.client() as c:
            c.request("delete_index", index="shared")


def test_rasters_are_taken_out_of_an_index_by_a_job_of_the_worker(worker, rasters):
    """A client (the plugin) could only delete a whole index: a raster indexed by mistake, or
    deleted for good, stayed in it, searched or said unreadable at every search, unless the user
    found the worker's command line. `remove_rasters` runs a job that takes it out; a resent
    request gets that job, a raster the index does not hold removes nothing, and a job building
    the index keeps it busy."""
    osbs, rmnp = str(rasters / "OSBS_029.tif"), str(rasters / "rmnp-rgb.tif")
    worker.index("pair", [rasters / "rmnp-rgb.tif", rasters / "OSBS_029.tif"], tile=112, scales=[1])
    try:
        with worker.client() as c:
            [before] = [i for i in c.list_indexes() if i["name"] == "pair"]
            with pytest.raises(WorkerError) as unknown:
                c.request("remove_rasters", index="pair", rasters=[osbs, str(rasters / "s2.tif")])
            with pytest.raises(WorkerError) as no_index:
                c.request("remove_rasters", index="never-built", rasters=[osbs])
            job = c.request("remove_rasters", index="pair", rasters=[osbs])["job"]
            done = wait_job(c, job["id"])
            resent = c.request("remove_rasters", index="pair", rasters=[osbs])["job"]
            [after] = [i for i in c.list_indexes() if i["name"] == "pair"]
            hits = c.search("pair", sketch_png=sketch_png(), top=20)["hits"]["features"]
            building = c.start_index("pair", [osbs], tile=112, scales=[1], chunk_tiles=4)
            try:
                with pytest.raises(WorkerError) as while_built:
                    c.request("remove_rasters", index="pair", rasters=[rmnp])
            finally:
                c.cancel(building["id"])
                wait_job(c, building["id"])
    finally:
        shutil.rmtree(worker.index_root / "pair", ignore_errors=True)
    assert unknown.value.code == codes.BAD_INPUT and "s2.tif" in unknown.value.message
    assert no_index.value.code == codes.NOT_FOUND
    assert sorted(before["rasters"]) == sorted([osbs, rmnp]), "nothing removed by the refused request"
    assert (done["kind"], done["state"], done["removed"]) == ("remove", states.DONE, [osbs])
    assert resent["id"] == job["id"], "a resent request is answered with its job"
    assert after["rasters"] == [rmnp] and 0 < after["tile_count"] < before["tile_count"]
    assert hits and {h["properties"]["raster"] for h in hits} == {rmnp}
    assert while_built.value.code == codes.BUSY and building["id"] in while_built.value.message


def test_a_search_of_an_index_whose_job_has_committed_nothing_is_busy_not_missing(worker, rasters):
    """An index asked for and not yet begun (its job waits behind another) was `not_found`, "build
    one with index", of the index the user had just asked to build; and `list_indexes` left it
    out, so the plugin's list showed neither it nor its job. It is listed, with its job, as
    nothing to search yet."""
    with worker.client() as c:
        first = c.start_index("first", [str(rasters / "rmnp-rgb.tif")], tile=64, scales=[1], chunk_tiles=8)
        waiting = c.start_index("waiting", [str(rasters / "OSBS_029.tif")], tile=112, scales=[1], tokens=True)
        try:
            assert waiting["state"] == states.QUEUED, "one job runs at a time: it waits behind the first"
            with pytest.raises(WorkerError) as err:
                c.search("waiting", sketch_png=sketch_png(), top=2)
            with pytest.raises(WorkerError) as never_asked:
                c.search("never-asked", sketch_png=sketch_png(), top=2)
            listed = c.list_indexes()
        finally:
            for job in (waiting, first):
                c.cancel(job["id"])
                wait_job(c, job["id"])
    assert err.value.code == codes.BUSY and "waits behind other jobs" in err.value.message
    assert never_asked.value.code == codes.NOT_FOUND
    names = [item["name"] for item in listed]
    assert names == sorted(names, key=Path) and "waiting" in names, names
    queued = next(item for item in listed if item["name"] == "waiting")
    assert queued["job"] == waiting["id"] and queued["last_job"]["state"] == states.QUEUED
    assert (queued["tile_count"], queued["rasters"], queued["complete"], queued["compatible"], queued["tokens"],
            queued["tiling"]["tile"], queued["error"]) == (0, [], False, False, True, 112, None)
    assert queued["reason"] == (f"nothing to search yet: it is being built by job {waiting['id']}, which waits behind "
                                "other jobs: search again once it runs")
    for name in ("first", "waiting"):
        shutil.rmtree(worker.index_root / name, ignore_errors=True)


def test_search_with_a_png_frame_and_with_strokes_in_a_crs(worker):
    with worker.client() as c:
        reply = c.search("rmnp", sketch_png=sketch_png(), top=3, crs="EPSG:3857")
        features = reply["hits"]["features"]
        assert [f["properties"]["rank"] for f in features] == [1, 2, 3]
        assert {"score", "shortlist_score", "raster", "window", "scale"} <= set(features[0]["properties"])
        assert reply["hits"]["crs"]["properties"]["name"].endswith("3857")
        assert reply["timings_ms"]["total_ms"] > 0
        strokes = [[[-105.6, 40.3], [-105.55, 40.35], [-105.5, 40.32]], [[-105.6, 40.25], [-105.5, 40.28]]]
        reply = c.search("rmnp", strokes=strokes, strokes_crs="EPSG:4326", top=2)
        assert len(reply["hits"]["features"]) == 2
        assert "ignored" not in reply, "every field of a well-formed search is used"


def test_a_reply_names_the_fields_its_request_did_not_use(worker, rasters):
    """A typo such as `bboxcrs` was dropped without a word, and the box was read in EPSG:4326;
    the reply now names it (a newer client's fields are named, not refused)."""
    with worker.client() as c:
        typo = c.search("rmnp", sketch_png=sketch_png(), top=2, bbox=[-105.7, 40.2, -105.4, 40.4], bboxcrs="EPSG:4326")
        assert typo["ignored"] == ["bboxcrs"] and len(typo["hits"]["features"]) == 2
        assert c.request("ping", colour="blue")["ignored"] == ["colour"]
        assert "ignored" not in c.request("ping")
        # read and dropped unsaid (probe): a box's CRS without the box, and crop_to_ink of an example
        assert c.search("rmnp", sketch_png=sketch_png(), top=1, bbox_crs="EPSG:32613")["ignored"] == ["bbox_crs"]
        with rasterio.open(rasters / "rmnp-rgb.tif") as src:
            west, south, east, north = src.bounds
        example = {"raster": str(rasters / "rmnp-rgb.tif"), "crs": "EPSG:4326",
                   "bbox": [west, south, west + (east - west) / 3, south + (north - south) / 3]}
        assert c.request("search", index="rmnp", example=example, top=1, crop_to_ink=True)["ignored"] == ["crop_to_ink"]


def test_a_search_cancelled_by_its_client_frees_the_worker_for_the_next(worker):
    """A user who gave up on a slow search and asked another waited behind it: the worker ran
    every search it was sent to its end, one a thread. `cancel` with `search` answers the search
    `cancelled` at once, drops it if it waits, stops it at its next stage if it runs, and only
    the connection that sent it can do so."""
    context = zmq.Context.instance()
    mine, other = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    mine.connect(worker.bind)
    other.connect(worker.bind)
    replies: dict[str, dict] = {}

    def answers(sock, ids, timeout=60):
        deadline = time.time() + timeout
        while not set(ids) <= set(replies) and time.time() < deadline:
            if sock.poll(500):
                reply = json.loads(sock.recv_multipart()[0])
                replies[reply["id"]] = reply
        return [replies.get(i) for i in ids]

    def search(request_id):
        mine.send_multipart(encode_request("search", request_id=request_id, index="rmnp", sketch_frame=1,
                                           frames=(sketch_png(),)))

    try:
        log_before = worker.log.read_text()
        search("running")
        time.sleep(0.05)  # taken by the worker's one search thread
        search("waiting")  # queued behind it
        other.send_multipart(encode_request("cancel", request_id="not-mine", search="running"))
        [not_mine] = answers(other, ["not-mine"])  # before its own connection cancels it
        mine.send_multipart(encode_request("cancel", request_id="c-waiting", search="waiting"))
        mine.send_multipart(encode_request("cancel", request_id="c-running", search="running"))
        cancel_waiting, cancel_running, waiting, running = answers(mine, ["c-waiting", "c-running", "waiting",
                                                                         "running"])
        search("next")
        [after] = answers(mine, ["next"])
        mine.send_multipart(encode_request("cancel", request_id="c-next", search="next"))
        mine.send_multipart(encode_request("cancel", request_id="both", search="next", job="j"))
        mine.send_multipart(encode_request("cancel", request_id="neither"))
        mine.send_multipart(encode_request("cancel", request_id="long", search="x" * 4_000_000))  # was echoed whole
        cancel_answered, both, neither, long = answers(mine, ["c-next", "both", "neither", "long"])
        assert process_until_logged(worker, log_before, "cancelled by its client ended: it stopped before")
    finally:
        mine.close(linger=0)
        other.close(linger=0)
    assert not_mine["ok"] and not_mine["cancelled"] is False, "another connection cannot cancel it"
    assert cancel_waiting["cancelled"] and cancel_running["cancelled"]
    assert waiting["error"]["code"] == running["error"]["code"] == codes.CANCELLED
    assert after["ok"] and after["hits"]["features"], "the next search runs as usual"
    assert cancel_answered["ok"] and cancel_answered["cancelled"] is False, "an answered search is not cancelled"
    assert both["error"]["code"] == neither["error"]["code"] == long["error"]["code"] == codes.BAD_REQUEST
    assert len(json.dumps(long)) < 1000
    assert "`search`" in neither["error"]["message"]


def test_a_search_the_blocking_client_stops_waiting_for_is_cancelled_on_its_connection():
    """Processing's Cancel closed the blocking client's socket and left the search running on
    the worker: the user's next searches waited behind it, or were refused by its full queue.
    The client now sends `cancel` of that search on the connection that sent it, the only one
    the worker takes it from (what the worker does with it:
    test_a_search_cancelled_by_its_client_frees_the_worker_for_the_next)."""
    router = zmq.Context.instance().socket(zmq.ROUTER)  # a worker that takes requests and answers none
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    router.bind(endpoint)
    got = []
    try:
        started = time.monotonic()
        with WorkerClient(endpoint, timeout=30) as c:
            with pytest.raises(RequestCancelled):
                c.search("any", sketch_png=sketch_png(), top=5, cancelled=lambda: time.monotonic() - started > 0.3)
        while len(got) < 2 and router.poll(5000):
            got.append(router.recv_multipart())
    finally:
        router.close(linger=0)
    (search_from, _, search, *_), (cancel_from, _, cancel) = got
    search, cancel = json.loads(search), json.loads(cancel)
    assert (search["op"], cancel["op"], cancel["search"]) == ("search", "cancel", search["id"])
    assert cancel_from == search_from, "on the connection that sent the search"


def test_a_search_resent_or_given_up_after_silence_is_cancelled_on_the_connection_that_sent_it():
    """A client that heard nothing within its timeout resent the search on a fresh connection
    (the Lazy Pirate the protocol asks of clients) and left the first copy running on the
    worker: six users with short timeouts left it busy for 10 s with searches nobody waited for
    (probe). Each copy is cancelled, on its own connection, before the next is sent, and the
    last when the client gives up."""
    router = zmq.Context.instance().socket(zmq.ROUTER)  # a worker that takes requests and answers none
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    router.bind(endpoint)
    got = []
    try:
        with WorkerClient(endpoint, timeout=0.3, retries=2) as c:
            with pytest.raises(WorkerUnavailable):
                c.search("any", sketch_png=sketch_png(), top=5)
        while len(got) < 6 and router.poll(5000):
            got.append(router.recv_multipart())
    finally:
        router.close(linger=0)
    by_connection: dict[bytes, list[dict]] = {}  # in order within a connection, not across them
    for sender, _, fields, *_ in got:
        by_connection.setdefault(sender, []).append(json.loads(fields))
    assert len(by_connection) == 3, "each copy on a connection of its own"
    for search, cancel in by_connection.values():
        assert (search["op"], cancel["op"], cancel["search"]) == ("search", "cancel", search["id"]), by_connection


def test_a_search_dropped_before_it_ran_lets_go_of_its_sketch_at_once():
    """A future cancelled before it ran stays in its pool's queue until a thread takes it off,
    and its work with it: a client sending searches with 8 MB sketches and cancelling them grew
    the worker from 1.2 to 4.6 GB while its one search thread was busy. The loop queues a
    QueuedWork and abandons it: the sketch goes while the thread is still busy."""
    import concurrent.futures as cf
    import gc
    import weakref

    from worker.cancellation import SearchStopped
    from worker.service.loop import QueuedWork

    class Sketch(bytearray):  # what a queued search holds: its request and sketch
        pass

    def queued_search(sketch):
        return QueuedWork(lambda should_stop: {"bytes": len(sketch)})

    busy, release = threading.Event(), threading.Event()
    with cf.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: (busy.set(), release.wait(30)))
        assert busy.wait(10)
        sketch = Sketch(8 << 20)
        held = weakref.ref(sketch)
        work = queued_search(sketch)
        future = pool.submit(work, lambda: False)
        del sketch
        assert future.cancel()
        gc.collect()
        assert held() is not None, "the pool's queue holds it while its thread is busy"
        work.abandon()
        gc.collect()
        assert held() is None, "dropped: let go at once"
        release.set()
    kept = queued_search(Sketch(10))
    assert kept(lambda: False) == {"bytes": 10}
    with pytest.raises(SearchStopped):
        kept(lambda: False)  # run once: what it held is let go as it starts


def process_until_logged(worker, before: str, line: str, timeout: float = 30) -> bool:
    """Whether the worker's log gains `line` after `before` within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if line in worker.log.read_text()[len(before):]:
            return True
        time.sleep(0.1)
    return False


def test_the_documented_codes_and_states_are_the_wires():
    doc = (REPO / "docs" / "protocol.md").read_text()
    documented = re.findall(r"`([a-z_]+)`", doc.split("## Error codes")[1].split("##")[0])
    assert set(documented) == {*codes.SERVER_CODES, codes.UNAVAILABLE, codes.CLOSED}
    row = next(line for line in doc.splitlines() if line.startswith("| `job` |"))
    assert set(re.search(r"`state` \(([a-z, ]+)\)", row).group(1).split(", ")) == states.ACTIVE | states.FINISHED


def test_max_overlap_is_a_search_option(worker):
    from shapely.geometry import shape

    def overlaps(reply: dict) -> float:
        """The largest overlap of two hits, as a fraction of the smaller one."""
        polygons = [shape(f["geometry"]) for f in reply["hits"]["features"]]
        return max(a.intersection(b).area / min(a.area, b.area) for i, a in enumerate(polygons) for b in polygons[i + 1:])

    with worker.client() as c:
        strict = c.search("rmnp", sketch_png=sketch_png(), top=6, max_overlap=0.0)
        default = c.search("rmnp", sketch_png=sketch_png(), top=6)
        loose = c.search("rmnp", sketch_png=sketch_png(), top=6, max_overlap=1.0)
    assert all(len(r["hits"]["features"]) == 6 for r in (strict, default, loose))
    assert overlaps(default) <= 0.3 + 1e-6
    assert overlaps(strict) < 1e-6 < overlaps(loose), "max_overlap reaches the search: 0 keeps apart what 1 lets overlap"


def test_indexes_the_worker_cannot_search_are_listed_with_the_reason(worker):
    """An index of an older format, or built with another model, is listed as incompatible
    (not an internal error) and refused for search with index_mismatch."""
    source = worker.index_root / "rmnp"
    old, other = worker.index_root / "old" / "rmnp", worker.index_root / "other-model"
    try:
        for dest in (old, other):
            shutil.copytree(source, dest)
        manifest = json.loads((source / "manifest.json").read_text())
        (old / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
        (other / "manifest.json").write_text(json.dumps({**manifest, "model": {**manifest["model"], "tile_encoder": "x"}}))
        with worker.client() as c:
            listed = {i["name"]: i for i in c.list_indexes()}
            for name in ("old/rmnp", "other-model"):
                with pytest.raises(WorkerError) as err:
                    c.search(name, sketch_png=sketch_png())
                assert err.value.code == codes.INDEX_MISMATCH
        assert listed["rmnp"]["compatible"] and listed["rmnp"]["reason"] is None
        assert not listed["old/rmnp"]["compatible"] and "build it again" in listed["old/rmnp"]["reason"]
        assert not listed["other-model"]["compatible"] and "another model" in listed["other-model"]["reason"]
        assert listed["other-model"]["tile_count"] == listed["rmnp"]["tile_count"] > 0
    finally:
        shutil.rmtree(old.parent)
        shutil.rmtree(other)


def test_listing_a_large_index_leaves_pings_and_other_replies_flowing(worker, s2_index):
    """Listing opens an index of thousands of shards (a 10M-tile index has 39,000: seconds) off
    the service loop: a ping sent after the list is answered first, then the list itself."""
    split_copy(s2_index, worker.index_root / "many-shards", shards=4000, per_shard=1)
    try:
        replies = _replies_in_order(worker, encode_request("list_indexes", "the-list"), encode_request("ping", "the-ping"))
        assert [r.id for r in replies] == ["the-ping", "the-list"]
        listed = {i["name"]: i for i in replies[1].result()["indexes"]}
        assert listed["many-shards"]["tile_count"] == 4000 and listed["many-shards"]["error"] is None
    finally:
        with worker.client() as c:
            c.request("delete_index", index="many-shards")


def test_bad_requests_get_error_replies_with_codes(worker, rasters, tmp_path):
    with worker.client() as c:
        cases = [
            (lambda: c.search("nope", sketch_png=sketch_png()), codes.NOT_FOUND),
            (lambda: c.search("rmnp", sketch_png=b"garbage"), codes.BAD_INPUT),
            (lambda: c.search("rmnp", sketch_png=_png(Image.new("L", (1, 1), 0))), codes.BAD_INPUT),
            (lambda: c.search("rmnp", sketch_png=_png(Image.new("1", (20000, 20000), 1))), codes.BAD_INPUT),
            (lambda: c.search("rmnp", sketch_png=_png(Image.new("L", (300, 300), 255))), codes.BAD_INPUT),
            (lambda: c.search("../etc", sketch_png=sketch_png()), codes.FORBIDDEN),
            (lambda: c.start_index("x", [str(tmp_path / "outside.tif")]), codes.FORBIDDEN),
            (lambda: c.start_index("x", [str(rasters / "missing.tif")]), codes.BAD_INPUT),
            (lambda: c.request("search", index="rmnp", top="ten", sketch_frame=1, frames=(sketch_png(),)), codes.BAD_REQUEST),
            (lambda: c.request("search", index="rmnp", sketch_frame=2, frames=(sketch_png(),)), codes.BAD_REQUEST),
            (lambda: c.request("search", index="rmnp", sketch_frame=1, frames=(sketch_png(),),
                               strokes=[[[0, 0], [5, 5]]]), codes.BAD_REQUEST),  # not one of them dropped unsaid
            (lambda: c.request("search", index="rmnp", strokes=[[[0, 0], [5, 5]]], strokes_frame=[0, 0]), codes.BAD_REQUEST),
            (lambda: c.request("search", index="rmnp", strokes=[[[0, 0], [5, 5]]], strokes_frame=[0, 0, 0, 0]), codes.BAD_INPUT),
            (lambda: c.request("search", index="rmnp", crop_to_ink="yes", sketch_frame=1, frames=(sketch_png(),)),
             codes.BAD_REQUEST),
            (lambda: c.search("rmnp", sketch_png=sketch_png(), max_overlap=1.5), codes.BAD_INPUT),
            (lambda: c.search("rmnp", sketch_png=sketch_png(), max_overlap="some"), codes.BAD_REQUEST),
            (lambda: c.search("rmnp", sketch_png=sketch_png(), top=0), codes.BAD_INPUT),
            (lambda: c.search("rmnp", sketch_png=sketch_png(), bbox=[1, 1, 0, 0]), codes.BAD_INPUT),
            (lambda: c.start_index("x", [str(rasters / "rmnp-rgb.tif")], chunk_tiles=0), codes.BAD_INPUT),
            (lambda: c.request("teleport"), codes.UNKNOWN_OP),
            (lambda: c.job("no-such-job"), codes.NOT_FOUND),
        ]
        for call, code in cases:
            with pytest.raises(WorkerError) as err:
                call()
            assert err.value.code == code, err.value
        with pytest.raises(WorkerError) as err:  # was the command line's "/server/path/nope is not an index"
            c.search("nope", sketch_png=sketch_png())
        assert "index 'nope' does not exist" in err.value.message and str(worker.index_root) not in err.value.message
        for nothing_to_search in ({}, {"example": None}, {"feedback": {"positive": ["x@1,1,1,0"]}}):
            with pytest.raises(WorkerError) as err:  # was "field 'strokes' is required", to a search by example
                c.request("search", index="rmnp", **nothing_to_search)
            assert err.value.code == codes.BAD_REQUEST and "a sketch" in err.value.message and "example" in err.value.message
        good = [[0, 0], [5, 5]]
        for strokes, said in (([], "no strokes"), ([good, good, []], "stroke 3 of 3 has no points"),
                              ([good, "a line"], "stroke 2 of 2 must be a list of [x, y] points, got str"),
                              ([good, [[1, 1], [2, "3"]]], "stroke 2 of 2, point 2 of 2: must be [x, y], two numbers, "
                                                           "got [2, '3']"),
                              ([[[1, 1, 1]]], "stroke 1 of 1, point 1 of 1")):
            with pytest.raises(WorkerError) as err:  # was "field 'strokes' has an invalid value" and an excerpt
                c.request("search", index="rmnp", strokes=strokes)
            assert err.value.code == codes.BAD_REQUEST and said in err.value.message, err.value.message
        assert c.ping()["ok"]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_bounded_fuzz_of_malformed_messages_leaves_the_service_answering(worker):
    rng = random.Random(1234)
    headers = [b"", b"\xff\xfe", b"[]", b"null", b"{}", b'{"v": 1}', b'{"v": 2, "id": "a", "op": "ping"}',
               b'{"v": 1, "id": 5, "op": "ping"}', b'{"v": 1, "id": "a", "op": 7}',
               b'{"v": 1, "id": "a", "op": "search"}', b'{"v": 1, "id": "a", "op": "search", "index": "rmnp"}',
               b'{"v": 1, "id": "a", "op": "search", "index": "rmnp", "strokes": [[1, 2]]}',
               b'{"v": 1, "id": "a", "op": "search", "index": "rmnp", "strokes": [[[1, 1], [1, 1]]]}',
               b'{"v": 1, "id": "a", "op": "index", "index": "/abs", "rasters": ["/etc/passwd"]}',
               b'{"v": 1, "id": "a", "op": "cancel"}', b'{"v": 1, "id": "a", "op": "search", "index": "rmnp", "sketch_frame": 1}']
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(worker.bind)
    sent = 0
    for i in range(3000):
        kind = rng.random()
        if kind < 0.3:
            frames = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))]
        elif kind < 0.9:
            frames = [rng.choice(headers)] + ([bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 32)))] if rng.random() < 0.3 else [])
        else:
            head = json.dumps({"v": 1, "id": str(i), "op": "ping", "pad": "x" * rng.randint(0, 100)}).encode()
            frames = [head, b"\0" * rng.choice([0, 10, 1000])]
        sock.send_multipart(frames)
        sent += 1
    replies = 0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    deadline = time.time() + 120
    while replies < sent and time.time() < deadline:
        if poller.poll(1000):
            frames = sock.recv_multipart()
            # a message starting with an empty frame reads as a REQ envelope, echoed back as such
            reply = json.loads(frames[1] if frames[0] == b"" and len(frames) > 1 else frames[0])
            assert "ok" in reply and (reply["ok"] or reply["error"]["code"])
            replies += 1
    sock.close()
    assert replies == sent, "every malformed message gets exactly one reply"
    with worker.client(timeout=10) as c:
        assert c.ping()["ok"]


def test_oversized_message_is_refused_with_an_error(tmp_path, rasters):
    root = tmp_path / "indexes"
    root.mkdir()
    proc = WorkerProcess(root, rasters, extra=["--max-message-bytes", "100000"]).start()
    try:
        with proc.client(timeout=20) as c:
            with pytest.raises(WorkerError) as err:
                c.search("x", sketch_png=b"\0" * 200_000)
            assert err.value.code == codes.TOO_LARGE
            assert c.ping()["ok"]
    finally:
        proc.stop()


def test_a_job_says_what_became_of_the_shortlist_it_was_asked_for(worker, rasters):
    """An index asked for an approximate shortlist that it is too small to have: the job is done
    (the exact scan serves it) and says why there is none, instead of nothing at all."""
    with worker.client() as c:
        job = c.start_index("rmnp-ann", [str(rasters / "rmnp-rgb.tif")], ann=True)
        final = wait_job(c, job["id"])
        c.request("delete_index", index="rmnp-ann")
    assert final["state"] == states.DONE
    assert final["ann"]["built"] is False and "too few" in final["ann"]["why"], final["ann"]


def test_a_search_reply_says_whether_the_shortlist_answered_and_what_would_make_it_faster(worker, rasters):
    """The reply's `scan`: a search of an index with a current shortlist says the shortlist
    answered; one asking for a shortlist the index lacks says it scanned every window and what
    to do (only the worker's log said so, which a plugin user never sees)."""
    with worker.client() as c:
        job = c.start_index("s2-ann", [str(rasters / "s2.tif")], scales=[1, 2], ann=True)
        final = wait_job(c, job["id"])
        try:
            assert final["state"] == states.DONE and final["ann"]["vectors"] > 0, final
            with_ann = c.search("s2-ann", sketch_png=sketch_png(), top=3, ann="on")
            without = c.search("rmnp", sketch_png=sketch_png(), top=3, ann="on")
        finally:
            c.request("delete_index", index="s2-ann")
    assert with_ann["scan"] == {"by": "ann", "advice": None} and len(with_ann["hits"]["features"]) == 3
    assert without["scan"]["by"] == "exact" and without["scan"]["advice"].startswith(
        "the index has no ANN shortlist; scanning exactly (`build-ann` builds one"), without["scan"]
    assert len(without["hits"]["features"]) == 3


def test_a_job_names_the_rasters_it_indexed_without_a_tile_to_search(worker, rasters):
    """A raster all nodata, and one smaller than a tile, indexed beside one with data: the job is
    done, and it names both, which a search can never find (it said nothing, the index's tile
    count its other rasters')."""
    import rasterio

    from conftest import write_raster

    folder = rasters / "without-tiles"
    folder.mkdir()
    with rasterio.open(rasters / "rmnp-rgb.tif") as src:
        pixels, crs, transform = src.read(), src.crs, src.transform
    blank = write_raster(folder / "blank.tif", np.zeros_like(pixels), crs=crs, transform=transform, nodata=0)
    small = write_raster(folder / "small.tif", pixels[:, :40, :40], crs=crs, transform=transform)
    with worker.client() as c:
        job = c.start_index("some-without", [str(rasters / "rmnp-rgb.tif"), str(blank), str(small)], tile=112,
                            scales=[1])
        final = wait_job(c, job["id"])
        c.request("delete_index", index="some-without")
    assert final["state"] == states.DONE and final["tiles_done"] > final["tiles_skipped"]
    assert final["without_tiles"] == [str(blank), str(small)]


def test_four_clients_search_while_an_index_job_runs(worker, rasters):
    progress = subscribe_progress(worker.pub)
    time.sleep(0.3)  # let the subscription reach the publisher
    with worker.client() as c:
        job = c.start_index("s2", [str(rasters / "s2.tif")], scales=[1])
    results, errors = [], []

    def client_loop() -> None:
        try:
            with worker.client(timeout=120) as c:
                for _ in range(3):
                    results.append(c.search("rmnp", sketch_png=sketch_png(), top=3)["hits"])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12 and len(results[0]["features"]) == 3
    assert all(r == results[0] for r in results), "the same query gives the same hits under load"
    with worker.client() as c:
        final = wait_job(c, job["id"])
    assert final["state"] == states.DONE and final["progress"] == 1.0
    events = []
    while progress.poll(100):
        events.append(decode_progress(progress.recv_multipart()))
    progress.close()
    assert len(events) >= 2 and events[-1]["state"] == states.DONE
    assert any(0 < e["progress"] < 1 for e in events), "progress was published while the job ran"


def test_kill_9_mid_index_then_restart_resumes_to_the_same_index(tmp_path, rasters):
    """A job commits every 2 s or so (worker.store.writer.COMMIT_EVERY_S): the scene's 529 tiles
    of 112 px take several seconds, so the kill after the first commit lands mid-run."""
    from worker.store import IndexWriter

    root = tmp_path / "indexes"
    root.mkdir()
    proc = WorkerProcess(root, rasters).start()
    start = encode_request("index", "the-start", index="coast", rasters=[str(rasters / "s2.tif")], scales=[1],
                           tile=112, chunk_tiles=16)
    [started] = _replies_in_order(proc, start)
    job = started.result()["job"]
    manifest = root / "coast" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    # a request the worker takes and is killed before answering, and one asked after: each told at
    # once that the connection dropped, not after the client's 2 x 60 s
    with proc.client(timeout=60) as waiting, proc.client(timeout=60) as idle:
        waiting.ping()
        idle.ping()
        proc.proc.send_signal(signal.SIGSTOP)
        threading.Timer(0.5, proc.kill, (signal.SIGKILL,)).start()
        asked = time.monotonic()
        with pytest.raises(ConnectionDropped, match="stopped or was killed"):
            waiting.job(job["id"])
        proc.proc.wait(30)
        time.sleep(0.5)  # the connection's end reaches this process
        with pytest.raises(ConnectionDropped, match="stopped or was killed"):
            idle.job(job["id"])
        assert time.monotonic() - asked < 15
    partial = json.loads(manifest.read_text())
    assert not all(r["complete"] for r in partial["rasters"]), "killed before the end"
    assert (root / "coast" / "job.json").exists()

    proc = WorkerProcess(root, rasters).start()  # resumes the interrupted job by itself
    try:
        # the request that started it, resent (its reply lost in the crash), is its own, not another's:
        # a client's Cancel then stops it (after a restart it was said joined, and left running)
        [resent] = _replies_in_order(proc, start)
        assert resent.result()["job"]["id"] == job["id"] and resent.result()["joined"] is False
        with proc.client() as c:
            # by its id, which a client that followed it asks again (it had another after a restart)
            assert c.job(job["id"])["state"] in (states.QUEUED, states.RUNNING, states.DONE)
            deadline = time.time() + 300
            while time.time() < deadline and (root / "coast" / "job.json").exists():
                time.sleep(0.2)
            [index] = c.list_indexes()
            assert index["complete"]
    finally:
        proc.stop()
    # said at the default log level: a worker resumed a job, and saw it end, with no word in its log
    said = proc.log.read_text()
    assert f"resuming the interrupted indexing job of {root / 'coast'}" in said, said
    assert re.search(rf"INFO worker.service.jobs: index job \S+ of {re.escape(str(root / 'coast'))}: done", said), said
    from worker.model.loading import load_model
    from worker.tiling import TileSettings

    reference = tmp_path / "reference"
    IndexWriter(reference, load_model(device="cpu", sketch_modules="none"),
                TileSettings(tile=112, scales=(1,))).build([rasters / "s2.tif"])
    a, b = TileIndex.open(reference), TileIndex.open(root / "coast")
    assert np.array_equal(a.records, b.records)
    assert np.array_equal(a.cells_of(np.arange(len(a))), b.cells_of(np.arange(len(b))))


def test_sigterm_finishes_cleanly_and_ipc_works(tmp_path, rasters):
    """A search running when the worker is stopped is answered `busy` (the worker is stopping),
    as one waiting is: it was `timeout`, with advice to search a smaller area."""
    root = tmp_path / "indexes"
    root.mkdir()
    proc = WorkerProcess(root, rasters, bind=f"ipc://{tmp_path}/worker.sock").start()
    proc.index("rmnp", [rasters / "rmnp-rgb.tif"], tile=112, scales=[1])
    try:  # a second worker on the same ipc socket took it over unsaid, the first left running out of reach
        second = subprocess.run([*proc.cmd[:proc.cmd.index("--pub")], *proc.cmd[proc.cmd.index("--pub") + 2:]],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"cannot listen on {proc.bind}: another worker is serving there" in \
            second.stderr, second.stderr
        with proc.client() as c:
            assert c.ping()["ok"]
    except BaseException:
        proc.stop()
        raise
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(proc.bind)
    try:
        for request_id in ("running", "waiting"):
            sock.send_multipart(encode_request("search", request_id=request_id, index="rmnp", sketch_frame=1,
                                               frames=(sketch_png(),)))
        time.sleep(0.05)  # taken by the worker's one search thread
        assert proc.kill(signal.SIGTERM) == 0
        replies = {}
        while len(replies) < 2 and sock.poll(5000):
            reply = json.loads(sock.recv_multipart()[0])
            replies[reply["id"]] = reply.get("error", {}).get("code")
    finally:
        sock.close(linger=0)
    assert replies == {"running": codes.BUSY, "waiting": codes.BUSY}


WITH_SIGHUP_AS_A_TERMINAL_GIVES = ("import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                                   "os.execv(sys.argv[1], sys.argv[1:])")


@pytest.mark.parametrize("nohup", [False, True])
def test_a_terminal_closed_under_a_worker_stops_it_as_sigterm_does_unless_started_with_nohup(tmp_path, rasters,
                                                                                                nohup):
    """SIGHUP (its terminal closed) ended the worker at once, exit 129, its job's work since the
    last commit lost; now its jobs commit and it exits 0, the job left to resume. A worker started
    with nohup serves on."""
    root = tmp_path / "indexes"
    root.mkdir()
    proc = WorkerProcess(root, rasters)
    # as a terminal starts it: a run in the background (nohup, as CI may be) hands on SIGHUP ignored
    proc.cmd = ["nohup", *proc.cmd] if nohup else [sys.executable, "-c", WITH_SIGHUP_AS_A_TERMINAL_GIVES, *proc.cmd]
    proc.start()
    try:
        with proc.client() as c:
            c.start_index("coast", [str(rasters / "s2.tif")], scales=[1], tile=112, chunk_tiles=16)
        manifest = root / "coast" / "manifest.json"
        deadline = time.time() + 120
        while time.time() < deadline and not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
            time.sleep(0.05)
        committed = len(json.loads(manifest.read_text())["shards"])
        proc.proc.send_signal(signal.SIGHUP)
        if nohup:
            time.sleep(1)
            with proc.client(timeout=10) as c:
                assert c.ping()["ok"] and c.list_indexes()[0]["job"] is not None, "still serving, still indexing"
            return
        assert proc.proc.wait(60) == 0
        assert (root / "coast" / "job.json").exists(), "the job is left to resume"
        assert len(json.loads(manifest.read_text())["shards"]) >= committed
    finally:
        proc.stop()


def test_a_raster_root_that_is_not_there_is_said_as_the_worker_starts(tmp_path):
    """Every request naming its rasters was refused (outside the roots, or not found), with no
    word at start; the worker serves all the same (a drive may be plugged in later)."""
    proc = WorkerProcess(tmp_path / "indexes", tmp_path / "not-there").start()
    proc.stop()
    assert f"--raster-root {tmp_path / 'not-there'} is not there (a drive not plugged in?)" in proc.log.read_text()


def skip_without_ipv6_loopback() -> None:
    try:  # socket.has_ipv6 says how Python was built, not whether this host has IPv6 loopback
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")


def test_a_worker_serves_on_ipv6_loopback(tmp_path, rasters):
    """tcp://[::1]:PORT is loopback, and was accepted, then failed to bind ("No such device"):
    ZeroMQ sockets take IPv6 only when asked, the worker's and its clients'."""
    skip_without_ipv6_loopback()
    proc = WorkerProcess(tmp_path / "indexes", rasters, bind=f"tcp://[::1]:{free_port()}").start()  # pings it
    try:
        with proc.client() as c:
            assert c.list_indexes() == []
    finally:
        assert proc.kill(signal.SIGTERM) == 0


def test_curve_protected_bind_refuses_clients_without_the_key(tmp_path, rasters, worker):
    """A client without keys, or with others, is refused by a worker serving CURVE clients alone,
    and told to choose its keys; one with keys, refused by a worker serving without them (a
    local one), is told that its own keys are the cause: it was told to check the worker's. One
    connected to a worker's progress endpoint (its --pub) is told that nothing there takes
    requests: it was told the worker had stopped."""
    import zmq.auth

    keys, good = make_curve_keys(tmp_path)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    _, stranger_secret = zmq.auth.create_certificates(str(stranger), "stranger")
    root = tmp_path / "indexes"
    root.mkdir()
    proc = WorkerProcess(root, rasters, extra=["--curve-keys", str(keys)]).start(curve=good)
    try:
        with WorkerClient(proc.bind, timeout=20, curve=good) as c:
            assert c.ping()["ok"]
        with WorkerClient(proc.bind, timeout=2, retries=0) as c:
            with pytest.raises(WorkerUnavailable, match="a worker that serves only clients with its keys refuses"):
                c.ping()
        with WorkerClient(worker.pub, timeout=5, retries=0) as c:  # a worker's other port, as a user may type it
            with pytest.raises(WorkerUnavailable, match=r"takes no requests \(a worker's progress endpoint, its --pub"):
                c.ping()
        with WorkerClient(worker.bind, timeout=5, retries=0, curve=good) as c:
            with pytest.raises(WorkerUnavailable, match="this client connects with the CURVE keys chosen in Settings: "
                                                        "a worker started without --curve-keys"):
                c.ping()
        wrong = CurveKeys.from_files(keys / "server.key", Path(stranger_secret))
        with WorkerClient(proc.bind, timeout=2, retries=0, curve=wrong) as c:
            with pytest.raises(WorkerUnavailable):
                c.ping()
    finally:
        proc.stop()


def test_progress_on_every_interface_is_reached_over_ipv6_beside_an_ipv6_bind(tmp_path):
    """--bind tcp://[::]:P --pub tcp://*:Q listened for progress on IPv4 alone: a client that
    reached the worker at [::1] was told to subscribe at [::1]:Q, where nothing listened."""
    from worker.service.config import ServiceConfig
    from worker.service.listening import Listening

    skip_without_ipv6_loopback()
    keys, _ = make_curve_keys(tmp_path)
    config = ServiceConfig.create(bind=f"tcp://[::]:{free_port()}", pub="tcp://*:*", index_roots=[tmp_path],
                                  curve_keys=keys)
    context = zmq.Context()
    listening = Listening.open(config, context)
    try:
        port = int(listening.config.pub.rsplit(":", 1)[1])
        for family, host in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
            with socket.socket(family) as probe:
                probe.settimeout(5)
                probe.connect((host, port))  # ConnectionRefusedError where nothing listens
    finally:
        listening.close()
        context.term()


def test_a_worker_on_an_address_in_use_says_so_in_one_line(tmp_path):
    import zmq

    taken = zmq.Context.instance().socket(zmq.ROUTER)
    address = f"tcp://127.0.0.1:{free_port()}"
    taken.bind(address)
    try:
        result = subprocess.run([sys.executable, "-m", "worker", "serve", "--bind", address, "--index-root", str(tmp_path),
                                 "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        taken.close(linger=0)
    assert result.returncode == 2 and "another worker may be running" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_binding_beyond_loopback_without_keys_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "worker", "serve", "--bind", f"tcp://0.0.0.0:{free_port()}",
                             "--index-root", str(tmp_path), "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--curve-keys" in result.stderr


@pytest.mark.parametrize("option, said", [
    # taken, and the worker died at its first search or listing (a deadline of inf ms)
    (["--search-timeout", "inf"], "--search-timeout inf must be more than 0 seconds, and at most 86400"),
    (["--max-partial-maps-mb", "inf"], "--max-partial-maps-mb inf must be 0 to"),
    # a traceback from ZeroMQ once the model had loaded
    (["--max-message-bytes", "99999999999999999999"], "--max-message-bytes 99999999999999999999 must be at most"),
    (["--stop-with", "0"], "--stop-with 0 is not a process id"),  # taken, and never stopped the worker
    (["--bind", "tcp://127.0.0.1:abc"], "the port must be a number from 1 to 65535"),  # a traceback
    (["--bind", "tcp://127.0.0.1:*"], "lets the system choose the port, which no client could find"),  # served
    (["--bind", "tcp://127.0.0.1"], "names no port"),  # told to give --curve-keys
    (["--bind", "tcp://::1:5555"], "an IPv6 address is written in brackets"),  # a traceback
    (["--index-root", "{file}"], "is a file, or lies in one: name a folder"),  # tracebacks
    (["--index-root", "{file}/indexes"], "is a file, or lies in one: name a folder"),
    # served, every client refused unsaid; a traceback once the model had loaded
    (["--curve-keys", "{keys_without_clients}"], "holds no authorized_clients/ folder"),
    (["--curve-keys", "{damaged_keys}"], "server.key_secret is not a server's secret key"),
    # "another worker may be running there", the worker's own --bind; an ipc one, "another worker is serving there"
    (["--pub", "{bind}"], "--pub {bind} is where --bind {bind} listens: progress events need an address of their own"),
    (["--bind", "ipc://{tmp}/w", "--pub", "ipc://{tmp}/./w"], "is where --bind ipc://{tmp}/w listens"),
])
def test_serve_options_that_cannot_be_are_refused_in_one_line(tmp_path, option, said):
    import zmq.auth

    file = tmp_path / "a-file"
    file.write_text("not a folder")
    keys_without_clients, damaged_keys = tmp_path / "keys-without-clients", tmp_path / "damaged-keys"
    for folder in (keys_without_clients, damaged_keys):
        folder.mkdir()
        zmq.auth.create_certificates(str(folder), "server")
    (damaged_keys / "authorized_clients").mkdir()
    (damaged_keys / "server.key_secret").write_text("garbage")
    bind = f"tcp://127.0.0.1:{free_port()}"
    places = {"file": file, "keys_without_clients": keys_without_clients, "damaged_keys": damaged_keys, "bind": bind,
              "tmp": tmp_path}
    args, said = [part.format(**places) for part in option], said.format(**places)
    root = [] if "--index-root" in option else ["--index-root", str(tmp_path / "indexes")]
    result = subprocess.run([sys.executable, "-m", "worker", "serve", "--bind", bind, *root, "--device", "cpu",
                             *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], \
        result.stderr
    assert file.read_text() == "not a folder"


@pytest.mark.parametrize("busy", ["--bind", "--pub"])
def test_a_port_in_use_is_said_before_the_model_loads_and_leaves_no_index_root(tmp_path, busy):
    """A port another program holds was found only once the model had loaded (seconds on a CPU),
    and the failed start left an empty ./indexes where it was started. A model that cannot load
    (sketch modules not there) shows which came first."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    held = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
    ports = {"--bind": f"tcp://127.0.0.1:{free_port()}", "--pub": f"tcp://127.0.0.1:{free_port()}", busy: held}
    try:
        result = subprocess.run([sys.executable, "-m", "worker", "serve", "--device", "cpu", "--bind", ports["--bind"],
                                 "--pub", ports["--pub"], "--sketch-modules", str(tmp_path / "not-there.safetensors")],
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                                text=True, timeout=120)
    finally:
        holder.close()
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: cannot listen on {held} (Address already in use") and \
        f"another worker may be running there; choose another address with {busy}" in result.stderr, result.stderr
    assert not any(tmp_path.iterdir()), "no index root made"


@pytest.mark.parametrize("chosen", [{}, {"GOMP_SPINCOUNT": "2500"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_the_workers_openmp_threads_soon_sleep_unless_the_user_chose_how_they_wait(tmp_path, chosen):
    """libgomp's default spinning made searches 5-11x slower beside another busy torch process
    (worker.openmp). What each libgomp loaded (torch's, FAISS's) itself took, as it prints it
    at start (OMP_DISPLAY_ENV; GCC 13 on prefixes its lines with "[host]")."""
    env = {k: v for k, v in os.environ.items() if k not in USER_CHOICES}  # this process's: the worker's own
    result = subprocess.run([sys.executable, "-m", "worker", "info", str(tmp_path / "none")], cwd=REPO,
                            env={**env, **chosen, "OMP_DISPLAY_ENV": "VERBOSE"}, capture_output=True, text=True,
                            timeout=120)
    assert "OPENMP DISPLAY ENVIRONMENT BEGIN" in result.stderr, result.stderr
    taken = re.findall(r"^\s*(?:\[host\]\s+)?(GOMP_SPINCOUNT|OMP_WAIT_POLICY) = '(\w+)'", result.stderr, re.M)
    spins = [v for k, v in taken if k == "GOMP_SPINCOUNT"]
    policies = [v for k, v in taken if k == "OMP_WAIT_POLICY"]
    assert spins, result.stderr
    if not chosen:
        assert set(spins) == {"10000"}, result.stderr
    elif "GOMP_SPINCOUNT" in chosen:
        assert set(spins) == {"2500"}, result.stderr
    else:
        assert set(policies) == {"ACTIVE"} and "10000" not in spins, result.stderr


def test_a_worker_started_to_stop_with_its_application_stops_when_it_dies_even_while_loading(tmp_path):
    """The QGIS plugin starts its worker with --stop-with QGIS's pid: QGIS crashing (or killed) left
    the worker running, holding its port and its memory, for good. Here the application dies
    before the worker has loaded its model, the hardest moment to notice it."""
    (tmp_path / "indexes").mkdir()
    worker = WorkerProcess(tmp_path / "indexes", tmp_path)
    command = " ".join(f"'{part}'" for part in worker.cmd)
    log = tmp_path / "worker.log"
    application = subprocess.Popen(["bash", "-c", f"{command} --stop-with $$ 2>'{log}' & echo $!; wait"], cwd=REPO,
                                   stdout=subprocess.PIPE, text=True)
    pid = int(application.stdout.readline())
    try:
        application.kill()  # as QGIS crashing: no SIGTERM reaches the worker
        application.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.2)
        assert not os.path.exists(f"/proc/{pid}"), "the worker outlived the application that started it"
        assert "which started this worker, has ended: stopping" in log.read_text()
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)


def test_a_worker_started_to_stop_with_an_application_left_a_zombie_stops_too(tmp_path):
    """An application that died but whose parent has not reaped it yet (a zombie: its pid still
    answers signal 0) kept its worker running; on Linux the worker holds the process itself."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd here: the worker asks signal 0, which a zombie answers")
    (tmp_path / "indexes").mkdir()
    application = subprocess.Popen(["sleep", "3"])  # ends as the worker loads; this test, its parent, reaps it last
    worker = WorkerProcess(tmp_path / "indexes", tmp_path, extra=["--stop-with", str(application.pid)])
    try:
        worker.proc = subprocess.Popen(worker.cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=open(worker.log, "ab"))
        assert worker.proc.wait(timeout=120) == 0, worker.log.read_text()[-2000:]
        assert open(f"/proc/{application.pid}/stat").read().split()[2] == "Z", "still a zombie when the worker ended"
        assert "which started this worker, has ended: stopping" in worker.log.read_text()
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
        application.wait()


@pytest.mark.parametrize("kind", ["remove", "index"])
def test_a_job_cancelled_while_queued_never_runs_though_its_slot_comes_free_as_the_cancel_comes(tmp_path, assets,
                                                                                                model, kind):
    """A queued job looked at its cancel only between waits for a slot: one cancelled as the
    running job ended was answered `queued`, then ran. A removal removed its rasters, and an
    index job left a new index of 0 tiles (probe). The running job here is the test, holding
    the manager's one slot, let go as the cancel is answered."""
    from worker.app import IndexRequest, RemovalRequest
    from worker.service.jobs import JobManager
    from worker.store import IndexWriter
    from worker.tiling import TileSettings

    held, other = tmp_path / "rmnp.tif", tmp_path / "osbs.tif"
    shutil.copy(assets["rmnp_rgb"], held)
    shutil.copy(assets["osbs_rgb"], other)
    settings = TileSettings(tile=128, scales=(1,))
    IndexWriter(tmp_path / "held", model, settings).build([held, other])
    events = []
    manager = JobManager(model, publish=events.append)
    manager._slots.acquire()  # as a running job holds it
    request = (RemovalRequest(tmp_path / "held", (str(other),)) if kind == "remove"
               else IndexRequest(tmp_path / "new", (held,), settings))
    job = manager.start("asked", request)
    answered = job.cancel()
    manager._slots.release()  # the running job ends as the cancel comes
    job.thread.join(60)
    assert answered["state"] == states.QUEUED and job.state == states.CANCELLED
    assert states.RUNNING not in [event["state"] for event in events]
    if kind == "remove":
        assert {r.path for r in TileIndex.open(tmp_path / "held").rasters.values()} == {str(held), str(other)}
    else:
        assert not (tmp_path / "new").exists(), "no index made"
