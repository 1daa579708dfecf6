"""Research and test tooling around the product: pseudo-sketches, the HED edge detector,
training pairs and training, the benchmark library, and a real worker process for tests.
Nothing in worker/ imports it. It imports the worker package first, so that a lab tool's torch
waits as the worker's does (worker.openmp): several tools import torch before any worker module."""

import worker  # noqa: F401
