"""Command line of the simulation: replay one seed, or soak many.

    python -m tests.sim --seed N [--storage disk] [--no-protect] [-v]
    python -m tests.sim --soak 10000 [--start 0] [--jobs 2] [--storage memory] [--no-protect]

--no-protect runs nodes that lost state without Config.lost_state's vote rule (they
vote as plain Raft would): some seeds then break election safety; see tests/test_sim.py.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import tempfile
import time

from .runner import SimFailure, run_seed
from .stores import scratch_dir


def _one(args: tuple[int, str, bool]) -> tuple[int, str | None, int]:
    seed, storage, protect = args
    try:
        with tempfile.TemporaryDirectory(prefix="sim-", dir=scratch_dir()) as workdir:
            r = run_seed(seed, storage, workdir=workdir, protect=protect)
        return seed, None, r.committed
    except SimFailure as e:
        return seed, str(e), 0


def soak(start: int, count: int, storage: str, jobs: int, protect: bool = True) -> int:
    t0 = time.perf_counter()
    failures: list[tuple[int, str]] = []
    committed = 0
    seeds = [(s, storage, protect) for s in range(start, start + count)]
    with multiprocessing.Pool(jobs) as pool:
        for i, (seed, err, n) in enumerate(pool.imap_unordered(_one, seeds, chunksize=4), 1):
            committed += n
            if err is not None:
                failures.append((seed, err))
                print(err.splitlines()[0], flush=True)
                print("  " + err.splitlines()[1], flush=True)
            if i % 500 == 0:
                el = time.perf_counter() - t0
                print(f"soak: {i}/{count} seeds, {len(failures)} failed, {el:.0f}s ({i / el:.1f} seeds/s)", flush=True)
    el = time.perf_counter() - t0
    print(f"soak: {count} seeds ({storage}{'' if protect else ', no protection'}) from {start}: {len(failures)} failed, "
          f"{committed} entries committed in total, {el:.1f}s with {jobs} jobs")
    for seed, err in sorted(failures)[:20]:
        print(f"FAILED seed {seed}: {err.splitlines()[0]}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, help="replay this seed")
    ap.add_argument("--storage", choices=["memory", "disk"], default="memory")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every event (and the core's debug log with -vv)", )
    ap.add_argument("--soak", type=int, metavar="COUNT", help="run COUNT seeds")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-protect", action="store_true", help="nodes that lost state vote as plain Raft would")
    args = ap.parse_args(argv)
    if args.soak:
        return soak(args.start, args.soak, args.storage, args.jobs, protect=not args.no_protect)
    if args.seed is None:
        ap.error("--seed N or --soak COUNT")
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="          core %(name)s: %(message)s", stream=sys.stdout)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="sim-", dir=scratch_dir()) as workdir:
            r = run_seed(args.seed, args.storage, verbose=args.verbose, workdir=workdir, protect=not args.no_protect)
    except SimFailure as e:
        print(f"FAILED: {e}")
        return 1
    el = time.perf_counter() - t0
    print(f"seed {r.seed} ({r.storage}) ok: {r.steps} steps, {r.committed} committed, {r.leaders} terms with a "
          f"leader, {r.messages} messages, {r.checks} checks, ticks to commit after heal {r.heal_ticks_used}, "
          f"{el:.2f}s")
    print(f"  faults: {r.faults}")
    print(f"  workload: {r.workload}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
