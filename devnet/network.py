"""The simulated network of a devnet: `python -m devnet.network DIR`.

One hub process serves `network.NetworkService` on every node's network port
and routes `NetworkMsg`s between nodes the way network_zenoh does
(cita-cloud.md §2): SendMsg targets `origin` = first 8 bytes of the target's
address (big-endian), the delivered message carries the *sender's* origin,
Broadcast goes to every other node, unknown targets are dropped with status
0, and delivery to the module's registered handler is concurrent (order is
not preserved) with the cita-cloud RetryClient policy on INTERNAL and the
other retryable codes (§2.3). Registrations live in memory only, so a
restarted hub forgets them, like network_p2p/tls (§2.1).

Faults are set at run time through the admin channel (`devnet partition`,
`devnet net`): directed link cuts (any partition shape, one-way cuts), a drop
rate (global or per link), delay with jitter, and duplication. Randomness is
seeded from the devnet spec. The hub never looks inside consensus payloads.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import signal
import sys
import time

import grpc

from cita_raft_pb import common_pb2, network_pb2, network_pb2_grpc

from . import admin
from .layout import Spec, origin_of

log = logging.getLogger("network")

# The cita-cloud RetryClient (cloud-common-rs retry.rs): these codes are retried.
RETRY_CODES = {grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
               grpc.StatusCode.UNAVAILABLE}
RETRY_INITIAL_S, RETRY_FACTOR, RETRY_JITTER, RETRY_MAX_INTERVAL_S = 0.1, 1.5, 0.2, 5.0
RETRY_MAX_ELAPSED_S, RETRY_MAX = 10.0, 10
ATTEMPT_TIMEOUT_S = 5.0


class Faults:
    """What the hub does to traffic: directed cuts, drop, delay/jitter, duplication."""

    def __init__(self) -> None:
        self.cut: set[tuple[int, int]] = set()
        self.drop = 0.0
        self.link_drop: dict[tuple[int, int], float] = {}
        self.delay_ms = 0.0
        self.jitter_ms = 0.0
        self.dup = 0.0

    def as_dict(self) -> dict:
        return {"cut": sorted(list(c) for c in self.cut), "drop": self.drop,
                "link_drop": {f"{s}>{d}": p for (s, d), p in sorted(self.link_drop.items())},
                "delay_ms": self.delay_ms, "jitter_ms": self.jitter_ms, "dup": self.dup}


def partition_cuts(groups: list[list[int]], nodes: int, oneway: bool = False) -> set[tuple[int, int]]:
    """Directed links to cut for a partition. Nodes not named form one more group.
    oneway: only traffic from the first group to the others is cut."""
    named = {n for g in groups for n in g}
    rest = [n for n in range(nodes) if n not in named]
    all_groups = [list(g) for g in groups] + ([rest] if rest else [])
    group_of = {n: k for k, g in enumerate(all_groups) for n in g}
    cuts = set()
    for s in range(nodes):
        for d in range(nodes):
            if s == d or group_of[s] == group_of[d]:
                continue
            if oneway and group_of[s] != 0:
                continue
            cuts.add((s, d))
    return cuts


class Hub:
    """Routing table, handlers and faults shared by every node's NetworkService."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.origins = {origin_of(spec.address(i)): i for i in range(spec.nodes)}
        self.handlers: dict[int, dict[str, tuple[str, network_pb2_grpc.NetworkMsgHandlerServiceStub]]] = {
            i: {} for i in range(spec.nodes)}
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.faults = Faults()
        self.stats = {k: 0 for k in ("sent", "broadcast", "delivered", "dropped_fault", "dropped_cut",
                                     "dropped_unknown_origin", "dropped_no_handler", "duplicated",
                                     "retries", "failed", "registrations")}
        self.tasks: set[asyncio.Task] = set()
        # Hub-side time of successful ProcessNetworkMsg calls (seconds), to tell the
        # simulator's share of a latency figure from the consensus service's.
        self.delivery_s: collections.deque[float] = collections.deque(maxlen=20000)

    def register(self, node: int, info: network_pb2.RegisterInfo) -> None:
        # Loopback only: the hostname (e.g. "localhost") is noted but we dial 127.0.0.1.
        target = f"127.0.0.1:{int(info.port)}"
        ch = self.channels.get(target)
        if ch is None:
            ch = self.channels[target] = grpc.aio.insecure_channel(target)
        old = self.handlers[node].get(info.module_name)
        self.handlers[node][info.module_name] = (target, network_pb2_grpc.NetworkMsgHandlerServiceStub(ch))
        self.stats["registrations"] += 1
        if old is None or old[0] != target:
            log.info("node%d registered module=%s handler=%s (host %s)", node, info.module_name, target,
                     info.hostname)

    def route(self, src: int, dst: int, msg: network_pb2.NetworkMsg) -> None:
        """Apply faults to one src->dst message and schedule its delivery copies."""
        if (src, dst) in self.faults.cut:
            self.stats["dropped_cut"] += 1
            return
        p = self.faults.link_drop.get((src, dst), self.faults.drop)
        if p and self.rng.random() < p:
            self.stats["dropped_fault"] += 1
            return
        copies = 1
        if self.faults.dup and self.rng.random() < self.faults.dup:
            copies = 2
            self.stats["duplicated"] += 1
        out = network_pb2.NetworkMsg(module=msg.module, type=msg.type, origin=origin_of(self.spec.address(src)),
                                     msg=msg.msg)
        for _ in range(copies):
            delay = 0.0
            if self.faults.delay_ms or self.faults.jitter_ms:
                delay = (self.faults.delay_ms + self.rng.uniform(0, self.faults.jitter_ms)) / 1000
            task = asyncio.create_task(self.deliver(src, dst, out, delay))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def deliver(self, src: int, dst: int, msg: network_pb2.NetworkMsg, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        start = time.monotonic()
        backoff = RETRY_INITIAL_S
        for attempt in range(RETRY_MAX + 1):
            handler = self.handlers[dst].get(msg.module)
            if handler is None:
                # network_zenoh drops messages for modules it cannot dispatch.
                self.stats["dropped_no_handler"] += 1
                return
            try:
                t0 = time.perf_counter()
                await handler[1].ProcessNetworkMsg(msg, timeout=ATTEMPT_TIMEOUT_S)
                self.delivery_s.append(time.perf_counter() - t0)
                self.stats["delivered"] += 1
                return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code not in RETRY_CODES or attempt == RETRY_MAX or \
                        time.monotonic() - start + backoff > RETRY_MAX_ELAPSED_S:
                    self.stats["failed"] += 1
                    log.debug("delivery node%d->node%d type=%s failed: %s", src, dst, msg.type, code)
                    return
            self.stats["retries"] += 1
            await asyncio.sleep(backoff * self.rng.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER))
            backoff = min(backoff * RETRY_FACTOR, RETRY_MAX_INTERVAL_S)

    def delivery_percentiles(self) -> dict:
        v = sorted(self.delivery_s)
        if not v:
            return {}
        return {"n": len(v), "p50": 1000 * v[len(v) // 2], "p99": 1000 * v[min(len(v) - 1, int(len(v) * 0.99))]}

    # ---- admin -----------------------------------------------------------------------
    async def admin(self, req: dict) -> dict:
        op = req["op"]
        n = self.spec.nodes
        if op == "status":
            return {"stats": self.stats, "faults": self.faults.as_dict(),
                    "handlers": {str(i): {m: t for m, (t, _) in h.items()} for i, h in self.handlers.items()},
                    "in_flight": len(self.tasks), "delivery_ms": self.delivery_percentiles()}
        if op == "partition":
            groups = [[int(x) for x in g] for g in req["groups"]]
            for g in groups:
                for x in g:
                    if not 0 <= x < n:
                        raise ValueError(f"no node {x}")
            self.faults.cut = partition_cuts(groups, n, bool(req.get("oneway")))
            log.info("partition groups=%s oneway=%s: %d directed links cut", groups, bool(req.get("oneway")),
                     len(self.faults.cut))
            return {"cut": sorted(list(c) for c in self.faults.cut)}
        if op == "cut":
            for s, d in req["links"]:
                self.faults.cut.add((int(s), int(d)))
            return {"cut": sorted(list(c) for c in self.faults.cut)}
        if op == "reachable":
            # Peers a node can talk to both ways: the controllers' block sync goes over the
            # chain's network in CITA-Cloud, so it must obey the same cuts.
            i = int(req["node"])
            return {"peers": [j for j in range(n) if j != i and (i, j) not in self.faults.cut
                              and (j, i) not in self.faults.cut]}
        if op == "reset_stats":
            self.delivery_s.clear()
            return {"ok": True}
        if op == "heal":
            self.faults.cut = set()
            if req.get("all"):
                self.faults = Faults()
            log.info("healed: all links restored%s", " and net faults cleared" if req.get("all") else "")
            return {"ok": True}
        if op == "net":
            f = self.faults
            if "drop" in req:
                f.drop = float(req["drop"])
            if "delay_ms" in req:
                f.delay_ms = float(req["delay_ms"])
            if "jitter_ms" in req:
                f.jitter_ms = float(req["jitter_ms"])
            if "dup" in req:
                f.dup = float(req["dup"])
            for link, p in req.get("link_drop", {}).items():
                s, d = (int(x) for x in link.split(">"))
                f.link_drop[(s, d)] = float(p)
            if req.get("clear_links"):
                f.link_drop = {}
            log.info("net faults now %s", f.as_dict())
            return f.as_dict()
        raise ValueError(f"unknown op {op!r}")


class NodeNetwork(network_pb2_grpc.NetworkServiceServicer):
    """The NetworkService one node sees (served on that node's network port)."""

    def __init__(self, hub: Hub, index: int):
        self.hub, self.index = hub, index

    async def RegisterNetworkMsgHandler(self, request, context):
        self.hub.register(self.index, request)
        return common_pb2.StatusCode(code=0)

    async def SendMsg(self, request, context):
        self.hub.stats["sent"] += 1
        dst = self.hub.origins.get(request.origin)
        if dst is None or dst == self.index:
            # zenoh publishes on a key nobody subscribes to: silently lost, status 0.
            self.hub.stats["dropped_unknown_origin"] += 1
            return common_pb2.StatusCode(code=0)
        self.hub.route(self.index, dst, request)
        return common_pb2.StatusCode(code=0)

    async def Broadcast(self, request, context):
        self.hub.stats["broadcast"] += 1
        for dst in range(self.hub.spec.nodes):
            if dst != self.index:
                self.hub.route(self.index, dst, request)
        return common_pb2.StatusCode(code=0)

    async def GetNetworkStatus(self, request, context):
        reachable = sum(1 for d in range(self.hub.spec.nodes)
                        if d != self.index and (self.index, d) not in self.hub.faults.cut)
        return network_pb2.NetworkStatusResponse(peer_count=reachable)

    async def AddNode(self, request, context):
        return common_pb2.StatusCode(code=0)

    async def GetPeersNetInfo(self, request, context):
        return common_pb2.TotalNodeNetInfo()


async def serve(spec: Spec) -> None:
    hub = Hub(spec)
    servers = []
    for i in range(spec.nodes):
        s = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        network_pb2_grpc.add_NetworkServiceServicer_to_server(NodeNetwork(hub, i), s)
        s.add_insecure_port(f"127.0.0.1:{spec.network_port(i)}")
        servers.append(s)
    a = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    a.add_generic_rpc_handlers([admin.aio_handler(hub.admin)])
    a.add_insecure_port(f"127.0.0.1:{spec.hub_admin_port()}")
    servers.append(a)
    for s in servers:
        await s.start()
    log.info("network hub serving %d nodes on ports %s, admin %d", spec.nodes,
             [spec.network_port(i) for i in range(spec.nodes)], spec.hub_admin_port())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("network hub stopping: %s", hub.stats)
    await asyncio.gather(*(s.stop(0.5) for s in servers))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m devnet.network DEVNET_DIR", file=sys.stderr)
        return 2
    spec = Spec.load(argv[0])
    logging.basicConfig(level=logging.DEBUG if spec.log_level == "debug" else logging.INFO,
                        format="%(asctime)s %(levelname)s network %(message)s", stream=sys.stdout)
    asyncio.run(serve(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
