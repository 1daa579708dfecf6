"""Indexing on a Dask cluster: the cluster's workers compute chunks, this process commits them.

Dask distributed rather than Ray: two pure-Python wheels instead of a large binary one, the
same code on a laptop (`local`: a LocalCluster of worker processes) and on a cluster that
already runs (a `dask scheduler` address, dask-jobqueue on HPC, dask-kubernetes), nothing else
to operate, and futures that Dask recomputes on another worker when a worker dies.

Each worker process loads the model once (cached per process, keyed by the model options) and
reads its tiles straight from the raster files, which every worker must see at the same path
(a shared or cloud file system). The driver, worker.store.writer.IndexWriter, alone writes the
index: it writes each chunk as it arrives, in any order, and commits them as a local run does
(every writer.COMMIT_EVERY_S), so a killed driver resumes from its last commit and a killed worker's chunks are computed again
by another worker. A worker whose model differs from the driver's (other weights, another
version of the code) is refused, so an index never mixes features of two models.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from wire.protocol import excerpt
from worker.errors import InputError, RasterReadError
from worker.interrupts import children_deaf_to_the_terminal, ctrl_c_ignored, stops_held
from worker.local_cluster_worker import closed_comms_without_traceback
from worker.store.writer import ChunkJob, ChunkResult, compute_chunk
from worker.thread_pools import usable_cores
from worker.tiling import TileSettings

if TYPE_CHECKING:
    from worker.app import ModelOptions

log = logging.getLogger(__name__)
LOCAL = "local"
TASK_RETRIES = 2  # a chunk whose computation raised is tried this many more times (a worker that died is not counted)
_models: dict[str, object] = {}  # per worker process: the model of each options


@dataclass(frozen=True)
class Cluster:
    """Where indexing runs: `address` (local, local:N or a scheduler's address) and the model
    each of its workers loads."""

    address: str
    model: "ModelOptions"

    def __post_init__(self) -> None:
        local_workers(self.address)  # what is no cluster is refused before any work


# a scheduler's address as Dask writes it: scheme (tcp://, Dask's default, when none), host (an
# IPv6 one in brackets, perhaps with its zone), port
SCHEDULER_ADDRESS = re.compile(r"(?:(tcp|tls|wss?|ucxx?)://)?(\[[0-9A-Fa-f:.]+(?:%[\w.-]+)?\]|[A-Za-z0-9_.-]+):(\d{1,5})")
UCX_SCHEMES = ("ucx", "ucxx")  # not over TCP: no TCP peer to ask first


def local_workers(spec: str) -> int | None:
    """`local` -> None (one worker per 2 cores), `local:N` -> N, a scheduler's address -> 0;
    InputError for anything else (a typo of local went to Dask as an address, which said
    "does not speak Dask's protocol" of a place nothing listens at; an empty one meant none)."""
    if spec.lower() == LOCAL:
        return None
    if spec.lower().startswith(LOCAL + ":"):  # Local:1 went to Dask as a host named Local
        count = spec[len(LOCAL) + 1:]
        if not count.isascii() or not count.isdigit():  # int() takes " 1", "+1" and "1_0" (as 10)
            raise InputError(f"--cluster {spec}: local:N takes N, a number of workers (digits), as local:2")
        n = int(count)
        if n < 1:
            raise InputError(f"--cluster {spec}: local:N needs a number of workers of at least 1")
        if n > most_local_workers():  # each loads the model: local:1000 ran the machine out of memory
            raise InputError(f"--cluster {spec}: at most local:{most_local_workers()} here (a worker process a core "
                             "this process may use, each holding the model); more machines need a Dask cluster: "
                             "tcp://HOST:8786")
        return n
    address = SCHEDULER_ADDRESS.fullmatch(spec)
    if address is None or not 0 < int(address[3]) < 65536:
        raise InputError(f"--cluster {spec!r} is not a cluster: give local, local:N (N worker processes here) or a "
                         "Dask scheduler's address, tcp://HOST:PORT (port 8786 unless it was started on another)")
    return 0


def most_local_workers() -> int:
    """The most worker processes `local:N` starts here: one a core this process may use (its
    affinity, as a container or taskset gives it), two on one core (as the tests start)."""
    return max(2, usable_cores())


@contextmanager
def connect(spec: str):
    """A Dask client of the cluster `spec` names: `local`, `local:N` (a LocalCluster of N worker
    processes, one thread each, closed on exit; its scheduler's web server, which Dask always
    starts, on a free port: on 8787 it warned of another taking it) or a scheduler address
    (tcp://host:8786). Not the process's default client (Dask's `set_as_default`): the default
    is process-wide, and clients closed out of order left it a closed one, whose stopped event
    loop a later run's chunks were awaited on for ever."""
    from distributed import Client, LocalCluster

    # Dask's news at INFO only when asked (-v): here, since importing distributed sets its logger to INFO
    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO
    with _closing_lock:
        if quiet and not _clusters_closing:  # not while another job's cluster closes quietly
            logging.getLogger("distributed").setLevel(logging.WARNING)
    closed_comms_without_traceback()  # the client's, and a local cluster's scheduler's
    n = local_workers(spec)
    if n == 0:
        def unreachable(why: str) -> InputError:
            return InputError(f"cannot reach the Dask scheduler at {spec} ({why}): start one with `dask scheduler` "
                              "and workers with `dask worker ADDRESS`, or run the worker's `index` or `serve` "
                              "command with --cluster local to index on the worker's machine")  # read in the plugin too

        _check_scheduler(spec, unreachable)
        try:
            client = Client(spec, timeout=f"{CONNECT_S:.0f}s", set_as_default=False)
        except Exception as exc:  # besides OSError and timeouts, whatever a peer that is no scheduler makes Dask raise
            raise unreachable(excerpt(str(exc))) from None
        logging.getLogger("distributed.client").addFilter(_not_the_end_of_a_reconnect)  # once: it is one function
        try:
            yield client
        finally:
            try:  # Dask's own wait, twice CONNECT_S, on a scheduler that stopped answering, and then a traceback
                client.close(timeout=CLOSE_S)
            except Exception as exc:
                log.info("the Dask client did not close cleanly: %s", exc)
        return
    n = n or max(1, usable_cores() // 2)
    # the worker processes' warnings (a worker closed mid-chunk: its task "ended with
    # CancelledError") only when asked (-v); their errors (but the heartbeat a closing worker
    # cuts off: worker.local_cluster_worker), and the driver's own news (a worker restarted for
    # its memory), as always
    with _environment_kept(), _closed_quietly(quiet) as closing, ExitStack() as running:
        try:
            # the cluster starts whole, its workers deaf to Ctrl-C as they boot; a closed terminal is not blocked
            # here, in the main thread, for the start's length: stops_held gives up on a start that hangs
            with stops_held(), children_deaf_to_the_terminal((signal.SIGINT,)):
                cluster = running.enter_context(LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                    silence_logs=logging.ERROR if quiet else False, **_with_our_preload()))
                client = running.enter_context(Client(cluster, set_as_default=False))
            yield client
        finally:
            closing()


def _with_our_preload() -> dict:
    """LocalCluster's preload and preload_argv: the worker preloads of the user's Dask
    configuration, each with its arguments as Dask gives them (one list for all, or a list
    each: the latter, one short of ours, stopped every worker), and ours (worker.local_cluster_worker)."""
    import dask

    theirs = dask.config.get("distributed.worker.preload") or []
    theirs = [theirs] if isinstance(theirs, str) else list(theirs)
    argv = dask.config.get("distributed.worker.preload-argv") or []
    argv = [argv] * len(theirs) if not argv or isinstance(argv[0], str) else list(argv)
    return {"preload": [*theirs, "worker.local_cluster_worker"], "preload_argv": [*argv, []]}


RECONNECT_FAILED = "Failed to reconnect to scheduler"


def _not_the_end_of_a_reconnect(record: logging.LogRecord) -> bool:
    """A logging filter for Dask's client: a client that lost its scheduler tries to reconnect
    until it is closed, and closing it logged the try's end as an ERROR beside the run's own
    line that it lost the scheduler: the try cancelled, with 30 lines of traceback, or, when the
    close fell between two tries, "Failed to reconnect to scheduler after 20.00 seconds" (the
    timeout, whatever the time)."""
    return not ((record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))
                or record.getMessage().startswith(RECONNECT_FAILED))


CONNECT_S = 20.0  # for a scheduler to answer who it is; Dask's own timeout covers opening the connection only
CLOSE_S = 10.0  # for a scheduler to see its client close, and for it to cancel a run's chunks


def _check_scheduler(address: str, unreachable: Callable[[str], InputError], known: bool = False) -> None:
    """InputError (`unreachable` of why) unless a Dask scheduler answers at `address` within
    CONNECT_S: a peer that accepts the connection and never answers (an HTTP server, a port
    forwarded to nothing) left Client waiting for ever, a job running and the service's jobs
    queued behind it; one that answers with other bytes (an SSH banner) failed with numpy's
    "Unable to allocate 2.82 EiB". A `known` scheduler (asked again while a run waits) is not
    connected to bare first: it logged each such connection ("closed before handshake
    completed"), a sixth of its log's lines (probe)."""
    import socket

    from distributed.core import rpc
    from distributed.security import Security

    scheme, host, port = SCHEDULER_ADDRESS.fullmatch(address).groups()
    if scheme not in UCX_SCHEMES and not known:  # Dask's own connecting retries a refused one until its timeout: 24 s
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_S).close()
        except TimeoutError:
            raise unreachable(f"no answer within {CONNECT_S:.0f} s") from None
        except OSError as exc:  # refused, no route, a name that does not resolve
            raise unreachable(excerpt(str(exc))) from None

    async def identity() -> dict:  # with Dask's own connection settings: a tls:// scheduler's certificates
        async with rpc(address, timeout=CONNECT_S, connection_args=Security().get_connection_args("client")) as scheduler:
            return await scheduler.identity()

    def ask() -> dict:
        return asyncio.run(asyncio.wait_for(identity(), CONNECT_S))

    try:
        answer = answer_within(CONNECT_S + 5.0, ask)  # its own event loop, whatever the caller's thread runs
    except TimeoutError:
        raise unreachable(f"no answer as a Dask scheduler within {CONNECT_S:.0f} s") from None
    except OSError as exc:  # refused, no route, a name that does not resolve
        raise unreachable(excerpt(str(exc))) from None
    except Exception as exc:  # an answer in another protocol: bytes Dask reads as a length of exabytes, or as nothing
        if scheme in UCX_SCHEMES:  # what failed is UCX here (not installed: distributed-ucxx)
            raise unreachable(f"UCX: {excerpt(str(exc) or type(exc).__name__)}") from None
        raise unreachable("what answers there does not speak Dask's protocol") from None
    if not isinstance(answer, dict) or answer.get("type") != "Scheduler":
        raise unreachable(f"it answered as {excerpt(str(answer))}, not as a Dask scheduler")


