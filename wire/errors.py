"""Error codes of error replies, and the exceptions that carry them on either side.

What a client should do differs per code, so every code is named here once and the worker,
the blocking client and the plugin compare against these names.
"""

from __future__ import annotations

BAD_JSON = "bad_json"  # frame 0 is not a UTF-8 JSON object
BAD_REQUEST = "bad_request"  # a field is missing or of the wrong type
UNKNOWN_OP = "unknown_op"
UNSUPPORTED_VERSION = "unsupported_version"
TOO_LARGE = "too_large"  # over the worker's --max-message-bytes
BAD_INPUT = "bad_input"  # a raster, sketch or value the worker cannot use
NOT_FOUND = "not_found"  # a named index or job that does not exist
INDEX_MISMATCH = "index_mismatch"  # an index of another format, model or tile settings
FORBIDDEN = "forbidden"  # a path outside the allowed roots, or a file or address a client may not have read
BUSY = "busy"  # an index a job is writing (cancel it or wait), or the worker's queues are full (retry later)
TIMEOUT = "timeout"  # the server-side time limit passed
CANCELLED = "cancelled"  # a search its client cancelled (`cancel` with `search`)
CORRUPT_INDEX = "corrupt_index"  # an index whose files are damaged: index its rasters again (worker.store.writer)
STORAGE = "storage"  # the worker's disk refused (full, read-only, failing, a size limit): the message says what to do
INTERNAL = "internal"  # a bug in the worker; details in its log
UNAVAILABLE = "unavailable"  # never sent: a client's own code for "no reply at all"
CLOSED = "closed"  # never sent: a client's own code for a request whose connection it closed before the reply
NOT_A_WORKER = "not_a_worker"  # never sent: a client's own code for a reply it cannot read (NotAWorker)

SERVER_CODES = (BAD_JSON, BAD_REQUEST, UNKNOWN_OP, UNSUPPORTED_VERSION, TOO_LARGE, BAD_INPUT, NOT_FOUND,
                INDEX_MISMATCH, FORBIDDEN, BUSY, TIMEOUT, CANCELLED, CORRUPT_INDEX, STORAGE, INTERNAL)


class ProtocolError(Exception):
    """A request the worker refuses for its form or its paths; answered with `code`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class WorkerError(Exception):
    """The worker answered with an error reply (client side)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class WorkerUnavailable(WorkerError):
    """No reply within the time limit after every retry: the worker is down or unreachable."""

    def __init__(self, endpoint: str, attempts: int, timeout: float):
        super().__init__(UNAVAILABLE, f"no reply from {endpoint} after {attempts} attempt(s) of {timeout:g} s")


class NotAWorker(WorkerError):
    """A reply this client cannot read: what answers at the endpoint is no sketch search worker
    (or one of another protocol). Processing showed the reply's traceback."""

    def __init__(self, endpoint: str, why: str):
        super().__init__(NOT_A_WORKER, f"the service at {endpoint} answered, but not as a sketch search worker ({why}): "
                                      "check the endpoint, or update the worker")


# a socket of another kind (a worker's PUB) fails the handshake too, as a refused key does: which
# of the two libzmq reports first varies, and a test connected to --pub met both
NOT_A_REQUEST_PORT = ("what listens there takes no requests (a worker's progress endpoint, its --pub, is not the one "
                      "to connect to)")


class ConnectionDropped(WorkerUnavailable):
    """The connection carrying a request dropped before its reply (seen by a socket monitor):
    no reply will come on it, so the client is told at once, not after its timeout."""

    def __init__(self, message: str):
        WorkerError.__init__(self, UNAVAILABLE, message)

    @classmethod
    def dropped(cls, endpoint: str) -> "ConnectionDropped":
        return cls(f"the connection to the worker at {endpoint} dropped before it answered: the worker stopped or "
                   "was killed (its log says why), its machine stopped answering, the request was far over its "
                   f"message size limit, or {NOT_A_REQUEST_PORT}")

    @classmethod
    def keys_refused(cls, endpoint: str, with_keys: bool) -> "ConnectionDropped":
        """A handshake refused: by a worker serving only CURVE clients, asked without keys or with
        others; or, asked with keys (`with_keys`), by a worker serving without them, which the
        old wording (only the first) sent users looking for the worker's keys."""
        why = ("this client connects with the CURVE keys chosen in Settings: a worker started without "
               "--curve-keys (a local one) does not take them, so clear them there, and one with its own keys "
               "takes only a client key it authorizes" if with_keys else
               "a worker that serves only clients with its keys refuses others (choose them in Settings)")
        return cls(f"the worker at {endpoint} dropped the connection without taking the request: {why}; or it is "
                   f"restarting; or {NOT_A_REQUEST_PORT}")


class ConnectionClosed(WorkerError):
    """The client closed its connection before the reply came (connected elsewhere, its local
    worker stopped): the request may still run on the worker."""

    def __init__(self, endpoint: str):
        super().__init__(CLOSED, f"the connection to {endpoint} was closed before the worker answered")


class RequestCancelled(Exception):
    """The caller stopped waiting for a reply (the worker may still finish the request)."""
