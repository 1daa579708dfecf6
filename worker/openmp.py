"""How long torch's waiting OpenMP threads spin before they sleep, chosen before torch loads.

Torch's CPU ops run on GNU OpenMP (libgomp). A thread that waits for the rest of its team spins
GOMP_SPINCOUNT times before it sleeps: 300,000 by default, long enough to outlast most of a
search's small ops. Beside another busy torch process (an indexing CLI, a second worker), both
processes' waiting threads spun on the CPUs that the threads they waited for needed. Demo index,
searches through a real worker beside `python -m worker index` of the Sentinel-2 scene (started
with the same setting), p50 ms, two rounds alternated (scripts/lab search_beside_load;
docs/benchmarks/speed.md, fifteenth stop):

| GOMP_SPINCOUNT | alone | beside the indexing CLI | the CLI's own run (6 s alone) |
|---|---|---|---|
| 300,000 (libgomp's default) | 174, 183 | 828, 2032 | 24, 26 s |
| 10,000 (the worker's) | 187, 173 | 415, 400 | 8, 7 s |
| 3,000 | 184, 187 | 303, 315 | 7, 7 s |

10,000 costs nothing alone that this machine's noise shows; 3,000 may cost a little. Beside work
that never waits for a team (sha256sum on every core) every count gave 363-486 ms, and during the
worker's own indexing job 286-321.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = 10_000


def spin_briefly(environ: MutableMapping[str, str] = os.environ) -> None:
    """GOMP_SPINCOUNT = SPIN_COUNT, unless the user chose how OpenMP waits (GOMP_SPINCOUNT or
    OMP_WAIT_POLICY set). libgomp reads it once, when torch loads it: in a process that loaded
    torch before the worker package, this changes nothing."""
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
