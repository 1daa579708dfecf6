"""Research and test tooling around the product: pseudo-sketches, the HED edge detector,
training pairs and training, the benchmark library, and a real worker process for tests.
Nothing in worker/ imports it."""
