"""The worker's ZeroMQ service (docs/protocol.md).

config: endpoints, roots, limits, keys · loop: sockets, search and listing threads, deadlines, errors -> replies
handlers: op -> request -> worker.app · jobs: background indexing · indexes: opened and listed
paths: what a client may name · startup: `python -m worker serve`
"""
