"""How a worker's searches fare beside other work on the machine, for each way of starting it.

A real `python -m worker serve` over ZeroMQ searches the demo index (the Sentinel-2 scene),
started with each environment given (VAR=VALUE,...; "worker" for none: the worker's own
defaults, worker.openmp; this process's own GOMP_SPINCOUNT and OMP_WAIT_POLICY are not passed
on), and is timed (p50 ms of the client's round trips):
- alone;
- beside one CPU burner per core (sha256sum /dev/zero: work that never waits for a team);
- beside `python -m worker index` of the same scene into another index, started with the same
  environment, or with --cli-env's (another torch process; its own seconds reported too);
- while the worker itself indexes the scene at 112 px tiles (its own job; its seconds too);
- alone again.
The environments run in turn, `--rounds` times, so that the machine's drift shows.
Run: scripts/lab search_beside_load [--rounds 2] [--env worker --env GOMP_SPINCOUNT=300000 ...] [--cli-env same]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lab.ann_scale import png
from lab.bench_speed import sketches
from lab.worker_process import WorkerProcess, wait_job
from wire import job_states as states
from worker.assets import load_asset_paths
from worker.model.loading import load_model
from worker.openmp import USER_CHOICES
from worker.store import IndexWriter, TileIndex
from worker.tiling import TileSettings


def environment(spec: str) -> dict[str, str]:
    """This process's environment less its OpenMP choices, with `spec`'s (VAR=VALUE,...; "worker":
    none, the worker's own defaults)."""
    env = {k: v for k, v in os.environ.items() if k not in USER_CHOICES}  # this process holds the worker's own
    if spec != "worker":
        env.update(item.split("=", 1) for item in spec.split(","))
    return env


def timed_searches(client, queries: list[bytes], count: int | None = None, until=None) -> list[float]:
    """Round trips (ms) of searches of the queries in turn: `count` of them, or until `until()`."""
    out = []
    while (count is not None and len(out) < count) or (until is not None and not until()):
        t0 = time.perf_counter()
        client.search("demo", queries[len(out) % len(queries)], top=10)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def one_round(spec: str, cli_spec: str, root: Path, raster: Path, queries: list[bytes], work: Path) -> dict:
    env = environment(spec)
    worker = WorkerProcess(root, raster.parent, env=env).start()
    out: dict = {}
    try:
        with worker.client(timeout=600) as c:
            timed_searches(c, queries, 3)  # opens the index
            out["alone"] = np.median(timed_searches(c, queries, 16))
            burners: list[subprocess.Popen] = []
            try:
                for _ in range(os.cpu_count() or 1):
                    burners.append(subprocess.Popen(["sha256sum", "/dev/zero"], stdout=subprocess.DEVNULL))
                time.sleep(1)
                out["beside burners"] = np.median(timed_searches(c, queries, 8))
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
            cli_out, cli_log = work / f"cli-{time.monotonic_ns()}", work / "cli.log"
            t0 = time.perf_counter()
            with open(cli_log, "ab") as log:
                cli = subprocess.Popen([sys.executable, "-m", "worker", "index", str(raster), "--out", str(cli_out),
                                        "--quiet", "--device", "cpu", "--sketch-modules", "none"],
                                       env=env if cli_spec == "same" else environment(cli_spec),
                                       stdout=subprocess.DEVNULL, stderr=log)
            try:
                beside = timed_searches(c, queries, until=lambda: cli.poll() is not None)
            finally:
                if cli.poll() is None:
                    cli.kill()
                cli.wait()
            if cli.returncode != 0 or len(beside) < 3:
                raise RuntimeError(f"the indexing CLI exited {cli.returncode} after {len(beside)} searches: {cli_log}")
            out["beside an indexing CLI"] = np.median(beside)
            out["the CLI's s"] = time.perf_counter() - t0
            shutil.rmtree(cli_out, ignore_errors=True)
            t0 = time.perf_counter()
            job = c.start_index(f"job-{time.monotonic_ns()}", [str(raster)], tile=112)
            during = timed_searches(c, queries, until=lambda: c.job(job["id"])["state"] in states.FINISHED)
            out["its job's s"] = time.perf_counter() - t0
            ended = wait_job(c, job["id"])
            if ended["state"] != states.DONE or len(during) < 3:
                raise RuntimeError(f"the worker's job ended {ended['state']} after {len(during)} searches: "
                                   f"{ended.get('error')}")
            out["during its own job"] = np.median(during)
            out["alone again"] = np.median(timed_searches(c, queries, 16))
    except Exception:
        print(f"the worker's log: {worker.log}", file=sys.stderr)
        raise
    finally:
        worker.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", action="append", default=None,
                        help='VAR=VALUE[,VAR=VALUE] for one worker, or "worker" (default: worker and '
                             'GOMP_SPINCOUNT=300000, libgomp\'s own)')
    parser.add_argument("--cli-env", default="same",
                        help='the indexing CLI\'s: "same" as each worker\'s (default), or as for --env')
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    specs = args.env or ["worker", "GOMP_SPINCOUNT=300000"]
    raster = Path(load_asset_paths()["s2_rgb"])
    work = Path(tempfile.mkdtemp(prefix="beside-load-"))
    root = work / "indexes"
    model = load_model(device="cpu")
    IndexWriter(root / "demo", model, TileSettings()).build([raster])
    queries = [png(q) for q in sketches(TileIndex.open(root / "demo"), model, 12)]
    del model
    rows = []
    for r in range(args.rounds):
        for spec in specs:
            rows.append((r + 1, spec, one_round(spec, args.cli_env, root, raster, queries, work)))
            print(f"round {rows[-1][0]}, {spec}: " + ", ".join(f"{k} {v:.0f}" for k, v in rows[-1][2].items()),
                  flush=True)
    columns = list(rows[0][2])
    print("\n| round | environment | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for r, spec, got in rows:
        print(f"| {r} | {spec} | " + " | ".join(f"{got[k]:.0f}" for k in columns) + " |")
    shutil.rmtree(work, ignore_errors=True)  # kept, with the workers' logs, when a round failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
