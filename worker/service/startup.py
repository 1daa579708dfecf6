"""`python -m worker serve`: load the model, bind, resume interrupted jobs, serve until SIGTERM."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal

from worker.app import ModelOptions
from worker.service.config import ServiceConfig
from worker.service.loop import Service


def serve(config: ServiceConfig, model_options: ModelOptions) -> int:
    """Serve until SIGTERM or SIGINT, then let indexing jobs commit and exit 0. One JSON line on
    stdout ({"serving", "pub", "device"}) says when requests are answered (the plugin waits for it)."""
    model = _load_in_passing_thread(model_options)
    service = Service(config, model, model_options=model_options)
    service.open()
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    service.jobs.resume_interrupted(list(config.paths.index_roots))
    print(json.dumps({"serving": config.bind, "pub": config.pub, "device": str(model.device)}), flush=True)
    service.run()
    return 0


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