T = TypeVar("T")


def answer_within(seconds: float, ask: Callable[[], T]) -> T:
    """`ask()` run in a thread of its own: its answer, or its exception, within `seconds`;
    TimeoutError after. A Ctrl-C meanwhile is raised at once and the thread left to end alone: a
    thread pool's was waited for, and Ctrl-C took 20 s while a silent scheduler was asked."""
    answer: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            answer["value"] = ask()
        except BaseException as exc:  # handed to the caller
            answer["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="dask-ask", daemon=True).start()
    if not done.wait(seconds):
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in answer:
        raise answer["error"]
    return answer["value"]


FINGERPRINT_BYTES = 1 << 16


def file_fingerprint(path: str) -> str | None:
    """A local file's size and a digest of its first and last 64 KiB, the same wherever the same
    file is read (a shared file system, a copy), other for another file at that path; None for
    what is no local file (a GDAL virtual path): not compared."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(FINGERPRINT_BYTES)
        f.seek(max(0, size - FINGERPRINT_BYTES))
        return f"{size}:{hashlib.sha1(head + f.read(FINGERPRINT_BYTES)).hexdigest()[:16]}"


class NotThePlannedFile(InputError):
    """A cluster worker does not read the file the driver planned at a raster's path
    (_check_same_file). The driver then looks at its own: changed or gone since the run began,
    the chunk is left out as unreadable (changed_since_planned); else the workers do not see the
    driver's files. Pickled by its two arguments: it comes back from cluster workers."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path

    def __reduce__(self):
        return type(self), (self.path, str(self))


def _check_same_file(path: str, expected: str | None) -> None:
    """NotThePlannedFile unless this cluster worker reads the file the driver planned
    (`expected`, file_fingerprint there): a worker that saw another file at the path, or none,
    built an index of its pixels under the driver's raster, unsaid and for good (the driver's
    file never looks changed), or said only "No such file" of a file the user can open."""
    if expected is None:
        return
    same = "every worker must read the rasters at the same paths (a shared file system, or identical copies)"
    try:
        seen = file_fingerprint(path)
    except OSError as exc:
        raise NotThePlannedFile(path, f"{path}: a cluster worker ({_worker_name()}) cannot read it "
                                      f"({exc.strerror or exc}): {same}") from None
    if seen is None:
        raise NotThePlannedFile(path, f"{path}: a cluster worker ({_worker_name()}) finds no file there: {same}")
    if seen != expected:
        raise NotThePlannedFile(path, f"{path}: a cluster worker ({_worker_name()}) reads another file there than "
                                      f"the one planned (its size or bytes differ): {same}")


def changed_since_planned(refused: NotThePlannedFile, planned: str | None) -> InputError:
    """A worker's NotThePlannedFile as the driver sees it: where the driver's own file is no
    longer the one planned (rewritten, overviews built into it, deleted), a RasterReadError that
    leaves the chunk out and lets the run go on, as a run without a cluster does; it stopped the
    whole run, blaming the shared file system. Else `refused` itself: the workers see other files."""
    try:
        now = file_fingerprint(refused.path)
    except OSError:
        now = None
    if now == planned:
        return refused
    return RasterReadError(refused.path, f"{refused.path}: changed or gone since the run began (written again, "
                                         "overviews built into it, moved): its chunk is left out; the next run "
                                         "indexes it as it is then")


_closing_lock = threading.Lock()
_clusters_closing = 0  # local clusters closing quietly now (a service runs jobs side by side)


@contextmanager
def _closed_quietly(quiet: bool):
    """Yields a function to call when a local cluster starts closing: from then until it is
    closed, Ctrl-C is ignored (worker.interrupts.ctrl_c_ignored), and the driver's Dask logs say only errors
    when `quiet` (the level is the process's: until every cluster closing so is closed).
    Workers stopped mid-chunk made the scheduler and nannies warn ("Worker process still alive
    after 4.0 seconds, killing"), which is no news once the run has ended."""
    global _clusters_closing
    dask_log, counted = logging.getLogger("distributed"), False
    with ExitStack() as held:
        def closing() -> None:
            global _clusters_closing
            nonlocal counted
            held.enter_context(ctrl_c_ignored())
            if quiet and not counted:
                with _closing_lock:
                    _clusters_closing += 1
                    counted = True
                    dask_log.setLevel(logging.ERROR)

        try:
            yield closing
        finally:
            if counted:
                with _closing_lock:
                    _clusters_closing -= 1
                    if not _clusters_closing:
                        dask_log.setLevel(logging.WARNING)  # as connect sets it when quiet


@contextmanager
def _environment_kept():
    """This process's environment as it was, once a local cluster is closed. Dask's nannies set
    OMP_NUM_THREADS=1 (and MKL_, OPENBLAS_, MALLOC_TRIM_THRESHOLD_) in the process that starts
    them, on purpose, so that the worker processes they spawn inherit it (distributed
    `pre-spawn-environ`); left behind, every process started later (a worker service, a
    drawing pool) ran its torch and BLAS on one thread: a benchmark's searches took twice as
    long (494 against 264 ms p50). Kept from the first of clusters open at once (a service's
    jobs side by side) to the last closed: each kept its own, and the later one put back the
    nannies' settings of the earlier one."""
    global _environment_before, _clusters_open
    with _closing_lock:
        if not _clusters_open:
            _environment_before = dict(os.environ)
        _clusters_open += 1
    try:
        yield
    finally:
        with _closing_lock:
            _clusters_open -= 1
            if not _clusters_open:
                os.environ.clear()
                os.environ.update(_environment_before)


_clusters_open = 0  # local clusters open now in this process (_environment_kept)
_environment_before: dict[str, str] = {}  # the environment before the first of them started


def _model_of(options: "ModelOptions"):
    key = repr(options)
    if key not in _models:
        _models[key] = options.load()
    return _models[key]


def load_models(client, options: "ModelOptions") -> None:
    """Every worker of the cluster loads the model now, not at its first chunk (start-up apart)."""
    client.run(lambda: _model_of(options) and None)


def compute_on_worker(options: "ModelOptions", encoder: dict, job: ChunkJob, settings: TileSettings,
                      batch_size: int, fingerprint: str | None) -> ChunkResult | InputError:
    """One chunk, computed on a cluster's worker with its own copy of the model; or its InputError
    (a raster's tiles it cannot read, a raster it cannot find or reads as another file than
    `fingerprint` says, another model), returned, not raised: raised, Dask computed the chunk
    twice more to the same end (TASK_RETRIES), and sent it back as a plain Exception, its cause
    (rasterio's error) being one it cannot unpickle. The driver raises it, or leaves the chunk
    out when its tiles could not be read (RasterReadError: worker.store.writer)."""
    try:
        _check_same_file(job.raster["path"], fingerprint)
        model = _model_of(options)
        if model.fingerprint()["tile_encoder"] != encoder:
            raise InputError(f"a cluster worker ({_worker_name()}) runs another model than the index's: install the "
                             "same code and weights on every worker")
        result = compute_chunk(model, job, settings, batch_size)
    except (RasterReadError, NotThePlannedFile) as exc:  # the chunk left out (worker.store.writer), or judged
        return type(exc)(exc.path, str(exc))  # returned bare: no cause or context travels with it
    except InputError as exc:
        bare = InputError(str(exc))  # returned, never raised here: no cause or context travels with it
        bare.code = exc.code
        return bare
    assert result is not None  # nothing stops a chunk on a worker; the driver cancels between chunks
    return result


def _worker_name() -> str:
    """The cluster worker this runs on, by its address (its pid outside one)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def _environment_error(exc: Exception) -> bool:
    """Whether a worker's failure is its environment's, not a bug: this code not importable there
    (Dask then cannot read the task: "Error during deserialization of the task graph"), a file
    it cannot find, a system call failed or timed out there (a shared disk not answering)."""
    return isinstance(exc, (ImportError, OSError)) or "deserializ" in str(exc)


STOP_POLL_S = 0.2  # how often the driver asks whether the job was cancelled while chunks compute
NO_WORKERS_S = 120.0  # a cluster without workers this long fails the job rather than wait for ever
# a scheduler that has not answered an ask of who it is this long fails the job: a stopped one left
# the run waiting for ever, silent, and a service's jobs queued behind it
SCHEDULER_SILENT_S = 60.0
ASK_EVERY_S = 5.0  # how often the scheduler is asked while the driver waits for chunks
# no chunk finished this long (one of 256 tiles takes about a minute on a CPU): said once, naming
# the workers that hold chunks. A worker hung on a read (a shared disk not answering) or stopped
# left the run waiting for ever, its bar frozen and not a word
STALLED_S = 600.0


class ClusterChunks:
    """Chunks computed on a Dask cluster, handed back as they finish (worker.store.writer.ChunkComputer)."""

    def __init__(self, client, options: "ModelOptions", encoder: dict):
        self.client = client
        self.options = options
        self.encoder = encoder  # the driver's tile-encoder fingerprint: workers must match it
        # task keys unique to this run: raster ids restart at 0 in every index, and a scheduler
        # shared by two drivers would hand one the other's chunk under an equal key
        self.run_id = uuid.uuid4().hex
        # when the oldest ask of who the scheduler is, not answered since, was sent (time.monotonic);
        # None while every ask sent has been answered
        self._unanswered_since: float | None = None
        self._planned: dict[str, str | None] = {}  # each raster's file_fingerprint as the run planned it
        self._asking: threading.Thread | None = None

    def run(self, jobs: list[ChunkJob], settings: TileSettings, batch_size: int, should_stop: Callable[[], bool],
            batch_done: Callable[[int, str], None]) -> Iterator[tuple[ChunkJob, ChunkResult | RasterReadError | None]]:
        from distributed import as_completed
        from distributed.comm import CommClosedError

        if not jobs:
            return
        self._check_importable()
        fingerprints = {path: file_fingerprint(path) for path in {job.raster["path"] for job in jobs}}
        self._planned = fingerprints
        futures = {self.client.submit(compute_on_worker, self.options, self.encoder, job, settings, batch_size,
                                      fingerprints[job.raster["path"]], pure=False, retries=TASK_RETRIES,
                                      key=f"chunk-{job.raster_id}-{job.chunk}-{self.run_id}"): job
                   for job in jobs}
        self._unanswered_since = None
        log.info("%d chunks sent to %d cluster workers", len(futures), len(self.client.scheduler_info()["workers"]))
        try:
            finished = as_completed(futures, loop=self.client.loop)
            last_done, said_stalled = time.monotonic(), False
            while not finished.is_empty():
                idle_since = None
                while not finished.has_ready():  # a cancel is seen within STOP_POLL_S, not when a chunk ends
                    if should_stop():
                        yield jobs[0], None
                        return
                    idle_since, said_stalled = self._look_while_waiting(last_done, idle_since, said_stalled)
                    time.sleep(STOP_POLL_S)
                last_done, said_stalled = time.monotonic(), False
                future = next(finished)
                result = None if should_stop() else self._result(future, futures[future], should_stop)
                yield futures[future], result
                if result is None:  # stopped
                    return
        except (CancelledError, CommClosedError) as exc:  # the scheduler went away: every future is cancelled
            raise InputError(f"lost the Dask scheduler at {self.client.scheduler.address} ({excerpt(str(exc))}): "
                             "committed chunks are kept; run the job again once it is back") from None
        finally:
            try:  # a scheduler that stopped answering is not waited for
                answer_within(CLOSE_S, lambda: self.client.cancel(list(futures)))
            except Exception as exc:  # a scheduler gone cannot be told
                log.info("the cluster's chunks could not be cancelled: %s", exc)

    def _check_importable(self) -> None:
        """InputError unless every worker of the cluster imports this code: a worker that could
        not read its task (started without this code on PYTHONPATH) was closed by Dask, and the
        run said two minutes later that the cluster had no workers. A worker that cannot be asked
        (dying, restarting) is left to Dask, which gives its chunks to the others; one that joins
        later is not asked."""
        try:
            answers = answer_within(CONNECT_S * 3, lambda: self.client.run(exec, f"import {__name__}",
                                                                           on_error="return"))
        except TimeoutError:
            raise InputError(f"the Dask cluster at {self.client.scheduler.address} did not answer within "
                             f"{CONNECT_S * 3:.0f} s (its scheduler or a worker stopped?)") from None
        failed = {address: exc for address, exc in answers.items() if isinstance(exc, ImportError)}
        if failed:
            address, exc = next(iter(failed.items()))
            raise InputError(f"{len(failed)} of the {len(answers)} Dask workers (such as {address}) cannot import this "
                             f"code ({excerpt(str(exc) or type(exc).__name__)}): start every worker with this checkout "
                             "on its PYTHONPATH (PYTHONPATH=/path/to/sketch-search dask worker ADDRESS) and the same "
                             "packages")

    def _check_scheduler_answers(self) -> None:
        """InputError once the scheduler has left an ask unanswered for SCHEDULER_SILENT_S. It is
        asked who it is every ASK_EVERY_S, on a connection of its own with its own time limit
        (_check_scheduler), in a thread: the client's own asks wait for ever on a stopped
        scheduler, or give up quietly and keep their last answer. The silence counts from the
        ask, not from the last answer: counted from the answer, the wait before the next ask
        took ASK_EVERY_S of it, and on a busy machine a run whose scheduler answered every ask
        failed as silent (CI, with the test's limit of 8 s)."""
        if self._unanswered_since is not None and time.monotonic() - self._unanswered_since > SCHEDULER_SILENT_S:
            raise self._silent()
        if self._asking is not None and self._asking.is_alive():
            return
        address = self.client.scheduler.address

        def ask() -> None:
            time.sleep(ASK_EVERY_S)
            if self._unanswered_since is None:
                self._unanswered_since = time.monotonic()
            try:
                _check_scheduler(address, InputError, known=True)
                self._unanswered_since = None
            except InputError:  # not answering: said once SCHEDULER_SILENT_S have passed
                pass

        self._asking = threading.Thread(target=ask, name="dask-scheduler-ask", daemon=True)
        self._asking.start()

    def _say_stalled(self, waited_s: float) -> None:
        """Warn that no chunk has finished for `waited_s`, naming the workers that hold chunks."""
        try:
            held = answer_within(ASK_EVERY_S, self.client.processing)  # {worker: [chunk keys]}
        except Exception:  # a scheduler not answering is said on its own (_check_scheduler_answers)
            held = {}
        # this run's chunks alone: a shared scheduler's other clients' tasks are theirs
        mine = {worker: [k for k in keys if str(k).endswith(self.run_id)] for worker, keys in held.items()}
        busy = ", ".join(f"{worker} ({len(keys)})" for worker, keys in sorted(mine.items()) if keys)
        log.warning("no chunk has finished for %.0f s (chunks held by %s): a worker hung on a read (a shared disk not "
                    "answering) or stopped? Ctrl-C stops the run; committed chunks are kept", waited_s,
                    busy or "no worker, as the scheduler says")

    def _silent(self) -> InputError:
        return InputError(f"the Dask scheduler at {self.client.scheduler.address} has not answered for "
                          f"{SCHEDULER_SILENT_S:.0f} s (stopped, overloaded, or its machine unreachable): committed "
                          "chunks are kept; run the job again once it answers")

    def _result(self, future, job: ChunkJob, should_stop: Callable[[], bool]) -> ChunkResult | RasterReadError | None:
        """A finished chunk's arrays, or the RasterReadError that left it out (None: the run was
        stopped meanwhile); InputError, naming the chunk, where its workers failed otherwise."""
        from distributed import KilledWorker
        from distributed.comm import CommClosedError

        where = f"{job.raster['path']} (chunk {job.chunk})"
        try:
            result = self._fetched(future, should_stop)
        except KilledWorker:
            raise InputError(f"cluster workers kept dying while computing {where}: look at their logs (memory?); "
                             "committed chunks are kept, run the job again") from None
        except (InputError, CancelledError, CommClosedError):
            raise
        except Exception as exc:
            if not _environment_error(exc):  # a bug: `internal`, with where it happened
                exc.add_note(f"computing {where} on a cluster worker")
                raise
            raise InputError(f"a cluster worker failed computing {where}: {excerpt(str(exc) or type(exc).__name__)}; "
                             "every worker and the scheduler need this code importable (PYTHONPATH) and the rasters "
                             "at the same paths; committed chunks are kept") from None
        if isinstance(result, NotThePlannedFile):
            result = changed_since_planned(result, self._planned[result.path])
        # the worker's: another model, a raster it cannot find or finds as another file than the driver's
        if isinstance(result, InputError) and not isinstance(result, RasterReadError):
            raise result
        return result

    def _fetched(self, future, should_stop: Callable[[], bool]):
        """A finished chunk's result, fetched through the scheduler (None: stopped meanwhile). It
        may lie on a worker that died since the chunk finished: the scheduler then has the chunk
        computed again, as long as it took (a minute on a CPU), or never on a cluster left
        without workers. It is waited for as chunks are, the scheduler's silence and a cluster
        without workers said as such: one wait of SCHEDULER_SILENT_S said that a scheduler which
        answered had not (the cluster probe's finding, its workers killed mid-run)."""
        idle_since, began, said_stalled = None, time.monotonic(), False
        while True:
            try:
                return future.result(timeout=STOP_POLL_S)
            except TimeoutError:
                if future.status == "error":  # the chunk's own (a read timing out), not the wait's: raised
                    raise
                if should_stop():
                    return None
                idle_since, said_stalled = self._look_while_waiting(began, idle_since, said_stalled)

    def _look_while_waiting(self, since: float, idle_since: float | None, said_stalled: bool
                            ) -> tuple[float | None, bool]:
        """One look while a chunk is waited for (since `since`, time.monotonic): InputError once the
        scheduler has been silent, or the cluster without workers, too long; a stall said once (a
        worker hung on a read, or computing a lost chunk again). The next look's `idle_since`
        (_without_workers_since) and `said_stalled`."""
        self._check_scheduler_answers()
        idle_since = self._without_workers_since(idle_since)
        if not said_stalled and time.monotonic() - since > STALLED_S:
            self._say_stalled(time.monotonic() - since)
            said_stalled = True
        return idle_since, said_stalled

    def _without_workers_since(self, idle_since: float | None) -> float | None:
        """When the cluster has had no worker for NO_WORKERS_S, InputError (its chunks would wait
        for ever); returns since when it has had none, None while it has some."""
        # Dask's own record (private) of what the scheduler last said, renewed every 2 s or so:
        # client.scheduler_info() asks it, and blocked as long as it did not answer (stopped)
        if getattr(self.client, "_scheduler_identity", {}).get("workers", True):
            return None
        now = time.monotonic()
        if idle_since is None:
            log.warning("the Dask cluster at %s has no workers: its chunks wait for one", self.client.scheduler.address)
            return now
        if now - idle_since > NO_WORKERS_S:
            raise InputError(f"the Dask cluster at {self.client.scheduler.address} has had no workers for "
                             f"{NO_WORKERS_S:.0f} s: start some with `dask worker ADDRESS`; committed chunks are kept, "
                             "run the job again")
        return idle_since
