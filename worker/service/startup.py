"""`python -m worker serve`: bind, load the model, resume interrupted jobs, serve until SIGTERM
(or until the application that started it has ended)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import select
import signal
import threading
import time

from worker.app import ModelOptions
from worker.errors import InputError
from worker.service.config import ServiceConfig
from worker.service.listening import Listening
from worker.service.loop import Service

log = logging.getLogger(__name__)
PARENT_CHECK_S = 1.0  # how often a worker started with --stop-with PID looks whether that process is there


def serve(config: ServiceConfig, model_options: ModelOptions, stop_with: int | None = None) -> int:
    """Serve until SIGTERM, SIGINT or SIGHUP (or until process `stop_with` has ended: the application that
    started the worker), then let indexing jobs commit and exit 0. One JSON line on stdout
    ({"serving", "pub", "device"}) says when requests are answered (the plugin waits for it)."""
    application = None if stop_with is None else Application(stop_with)  # held before the model loads
    listening = Listening.open(config)  # a port in use is said before the model loads, not after
    try:
        config.make_index_roots()
        for root in config.paths.raster_roots:  # every request naming its rasters was refused, with no word at start
            if not root.is_dir():
                log.warning("--raster-root %s is %s: no raster in it can be indexed or searched until it is there",
                            root, "a file, not a folder" if root.exists() else "not there (a drive not plugged in?)")
        model = _load_in_passing_thread(model_options)
        service = Service(listening, model, model_options=model_options)
        service.handlers.indexes.empty_trash_left_in(config.paths.index_root)
    except BaseException:
        listening.close()
        raise
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    # the terminal it runs in closed: stopped as at SIGTERM (it ended the worker with no commit);
    # one started with nohup ignores it, and serves on
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, service.request_stop)
    if application is not None:
        _stop_when_gone(service, application)
    try:
        service.jobs.resume_interrupted(list(config.paths.index_roots))
        print(json.dumps({"serving": config.bind, "pub": service.config.pub, "device": str(model.device)}), flush=True)
    except BaseException:  # the application gone before the line (a broken pipe): resumed jobs stopped, sockets closed
        service.shutdown()
        raise
    service.run()
    return 0


class Application:
    """The process that started this worker (`--stop-with PID`), to see when it has ended. On
    Linux the process itself is held from the start (a pidfd): one that died and was left a
    zombie its parent has not reaped, or whose pid a new process took, has ended all the same;
    signal 0 saw both as alive. Elsewhere (macOS) signal 0 is asked every PARENT_CHECK_S."""

    def __init__(self, pid: int):
        if pid < 1:  # 0 and -1 name this process's group or every process: asked, they never end
            raise InputError(f"--stop-with {pid} is not a process id: give the pid of the application (1 or more)")
        self.pid = pid
        self._poll = None
        self._ended_at_start = False
        try:
            descriptor = os.pidfd_open(pid)
        except ProcessLookupError:
            self._ended_at_start = True
        except (AttributeError, OSError):  # not Linux 5.3+: signal 0
            pass
        else:
            self._poll = select.poll()
            self._poll.register(descriptor, select.POLLIN)  # readable once the process has ended

    def ended(self, wait_s: float) -> bool:
        """Whether the process has ended, waiting for it up to `wait_s` seconds."""
        if self._ended_at_start:
            return True
        if self._poll is not None:
            return bool(self._poll.poll(wait_s * 1000))
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # there, run by another user
        time.sleep(wait_s)
        return False


def _stop_when_gone(service: Service, application: Application) -> None:
    """Stop the service, as at SIGTERM, once the application that started it has ended (one that
    ended while the model loaded stops it at once): QGIS that crashed or was killed left its
    local worker running, holding its port and gigabytes of memory. Not on Windows, where a
    signal 0 would end the process."""
    if os.name == "nt":
        log.warning("--stop-with is not supported on Windows: this worker stops only when asked")
        return

    def watch() -> None:
        while not service.stopping:
            if application.ended(PARENT_CHECK_S):
                log.warning("process %d, which started this worker, has ended: stopping", application.pid)
                service.request_stop()
                return

    threading.Thread(target=watch, name="stop-with", daemon=True).start()


def _load_in_passing_thread(model_options: ModelOptions):
    """The model, loaded in a thread that ends with it. Torch's CPU ops run on OpenMP (GNU
    libgomp), which keeps a team of threads for every thread that ran one, for as long as that
    thread lives; once the process holds more of them than there are CPUs, their threads spin
    for a moment only before they sleep, and each of a search's thousands of small ops waits for
    them to wake. Loaded on the main thread (which then serves the sockets), its team joined the
    search thread's: a search of the demo index took 255 ms in the worker against 200 in a
    plain process (docs/benchmarks/speed.md, fourteenth stop)."""
    with cf.ThreadPoolExecutor(1, thread_name_prefix="load-model") as passing:
        return passing.submit(model_options.load).result()
