"""The wire between the worker and its clients: ZeroMQ messages, error codes, job states and
a blocking Lazy Pirate client.

Stdlib and pyzmq only, so QGIS's Python imports it as it is: the plugin reaches it through
the link `qgis_plugin/wire` and ships a copy of these files. Modules import each other
relatively, so the package works under either name (`wire`, `sketch_search.wire`).
See docs/protocol.md.
"""
