"""The states of an indexing job, as the `job` op and progress events report them."""

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
INTERRUPTED = "interrupted"  # the worker stopped; a worker started later resumes the job

ACTIVE = frozenset({QUEUED, RUNNING})
FINISHED = frozenset({DONE, FAILED, CANCELLED, INTERRUPTED})
