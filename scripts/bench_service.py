"""Benchmark of the consensus service on a devnet (`make bench`); prints a table, writes JSON.

Real consensus.py processes on loopback with the simulated controllers and
network hub (devnet). Figures:
* the cost of one bare gRPC unary round trip on this machine (sync client and
  server in one process), so the others read as ratios;
* per cluster (3 and 4 nodes) x block_interval (0 = as fast as possible, and
  the default 3 s), with the default ticks (and 3 nodes at block_interval 0
  also with fast ticks): committed blocks/s; per-block latency, from the leader's
  controller serving the proposal to CommitBlock returned on *all* nodes,
  p50/p99; CPU (% of one core) and RSS of each consensus process; start-up
  time from spawn to health SERVING;
* failover: kill -9 of the leader to the next block committed by a new
  leader, with fast ticks and with the default ticks (200 ms, election 50).
Targets (issue 6): >= 100 blocks/s and p50 <= 10 ms on 3 nodes with
block_interval 0; failover <= 1.5 x election timeout + block_interval; idle
CPU <= 2% of a core and RSS <= 80 MB per node.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent import futures

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from devnet import procs  # noqa: E402
from devnet.chain import read_chain  # noqa: E402
from devnet.ops import Devnet  # noqa: E402
from tests.waiting import wait_for  # noqa: E402

FAST = {"tick_ms": 50, "heartbeat_tick": 2, "election_tick": 10}
DEFAULT = {"tick_ms": 200, "heartbeat_tick": 15, "election_tick": 50}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def grpc_round_trip(n: int, idle_n: int = 300, gap_s: float = 0.005) -> dict:
    """Unary round trips of a trivial method, sync client and server in this process:
    back to back, and one every gap_s (as a chain's RPCs arrive, between quiet spells:
    gRPC's threads have gone to sleep and each call wakes several of them)."""
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req, request_deserializer=None,
                                                    response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/bench.Echo/Call")
            for _ in range(100):
                call(b"x" * 64)
            lat = []
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                call(b"x" * 64)
                lat.append(time.perf_counter() - t)
            total = time.perf_counter() - t0
            idle = []
            for _ in range(idle_n):
                time.sleep(gap_s)
                t = time.perf_counter()
                call(b"x" * 64)
                idle.append(time.perf_counter() - t)
    finally:
        server.stop(0)
    return {"calls": n, "per_s": n / total, "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000,
            "idle_gap_ms": gap_s * 1000, "idle_p50_ms": pct(idle, 50) * 1000, "idle_p99_ms": pct(idle, 99) * 1000}


def hub_round_trip(base: str, n: int) -> dict:
    """The simulator's own cost: SendMsg to the hub -> ProcessNetworkMsg on a trivial
    handler in this process, one message at a time."""
    import queue

    from cita_raft_pb import common_pb2, network_pb2, network_pb2_grpc
    from devnet.layout import origin_of

    dn = Devnet.create(os.path.join(base, "hub-only"), nodes=2)
    got: queue.Queue = queue.Queue()

    class Handler(network_pb2_grpc.NetworkMsgHandlerServiceServicer):
        def ProcessNetworkMsg(self, request, context):
            got.put(time.perf_counter())
            return common_pb2.StatusCode(code=0)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    network_pb2_grpc.add_NetworkMsgHandlerServiceServicer_to_server(Handler(), server)
    server.add_insecure_port(f"127.0.0.1:{dn.spec.consensus_port(1)}")
    server.start()
    lat = []
    try:
        dn.start_hub()
        with grpc.insecure_channel(f"127.0.0.1:{dn.spec.network_port(0)}") as c0, \
                grpc.insecure_channel(f"127.0.0.1:{dn.spec.network_port(1)}") as c1:
            network_pb2_grpc.NetworkServiceStub(c1).RegisterNetworkMsgHandler(network_pb2.RegisterInfo(
                module_name="consensus", hostname="localhost", port=str(dn.spec.consensus_port(1))))
            send = network_pb2_grpc.NetworkServiceStub(c0).SendMsg
            msg = network_pb2.NetworkMsg(module="consensus", type="raft", origin=origin_of(dn.spec.address(1)),
                                         msg=b"x" * 100)
            for k in range(n + 50):
                t0 = time.perf_counter()
                send(msg, timeout=5)
                t1 = got.get(timeout=5)
                if k >= 50:
                    lat.append(t1 - t0)
    finally:
        dn.down()
        server.stop(0)
    return {"messages": n, "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000}


def start_devnet(d: str, nodes: int, block_interval: int, ticks: dict) -> tuple[Devnet, list[float]]:
    dn = Devnet.create(d, nodes=nodes, block_interval=block_interval, **ticks)
    dn.start_hub()
    for i in range(nodes):
        dn.start_controller(i)
    t0 = {}
    for i in range(nodes):
        t0[i] = time.monotonic()
        dn.start(i)
    startup = [0.0] * nodes
    pending = set(range(nodes))
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for i in list(pending):
            if dn.health(i, 0.2):
                startup[i] = time.monotonic() - t0[i]
                pending.discard(i)
        time.sleep(0.01)
    if pending:
        raise TimeoutError(f"nodes {sorted(pending)} not serving after 60 s (see {d}/logs)")
    return dn, startup


def wait_until(cond, timeout: float, what: str):
    """tests/waiting.wait_for, unscaled (a benchmark's bounds are its own), raising TimeoutError."""
    return wait_for(cond, timeout, what, interval=0.05, error=TimeoutError)


def cluster_run(base: str, nodes: int, block_interval: int, window: float, ticks: dict) -> dict:
    d = os.path.join(base, f"n{nodes}-bi{block_interval}-t{ticks['tick_ms']}")
    dn, startup = start_devnet(d, nodes, block_interval, ticks)
    election_s = ticks["tick_ms"] * ticks["election_tick"] / 1000
    try:
        # the first election takes one to two election timeouts (20 s with the default ticks)
        wait_until(lambda: min(dn.heights()) >= 2, 60 + 3 * election_s + 3 * block_interval, "the first blocks")
        pids = [dn.consensus_pid(i) for i in range(nodes)]
        controller_pids = [procs.read_pid(dn.spec.pid_file(f"controller{i}")) for i in range(nodes)]
        sim_pids = controller_pids + [procs.read_pid(dn.spec.pid_file("network"))]
        cpu0 = [procs.cpu_seconds(p) for p in pids]
        sim0 = [procs.cpu_seconds(p) for p in sim_pids if p]
        dn.hub({"op": "reset_stats"})
        h0, t0 = dn.heights()[0], time.monotonic()
        time.sleep(window)
        h1, t1 = dn.heights()[0], time.monotonic()
        cpu1 = [procs.cpu_seconds(p) for p in pids]
        sim1 = [procs.cpu_seconds(p) for p in sim_pids if p]
        rss = [procs.rss_mb(p) for p in pids]
        net = dn.hub({"op": "status"})
        sim_rss = [procs.rss_mb(p) for p in controller_pids if p]
        timings = [dn.timings(i, h0 + 1) for i in range(nodes)]
        blocks = {b.height: b for b in read_chain(dn.spec.chain_file(0)) if h0 < b.height <= h1}
        lat, lat_leader = [], []
        for h, b in blocks.items():
            proposer = dn.spec.addresses.index(b.proposer.hex())
            served = timings[proposer].get(h, [0, 0])[0]
            commits = [t.get(h, [0, 0])[1] for t in timings]
            if served and all(commits):
                lat.append((max(commits) - served) * 1000)
                lat_leader.append((commits[proposer] - served) * 1000)
        el = t1 - t0
        return {"nodes": nodes, "block_interval": block_interval, "ticks": ticks, "window_s": round(el, 2),
                "hub_delivery_ms": net.get("delivery_ms"), "messages": net["stats"]["delivered"],
                "blocks": h1 - h0, "blocks_per_s": (h1 - h0) / el,
                "latency_p50_ms": pct(lat, 50), "latency_p99_ms": pct(lat, 99), "latency_samples": len(lat),
                "leader_commit_p50_ms": pct(lat_leader, 50),
                "cpu_pct": [None if a is None or b is None else 100 * (b - a) / el for a, b in zip(cpu0, cpu1,
                                                                                                      strict=True)],
                "rss_mb": rss, "controller_rss_mb": sim_rss, "startup_s": startup,
                # CPU time of every process of the devnet per committed block: what the
                # machine spends on a block, the simulated controllers and hub included
                "cpu_ms_per_block": {
                    "consensus": [None if a is None or b is None or not (h1 - h0) else 1000 * (b - a) / (h1 - h0)
                                  for a, b in zip(cpu0, cpu1, strict=True)],
                    "simulators": (1000 * sum(b - a for a, b in zip(sim0, sim1, strict=True) if a is not None
                                              and b is not None) / (h1 - h0)) if h1 > h0 else None}}
    finally:
        dn.down()


def failover_run(base: str, name: str, ticks: dict, rounds: int, block_interval: int = 0) -> dict:
    d = os.path.join(base, f"failover-{name}")
    dn, _ = start_devnet(d, 3, block_interval, ticks)
    election_s = ticks["tick_ms"] * ticks["election_tick"] / 1000
    results = []
    try:
        wait_until(lambda: min(dn.heights()) >= 2, 60 + 2 * election_s, "the first blocks")
        for _ in range(rounds):
            # dn.leader() may be node 0, which is falsy: wrap it.
            leader = wait_until(lambda: (lambda x: None if x is None else [x])(dn.leader()),
                                60 + 3 * election_s, "a leader (metrics role 2)")[0]
            h_kill = max(dn.heights())
            t_kill = time.time()
            dn.kill(leader)
            survivors = [i for i in range(3) if i != leader]
            old = dn.spec.address(leader)

            def new_block(survivors=survivors, h_kill=h_kill, old=old):
                for i in survivors:
                    for b in read_chain(dn.spec.chain_file(i))[h_kill:]:
                        if b.proposer != old:
                            return b.height
                return None
            h = wait_until(new_block, 4 * election_s + 30, "a block from a new leader")
            commits = [dn.timings(i, h).get(h, [0, 0])[1] for i in survivors]
            t_new = min(c for c in commits if c)
            results.append(t_new - t_kill)
            dn.start(leader)
            # With block_interval 0 followers commit a block when the next one's append
            # arrives, so heights read one after another differ by a block or two.
            wait_until(lambda h=h: (lambda hs: max(hs) - min(hs) <= 2 and min(hs) > h)(dn.heights()), 60,
                       "convergence")
    finally:
        dn.down()
    return {"ticks": name, **ticks, "election_timeout_s": election_s, "block_interval": block_interval,
            "target_s": 1.5 * election_s + block_interval, "rounds": results,
            "mean_s": statistics.mean(results) if results else None, "max_s": max(results) if results else None}


def fmt(v, spec=".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return "/".join(fmt(x, spec) for x in v)
    return format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="bench-results/bench_service.json")
    ap.add_argument("--window", type=float, default=12.0, help="seconds measured per cluster run")
    ap.add_argument("--quick", action="store_true", help="short windows, one failover round, no default-tick failover")
    args = ap.parse_args(argv)
    window = 5.0 if args.quick else args.window
    base = tempfile.mkdtemp(prefix="bench-service-")
    out: dict = {"machine": {"cpus": os.cpu_count()}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        out["grpc_round_trip"] = rt = grpc_round_trip(2000)
        print(f"bare gRPC unary round trip: p50 {rt['p50_ms']:.3f} ms, p99 {rt['p99_ms']:.3f} ms, "
              f"{rt['per_s']:.0f} calls/s back to back; one call every {rt['idle_gap_ms']:.0f} ms: "
              f"p50 {rt['idle_p50_ms']:.3f} ms, p99 {rt['idle_p99_ms']:.3f} ms", flush=True)
        out["hub_round_trip"] = hr = hub_round_trip(base, 1000)
        print(f"network hub alone, SendMsg -> handler: p50 {hr['p50_ms']:.3f} ms, p99 {hr['p99_ms']:.3f} ms",
              flush=True)
        runs = []
        # Every cluster runs the default ticks (200 ms, heartbeat 15, election 50), as a chain
        # is configured; block_interval 0 (as fast as possible) on 3 nodes also with fast
        # ticks (50 ms, heartbeat 2), where heartbeats are 20x as frequent. The default
        # interval (3 s) is also the idle figure.
        plan = [(3, 0, DEFAULT), (3, 0, FAST), (3, 3, DEFAULT), (4, 0, DEFAULT), (4, 3, DEFAULT)]
        if args.quick:
            plan = [p for p in plan if p[2] is DEFAULT]
        for nodes, bi, ticks in plan:
            r = cluster_run(base, nodes, bi, window if bi == 0 else max(window, 12.0), ticks)
            runs.append(r)
            print(f"  {nodes} nodes, block_interval {bi}, tick {ticks['tick_ms']} ms: {r['blocks_per_s']:.1f} blocks/s, "
                  f"p50 {fmt(r['latency_p50_ms'])} ms", flush=True)
        out["clusters"] = runs
        out["failover"] = [failover_run(base, "fast", FAST, 1 if args.quick else 3)]
        if not args.quick:
            out["failover"].append(failover_run(base, "default", DEFAULT, 1))
        print()
        print(f"{'nodes':>5} {'bi':>3} {'tick':>5} {'blocks/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'ldr p50':>7} "
              f"{'p50/rtt':>7} "
              f"{'msgs/blk':>8} {'hub ms':>6} {'cpu % per node':>18} {'cpu ms/blk c+sim':>18} {'rss MB per node':>18} "
              f"{'startup s':>16}")
        for r in runs:
            ratio = r["latency_p50_ms"] / rt["p50_ms"] if r["latency_p50_ms"] else None
            per_block = r["messages"] / r["blocks"] if r["blocks"] else None
            print(f"{r['nodes']:>5} {r['block_interval']:>3} {r['ticks']['tick_ms']:>5} {r['blocks_per_s']:>9.1f} "
                  f"{fmt(r['latency_p50_ms']):>7} {fmt(r['latency_p99_ms']):>7} {fmt(r['leader_commit_p50_ms']):>7} "
                  f"{fmt(ratio, '.0f'):>7} "
                  f"{fmt(per_block, '.1f'):>8} {fmt((r['hub_delivery_ms'] or {}).get('p50'), '.2f'):>6} "
                  f"{fmt(r['cpu_pct']):>18} "
                  f"{fmt(sum(x or 0 for x in r['cpu_ms_per_block']['consensus'])) + '+' + fmt(r['cpu_ms_per_block']['simulators']):>18} "
                  f"{fmt(r['rss_mb'], '.0f'):>18} {fmt(r['startup_s'], '.2f'):>16}")
        print()
        for f in out["failover"]:
            print(f"failover ({f['ticks']} ticks: {f['tick_ms']} ms x election {f['election_tick']} = "
                  f"{f['election_timeout_s']:.1f} s, block_interval {f['block_interval']}): "
                  f"kill -9 leader -> next block {fmt(f['rounds'], '.2f')} s "
                  f"(target <= {f['target_s']:.2f} s)")
        print(f"bare gRPC round trip p50 {rt['p50_ms']:.3f} ms ({rt['per_s']:.0f}/s) on {os.cpu_count()} cores, "
              f"{rt['idle_p50_ms']:.3f} ms after {rt['idle_gap_ms']:.0f} ms idle; "
              f"hub alone SendMsg->handler p50 {hr['p50_ms']:.3f} ms")
        print("p50/p99: proposal served -> CommitBlock done on all nodes; ldr p50: ... on the proposer's node; "
              "hub ms: p50 of the hub's ProcessNetworkMsg calls into consensus during the run; "
              "cpu ms/blk c+sim: CPU per block of all consensus processes + the simulators (controllers, hub)")
    except BaseException:
        print(f"benchmark failed; devnet dirs and logs kept in {base}", flush=True)
        raise
    else:
        shutil.rmtree(base, ignore_errors=True)
    finally:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
