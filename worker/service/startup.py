"""`python -m worker serve`: load the model, bind, resume interrupted jobs, serve until SIGTERM
(or until the application that started it has ended)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import signal
import threading
import time

from worker.app import ModelOptions
from worker.service.config import ServiceConfig
from worker.service.loop import Service

log = logging.getLogger(__name__)
PARENT_CHECK_S = 1.0  # how often a worker started with --stop-with PID looks whether that process is there


def serve(config: ServiceConfig, model_options: ModelOptions, stop_with: int | None = None) -> int:
    """Serve until SIGTERM or SIGINT (or until process `stop_with` has ended: the application that
    started the worker), then let indexing jobs commit and exit 0. One JSON line on stdout
    ({"serving", "pub", "device"}) says when requests are answered (the plugin waits for it)."""
    model = _load_in_passing_thread(model_options)
    service = Service(config, model, model_options=model_options)
    service.open()
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    if stop_with is not None:
        _stop_when_gone(service, stop_with)
    service.jobs.resume_interrupted(list(config.paths.index_roots))
    print(json.dumps({"serving": config.bind, "pub": service.config.pub, "device": str(model.device)}), flush=True)
    service.run()
    return 0


def _stop_when_gone(service: Service, pid: int) -> None:
    """Stop the service, as at SIGTERM, once process `pid` has ended (checked from the start: one
    that ended while the model loaded stops it at once): QGIS that crashed or was killed left its
    local worker running, holding its port and gigabytes of memory. Not on Windows, where a
    signal 0 would end the process."""
    if os.name == "nt":
        log.warning("--stop-with is not supported on Windows: this worker stops only when asked")
        return

    def watch() -> None:
        while not service.stopping:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                log.warning("process %d, which started this worker, has ended: stopping", pid)
                service.request_stop()
                return
            except PermissionError:
                pass  # there, run by another user
            time.sleep(PARENT_CHECK_S)

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
