"""`python -m devnet.chaos`: minutes of random faults on a devnet, then heal and check.

Faults drawn from a seeded RNG every few seconds: kill -9 / SIGTERM / restart
a consensus, wipe a node's raft data, kill a controller, partitions (random
shape, sometimes one-way), drop/delay/duplication, a slow or failing
controller, a network hub restart. At the end everything is healed and
restarted, and the run fails (exit 1) unless all chains converge and agree.
Not part of CI (`make chaos`).
"""
from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
import time

from .ops import Devnet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="devnet.chaos")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--block-interval", type=int, default=0)
    ap.add_argument("--tick-ms", type=int, default=50)
    ap.add_argument("--period-s", type=float, default=3.0, help="mean seconds between faults")
    ap.add_argument("--dir", default=None, help="state dir (default: a temp dir, removed on success)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    d = args.dir or tempfile.mkdtemp(prefix="devnet-chaos-")
    print(f"chaos: seed={args.seed} nodes={args.nodes} minutes={args.minutes} dir={d} "
          f"(replay with --seed {args.seed})", flush=True)
    dn = Devnet.create(d, nodes=args.nodes, block_interval=args.block_interval, tick_ms=args.tick_ms,
                       heartbeat_tick=2, election_tick=10, seed=args.seed)
    counts: collections.Counter = collections.Counter()
    ok = False
    try:
        dn.up(wait_serving=60)
        n = args.nodes
        end = time.monotonic() + args.minutes * 60
        restarts: dict[int, float] = {}   # node -> when its consensus comes back
        start_height = max(dn.heights())
        while time.monotonic() < end:
            time.sleep(min(rng.expovariate(1 / args.period_s), max(0.0, end - time.monotonic())))
            for node, when in list(restarts.items()):
                if time.monotonic() >= when:
                    dn.start(node)
                    del restarts[node]
            i = rng.randrange(n)
            fault = rng.choice(["kill", "stop", "wipe", "kill_controller", "partition", "oneway", "heal",
                                "heal", "net", "net_clear", "slow_controller", "failing_controller",
                                "hub_restart"])
            if fault in ("kill", "stop", "wipe"):
                # A downed consensus comes back after 1-8 s, as a pod restarted by k8s would.
                {"kill": dn.kill, "stop": dn.stop, "wipe": dn.wipe}[fault](i)
                restarts[i] = time.monotonic() + rng.uniform(1, 8)
            elif fault == "kill_controller":
                dn.stop_controller(i, kill=True)
                time.sleep(rng.uniform(0, 2))
                dn.start_controller(i)
            elif fault in ("partition", "oneway"):
                nodes = list(range(n))
                rng.shuffle(nodes)
                cut = rng.randrange(1, n)
                dn.partition([nodes[:cut], nodes[cut:]], oneway=fault == "oneway")
            elif fault == "heal":
                dn.heal()
            elif fault == "net":
                dn.net(drop=rng.choice([0, 0.1, 0.3]), delay_ms=rng.choice([0, 20, 100, 500]),
                       jitter_ms=rng.choice([0, 50]), dup=rng.choice([0, 0.05, 0.2]))
            elif fault == "net_clear":
                dn.net(drop=0, delay_ms=0, jitter_ms=0, dup=0)
            elif fault == "slow_controller":
                dn.controller_fault(i, delay_ms=rng.choice([100, 500, 2000]), duration_s=rng.uniform(1, 8))
            elif fault == "failing_controller":
                dn.controller_fault(i, fail_rate=rng.choice([0.3, 1.0]), duration_s=rng.uniform(1, 8))
            elif fault == "hub_restart":
                dn.stop_hub()
                dn.start_hub()
            counts[fault] += 1
            print(f"t+{args.minutes * 60 - (end - time.monotonic()):6.1f}s {fault:<18} node{i} "
                  f"heights={dn.heights()}", flush=True)
        print("healing and restarting everything ...", flush=True)
        dn.start_hub()
        dn.heal(all_faults=True)
        for i in range(n):
            dn.start_controller(i)
            dn.controller_fault(i, duration_s=0)
            dn.start(i)
        start_top = max(dn.heights())
        deadline = time.monotonic() + 120
        converged = False
        while time.monotonic() < deadline:
            # Every node has committed past the top height when healing began: all caught
            # up and live again. (Equal heights at one instant are not required: at
            # block_interval 0 the chain moves on while the chain files are read, and
            # followers trail the leader by a block.) dn.chains() then checks agreement.
            hs = dn.heights()
            if min(hs) > start_top:
                converged = True
                break
            time.sleep(0.5)
        rows, problems = dn.chains()
        print(f"faults: {dict(counts)} total={sum(counts.values())}")
        print(f"blocks: {start_top - start_height} committed during the faults, heights after healing "
              f"{dn.heights()} converged={converged}")
        for p in problems:
            print(f"DISAGREE: {p}")
        ok = converged and not problems
        print("chaos: OK" if ok else "chaos: FAILED", flush=True)
    finally:
        dn.down()
        if ok and not args.dir:
            shutil.rmtree(d, ignore_errors=True)
        elif not ok:
            print(f"state and logs kept in {d}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
