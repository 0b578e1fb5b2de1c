#!/usr/bin/env python3
"""Proposals/s of etcd-only, Python-only and mixed 3-node clusters under one harness.

Owns nothing but measuring: every cluster runs under the oracle's own router
(../shared/oracle/drive_cluster.py, imported in place), which elects node 1 by
campaign, hands it proposals `window` at a time and routes until quiescent,
then checks that every node committed the same log.  The router and the pipes
dominate both implementations, so only figures from one run on one machine
are comparable; this script prints them side by side, with the all-Python /
all-etcd ratio (target: within 1.5x).

    make bench-interop            # or: .venv/bin/python scripts/bench_interop.py --proposals 1000
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.interop import oracle as oracle_mod  # noqa: E402
from tests.interop.harness import ADAPTER  # noqa: E402

LAYOUTS = {"all-etcd": "EEE", "all-python": "PPP", "mixed P-lead": "PEE", "mixed E-lead": "EPP"}


def templates(binary: str) -> dict[str, str]:
    return {"E": f"{binary} -id {{id}} -peers {{peers}}",
            "P": f"{sys.executable} {ADAPTER} -id {{id}} -peers {{peers}}"}


def children_cpu() -> float:
    """CPU seconds (user + system) of every node process started and reaped so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_one(dc, binary: str, layout: str, proposals: int, window: int) -> dict:
    """One cluster run under the oracle router; adds the CPU its node processes used."""
    t = templates(binary)
    args = SimpleNamespace(
        nodes=len(layout), proposals=proposals, window=window, elect="campaign", bin=binary,
        node_cmd=t["E"], node_cmd_for={i + 1: t[k] for i, k in enumerate(layout)},
        reencode=False, repeat=1, verbose=False)
    cpu0 = children_cpu()
    res = dc.run(args)   # closes (and so reaps) its nodes before returning
    res["node_cpu_s"] = children_cpu() - cpu0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proposals", type=int, default=1000)
    ap.add_argument("--windows", default="1,100", help="proposals in flight per batch, comma separated")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is reported")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per cell")
    args = ap.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    orc = oracle_mod.build()
    dc = oracle_mod.import_drive_cluster()
    rates: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    failed = False
    # repeats are interleaved (every cell once, then again) so that load from
    # elsewhere on the machine hits all cells alike
    for _ in range(args.repeat):
        # start-up + election only: subtracted so CPU per proposal counts Raft work alone
        idle = {name: run_one(dc, str(orc.raftnode), layout, 0, 1)["node_cpu_s"]
                for name, layout in LAYOUTS.items()}
        for window in windows:
            for name, layout in LAYOUTS.items():
                res = run_one(dc, str(orc.raftnode), layout, args.proposals, window)
                if not res["identical_on_all"] or res["errors"]:
                    failed = True
                    print(f"FAILED {name} window={window}: {res}", file=sys.stderr)
                rates.setdefault((name, window), []).append(res["proposals_per_s"])
                cpu.setdefault((name, window), []).append(
                    max(res["node_cpu_s"] - idle[name], 0.0) / args.proposals * 1e6)
                if args.json:
                    print(json.dumps({"cluster": name, "layout": layout, **res}))
    table = {cell: statistics.median(r) for cell, r in rates.items()}
    cpu_us = {cell: statistics.median(r) for cell, r in cpu.items()}
    width = max(map(len, LAYOUTS)) + 2
    print(f"\nproposals/s, 3 nodes, {args.proposals} proposals, median of {args.repeat} "
          f"(oracle router; node 1 leads; layout from node 1: P=Python E=etcd)")
    print("cluster".ljust(width) + "layout  " + "".join(f"window={w:<6}".rjust(14) for w in windows))
    for name, layout in LAYOUTS.items():
        print(name.ljust(width) + layout.ljust(8) + "".join(f"{table[(name, w)]:14.1f}" for w in windows))
    print("\nnode CPU (all 3 processes, user+sys) per proposal, microseconds; wall-clock figures above")
    print("also carry the router and whatever else the machine runs (load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    for name, layout in LAYOUTS.items():
        print(name.ljust(width) + layout.ljust(8) + "".join(f"{cpu_us[(name, w)]:14.1f}" for w in windows))
    for w in windows:
        ratio = table[("all-etcd", w)] / table[("all-python", w)]
        verdict = "ok" if ratio <= 1.5 else "MISSES the 1.5x target"
        print(f"window={w}: all-python takes {ratio:.2f}x the time of all-etcd ({verdict})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
