"""How long torch's waiting OpenMP threads spin before they sleep, chosen before torch loads.

Torch's CPU ops run on GNU OpenMP (libgomp) in its Linux wheels. A thread that waits for the
rest of its team spins GOMP_SPINCOUNT times before it sleeps: 300,000 by default, long enough to
outlast most of a search's small ops. Beside another busy torch process (an indexing CLI, a
second worker), both processes' waiting threads spun on the CPUs that the threads they waited
for needed. Demo index, searches through a real worker beside `python -m worker index` of the
Sentinel-2 scene (started with the same setting), p50 ms, two rounds alternated (scripts/lab
search_beside_load; docs/benchmarks/speed.md, fifteenth stop):

| GOMP_SPINCOUNT | alone | beside the indexing CLI | the CLI's own run (5.7-6.2 s alone, timed apart) |
|---|---|---|---|
| 300,000 (libgomp's default) | 174, 183 | 828, 2032 | 24, 26 s |
| 10,000 (the worker's) | 187, 173 | 415, 400 | 8, 7 s |
| 3,000 | 184, 187 | 303, 315 | 7, 7 s |

Alone, over this and a second run, 10,000 gave 171-200 ms and the default 165-183 (means 183 and
174: perhaps 5%, within the noise of any one figure). 3,000 shows no cost in this table, but took
196-205 ms against 175-193 in earlier scratch runs. Beside a torch process that keeps the
default (--cli-env), the worker's searches took 392-406 ms against 1051-1565. Beside work that
never waits for a team (sha256sum on every core) every count gave 363-486 ms, and during the
worker's own indexing job 286-321. Torch's Windows and macOS builds use Intel's or LLVM's OpenMP,
whose threads spin for KMP_BLOCKTIME instead: not set here, and not measured.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = 10_000
USER_CHOICES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")  # either one set: the user chose how OpenMP waits


def spin_briefly(environ: MutableMapping[str, str] = os.environ) -> None:
    """GOMP_SPINCOUNT = SPIN_COUNT, unless the user chose how OpenMP waits (GOMP_SPINCOUNT or
    OMP_WAIT_POLICY set). Each libgomp reads it once, when it is loaded: in a process that loaded
    torch before the worker package, torch's keeps its default (FAISS's own libgomp, loaded
    later, and child processes still take this)."""
    if not any(name in environ for name in USER_CHOICES):
        environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
