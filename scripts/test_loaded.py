#!/usr/bin/env python3
"""Run the whole test suite several times in a row beside CPU-bound processes.

    python scripts/test_loaded.py [--runs N] [--burners K] [--max-minutes M]

The suite must not depend on how fast the machine is: every wait in it is a
bounded wait on a condition. This proves it by running `make test` RUNS times
(default 10) while BURNERS processes (default 2, one per core here) spin
the CPU. It stops at the first failing run and keeps that run's output in
tmp/test-loaded/run-N.log. The burners are started and killed by pid and
end by themselves after MAX_MINUTES in any case.
"""
import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BURN = "import time\nend = time.monotonic() + {secs}\nx = 0\nwhile time.monotonic() < end:\n    x += 1\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="suite runs in a row (default 10)")
    ap.add_argument("--burners", type=int, default=2, help="CPU-bound processes beside it (default 2)")
    ap.add_argument("--max-minutes", type=float, default=240, help="hard bound on the burners' life")
    args = ap.parse_args()

    out_dir = ROOT / "tmp" / "test-loaded"
    out_dir.mkdir(parents=True, exist_ok=True)
    secs = int(args.max_minutes * 60)
    burners = [subprocess.Popen([sys.executable, "-c", BURN.format(secs=secs)]) for _ in range(args.burners)]
    print(f"test-loaded: {args.burners} CPU burners (pids {', '.join(str(b.pid) for b in burners)}), "
          f"{args.runs} runs of `make test`; logs in {out_dir}", flush=True)
    passed = 0
    try:
        for run in range(1, args.runs + 1):
            log = out_dir / f"run-{run}.log"
            t0 = time.monotonic()
            with open(log, "w") as fh:
                rc = subprocess.call(["make", "-s", "test"], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
            took = time.monotonic() - t0
            tail = [ln for ln in log.read_text().splitlines() if " passed" in ln or " failed" in ln]
            print(f"run {run}/{args.runs}: {'ok' if rc == 0 else 'FAILED'} in {took:.0f} s  "
                  f"({'; '.join(s.strip('= ') for s in tail)})", flush=True)
            if rc != 0:
                print(f"test-loaded: run {run} failed; its output is in {log}", flush=True)
                break
            passed += 1
    finally:
        for b in burners:
            if b.poll() is None:
                os.kill(b.pid, signal.SIGKILL)
            b.wait()
    print(f"test-loaded: {passed} of {args.runs} loaded runs passed in a row")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
