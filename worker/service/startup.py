"""`python -m worker serve`: load the model, bind, resume interrupted jobs, serve until SIGTERM."""

from __future__ import annotations

import json
import signal

from worker.app import ModelOptions
from worker.service.config import ServiceConfig
from worker.service.loop import Service


def serve(config: ServiceConfig, model_options: ModelOptions) -> int:
    """Serve until SIGTERM or SIGINT, then let indexing jobs commit and exit 0. One JSON line on
    stdout ({"serving", "pub", "device"}) says when requests are answered (the plugin waits for it)."""
    model = model_options.load()
    service = Service(config, model, model_options=model_options)
    service.open()
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    service.jobs.resume_interrupted(list(config.paths.index_roots))
    print(json.dumps({"serving": config.bind, "pub": config.pub, "device": str(model.device)}), flush=True)
    service.run()
    return 0
