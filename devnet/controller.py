"""The simulated controller of one devnet node: `python -m devnet.controller DIR I`.

It serves `controller.Consensus2ControllerService` to its node's consensus with
the real controller's observable behaviour (cita-cloud.md §1.2-§1.5):
GetProposal builds a hash-linked block for height+1 and caches it until a
block commits; CheckProposal runs the real checks in the real order with the
real status codes; CommitBlock appends (fsynced) for current+1, answers old
heights idempotently, 128 for gaps and treats height 2^64-1 as a ping; every
reply carries {height, block_interval, validators}. At start it calls its
consensus's Reconfigure every second until it answers 0. A controller that
falls behind its peers syncs the missing blocks from a peer controller
(devnet admin channel), calls CheckBlock and then Reconfigure per block, as
the real one does (§1.5 case 2).

It also keeps what tests and the benchmark need: per-height timings, a
conflicts file (a CommitBlock for a stored height with a different block:
a safety violation of consensus) and run-time faults (slow or failing).
It never decides anything consensus decides.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import time

import grpc

from cita_raft_pb import common_pb2, consensus_pb2_grpc, controller_pb2_grpc

from . import admin
from .chain import (
    CODE_NAMES,
    GAP,
    NODE_IN_SYNC_MODE,
    PING,
    PROPOSAL_TOO_HIGH,
    STORED,
    SUCCESS,
    Block,
    Chain,
    build_proposal,
    commit_route,
    config_reply,
    consensus_config,
    decode_proposal,
    header_hash,
    system_tx,
)
from .layout import Spec, load_schedule

log = logging.getLogger("controller")
SYNC_BATCH = 64
SYNC_PERIOD_S = 0.3
STALL_BEFORE_SYNC_S = 2.0


def code_name(code: int) -> str:
    return f"{code} ({CODE_NAMES.get(code, 'unknown')})"


class SimController(controller_pb2_grpc.Consensus2ControllerServiceServicer):
    """State and handlers of one node's controller."""

    def __init__(self, spec: Spec, index: int):
        self.spec, self.index = spec, index
        self.address = spec.address(index)
        self.chain = Chain(spec.chain_file(index), spec.genesis_hash(), spec.validators, spec.block_interval)
        if self.chain.truncated_bytes:
            log.warning("chain file %s: cut a torn tail of %d bytes at height %d",
                        spec.chain_file(index), self.chain.truncated_bytes, self.chain.height)
        self.rng = random.Random(spec.seed * 1000 + index)
        self.own: tuple[int, bytes, tuple[int, ...]] | None = None   # cached own proposal
        self.faults = {"delay_ms": 0, "fail_rate": 0.0, "until": 0.0}
        self.timings: dict[int, list[float]] = {}   # height -> [served, committed] (unix seconds)
        self.syncing = False
        self.sync_now = asyncio.Event()
        self.last_progress = time.monotonic()
        self.conflicts = 0
        self.counts = {"get": 0, "check": 0, "commit": 0, "ping": 0, "synced": 0, "reconfigure": 0}
        self._schedule_cache: tuple[float, list[dict]] = (-1.0, [])
        self.consensus_ch = grpc.aio.insecure_channel(f"127.0.0.1:{spec.consensus_port(index)}")
        self.consensus = consensus_pb2_grpc.ConsensusServiceStub(self.consensus_ch)
        self.peers = {j: admin.aio_stub(grpc.aio.insecure_channel(f"127.0.0.1:{spec.controller_port(j)}"))
                      for j in range(spec.nodes) if j != index}
        self.hub = admin.aio_stub(grpc.aio.insecure_channel(f"127.0.0.1:{spec.hub_admin_port()}"))

    # ---- helpers -----------------------------------------------------------------
    def config(self, height: int) -> common_pb2.ConsensusConfiguration:
        return consensus_config(height, self.chain.block_interval, [bytes.fromhex(v) for v in self.chain.validators])

    def is_validator(self) -> bool:
        return self.address.hex() in self.chain.validators

    def pending_changes(self, height: int) -> list[dict]:
        path = self.spec.schedule_file()
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            mtime = 0.0
        if mtime != self._schedule_cache[0]:
            self._schedule_cache = (mtime, load_schedule(self.spec))
        applied = self.chain.applied_changes()
        return [c for c in self._schedule_cache[1] if c["id"] not in applied and c["height"] <= height]

    async def inject_faults(self, context, what: str) -> None:
        f = self.faults
        if time.time() >= f["until"]:
            return
        if f["delay_ms"]:
            await asyncio.sleep(f["delay_ms"] / 1000)
        if f["fail_rate"] and self.rng.random() < f["fail_rate"]:
            log.info("fault: failing %s with UNAVAILABLE", what)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "devnet: controller failing on purpose")

    def _advanced(self) -> None:
        self.last_progress = time.monotonic()
        if self.own and self.own[0] <= self.chain.height:
            self.own = None

    # ---- Consensus2ControllerService ------------------------------------------------
    async def GetProposal(self, request, context):
        self.counts["get"] += 1
        await self.inject_faults(context, "GetProposal")
        if self.syncing:
            return common_pb2.ProposalResponse(status=common_pb2.StatusCode(code=NODE_IN_SYNC_MODE))
        height = self.chain.height + 1
        changes = self.pending_changes(height)
        ids = tuple(c["id"] for c in changes)
        if self.own is None or self.own[0] != height or self.own[2] != ids:
            txs = [self.rng.randbytes(32) for _ in range(self.rng.randint(1, 3))]
            txs += [system_tx(c["id"], c["validators"]) for c in changes]
            data = build_proposal(height, self.chain.block(height - 1), self.spec.genesis_hash(), self.address,
                                  txs, self.chain.tip_timestamp)
            self.own = (height, data, ids)
            if ids:
                log.info("proposal height=%d carries validator change ids=%s", height, list(ids))
        self.timings.setdefault(height, [time.time(), 0.0])
        return common_pb2.ProposalResponse(status=common_pb2.StatusCode(code=SUCCESS),
                                           proposal=common_pb2.Proposal(height=height, data=self.own[1]))

    async def CheckProposal(self, request, context):
        self.counts["check"] += 1
        await self.inject_faults(context, "CheckProposal")
        if self.own and request.height == self.own[0] and request.data == self.own[1]:
            return common_pb2.StatusCode(code=SUCCESS)   # §1.3 step 3: our own proposal
        code, why = self.chain.check_proposal(request.height, request.data)
        if code != SUCCESS:
            log.info("CheckProposal height=%d current=%d -> %s: %s", request.height, self.chain.height,
                     code_name(code), why)
        if code == PROPOSAL_TOO_HIGH:
            self.sync_now.set()
        return common_pb2.StatusCode(code=code)

    async def CommitBlock(self, request, context):
        if not request.HasField("proposal"):
            # The real controller answers gRPC INTERNAL here, which callers retry.
            await context.abort(grpc.StatusCode.INTERNAL, "proposal is none")
        height = request.proposal.height
        if commit_route(height, self.chain.height) == PING:
            self.counts["ping"] += 1
            return self._reply(SUCCESS, self.chain.height)
        self.counts["commit"] += 1
        await self.inject_faults(context, "CommitBlock")
        current = self.chain.height
        route = commit_route(height, current)
        if route == STORED:
            self._check_same(height, request.proposal.data)
            return self._reply(SUCCESS, height)
        if route == GAP:
            log.info("CommitBlock height=%d current=%d -> %s, will sync", height, current,
                     code_name(PROPOSAL_TOO_HIGH))
            self.sync_now.set()
            return self._reply(PROPOSAL_TOO_HIGH, height)
        code, block, why = self.chain.make_block(height, request.proposal.data, request.proof)
        if code != SUCCESS:
            log.warning("CommitBlock height=%d -> %s: %s", height, code_name(code), why)
            return self._reply(code, height)
        self._append(block, "commit")
        return self._reply(SUCCESS, height)

    def _reply(self, code: int, height: int) -> common_pb2.ConsensusConfigurationResponse:
        return config_reply(code, self.config(height))

    def _append(self, block: Block, how: str) -> None:
        self.chain.append(block)
        t = self.timings.setdefault(block.height, [0.0, 0.0])
        t[1] = time.time()
        if len(self.timings) > 200_000:
            for h in sorted(self.timings)[:100_000]:
                del self.timings[h]
        self._advanced()
        if block.changes:
            log.info("validators changed by block height=%d ids=%s, from height %d: %s", block.height,
                     block.changes, block.height + 1, [v[:8] for v in block.validators])
        log.debug("%s height=%d hash=%s", how, block.height, block.hash.hex()[:12])

    def _check_same(self, height: int, data: bytes) -> None:
        """CommitBlock of a stored height is a no-op for the real controller; here we also
        notice when consensus commits a *different* block there (a safety violation)."""
        stored = self.chain.block(height)
        try:
            h = header_hash(decode_proposal(data).proposal.header)
        except Exception:
            h = b""
        if stored is not None and h != stored.hash:
            self.conflicts += 1
            line = (f"{time.time():.3f} CommitBlock height={height} hash={h.hex()} differs from stored "
                    f"{stored.hash.hex()}\n")
            log.error("CONFLICT: %s", line.strip())
            with open(self.spec.conflicts_file(self.index), "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    # ---- Reconfigure at start, block sync -------------------------------------------
    async def reconfigure_until_ok(self, height: int | None = None) -> bool:
        cfg = self.config(self.chain.height if height is None else height)
        try:
            reply = await self.consensus.Reconfigure(cfg, timeout=2)
        except grpc.aio.AioRpcError as e:
            log.debug("Reconfigure height=%d failed: %s", cfg.height, e.code())
            return False
        self.counts["reconfigure"] += 1
        return reply.code == SUCCESS

    async def startup_reconfigure(self) -> None:
        attempt = 0
        while not await self.reconfigure_until_ok():
            attempt += 1
            if attempt % 10 == 1:
                log.info("Reconfigure height=%d not accepted yet (attempt %d), retrying every 1 s",
                         self.chain.height, attempt)
            await asyncio.sleep(1)
        log.info("Reconfigure height=%d validators=%d accepted by consensus", self.chain.height,
                 len(self.chain.validators))

    async def peer_heights(self) -> dict[int, int]:
        """Heights of the peer controllers this node can reach. Block sync travels over the
        network in CITA-Cloud, so the hub's partitions apply to it too (no hub: no sync)."""
        try:
            reachable = (await self.hub({"op": "reachable", "node": self.index}, timeout=0.5))["peers"]
        except (grpc.aio.AioRpcError, KeyError):
            return {}

        async def one(j):
            try:
                r = await self.peers[j]({"op": "tip"}, timeout=0.5)
                return j, int(r["height"])
            except (grpc.aio.AioRpcError, KeyError, ValueError):
                return j, -1
        return dict(await asyncio.gather(*(one(j) for j in self.peers if j in reachable)))

    async def sync_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.sync_now.wait(), SYNC_PERIOD_S)
            except TimeoutError:
                pass
            forced = self.sync_now.is_set()
            self.sync_now.clear()
            heights = await self.peer_heights()
            if not heights:
                continue
            best = max(heights, key=lambda j: heights[j])
            ahead = heights[best] - self.chain.height
            if ahead <= 0:
                continue
            stalled = time.monotonic() - self.last_progress > STALL_BEFORE_SYNC_S
            if not (forced or not self.is_validator() or ahead > 2 or stalled):
                continue
            try:
                await self.sync_from(best, heights[best])
            except Exception:   # a sync round must never kill the controller
                log.exception("sync from node%d failed", best)
            finally:
                self.syncing = False

    async def sync_from(self, peer: int, peer_height: int) -> None:
        start = self.chain.height
        self.syncing = True
        while self.chain.height < peer_height:
            try:
                reply = await self.peers[peer]({"op": "blocks", "from": self.chain.height + 1,
                                                "max": SYNC_BATCH}, timeout=3)
            except grpc.aio.AioRpcError as e:
                log.info("sync from node%d: fetching blocks failed: %s", peer, e.code())
                return
            lines = reply.get("blocks", [])
            if not lines:
                return
            for line in lines:
                b = Block.from_json(line)
                if b.prevhash != self.chain.tip_hash or b.height != self.chain.height + 1:
                    log.warning("sync from node%d: block height=%d does not link to our tip height=%d "
                                "(132 BlockCheckError)", peer, b.height, self.chain.height)
                    return
                pwp = common_pb2.ProposalWithProof(proposal=common_pb2.Proposal(height=b.height, data=b.data),
                                                   proof=b.proof)
                try:
                    code = (await self.consensus.CheckBlock(pwp, timeout=2)).code
                except grpc.aio.AioRpcError:
                    code = 200   # what the real controller substitutes for a failed call
                if code != SUCCESS:
                    log.info("sync: CheckBlock height=%d -> %s, aborting this round", b.height, code_name(code))
                    return
                if self.chain.height + 1 != b.height:   # consensus committed it meanwhile
                    continue
                code, block, why = self.chain.make_block(b.height, b.data, b.proof)
                if code != SUCCESS or block.hash != b.hash:
                    log.warning("sync: block height=%d from node%d rejected: %s", b.height, peer, why)
                    return
                self._append(block, "synced")
                self.counts["synced"] += 1
                if not await self.reconfigure_until_ok():
                    log.info("sync: Reconfigure height=%d not accepted, aborting this round", block.height)
                    return
        log.info("synced heights %d..%d from node%d", start + 1, self.chain.height, peer)

    # ---- admin ---------------------------------------------------------------------
    async def admin(self, req: dict) -> dict:
        op = req["op"]
        if op == "tip":
            return {"height": self.chain.height, "hash": self.chain.tip_hash.hex()}
        if op == "status":
            return {"node": self.index, "pid": os.getpid(), "height": self.chain.height,
                    "hash": self.chain.tip_hash.hex(), "validators": self.chain.validators,
                    "block_interval": self.chain.block_interval, "syncing": self.syncing,
                    "conflicts": self.conflicts, "faults": self.faults, "counts": self.counts}
        if op == "blocks":
            lo, n = int(req["from"]), int(req.get("max", SYNC_BATCH))
            return {"blocks": [b.to_json() for b in self.chain.blocks[lo - 1:lo - 1 + n]] if lo >= 1 else []}
        if op == "fault":
            dur = float(req.get("duration_s", 3600 * 24))
            self.faults = {"delay_ms": int(req.get("delay_ms", 0)), "fail_rate": float(req.get("fail_rate", 0.0)),
                           "until": time.time() + dur}
            log.info("fault set: delay_ms=%d fail_rate=%.2f for %.1f s", self.faults["delay_ms"],
                     self.faults["fail_rate"], dur)
            return {"ok": True}
        if op == "timings":
            lo = int(req.get("from", 1))
            return {"timings": {str(h): t for h, t in self.timings.items() if h >= lo}}
        raise ValueError(f"unknown op {op!r}")


async def serve(spec: Spec, index: int) -> None:
    ctl = SimController(spec, index)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    controller_pb2_grpc.add_Consensus2ControllerServiceServicer_to_server(ctl, server)
    server.add_generic_rpc_handlers([admin.aio_handler(ctl.admin)])
    port = spec.controller_port(index)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    log.info("controller node%d serving on 127.0.0.1:%d height=%d validator=%s", index, port,
             ctl.chain.height, ctl.is_validator())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(ctl.startup_reconfigure()), asyncio.create_task(ctl.sync_loop())]
    await stop.wait()
    log.info("controller node%d stopping at height=%d", index, ctl.chain.height)
    for t in tasks:
        t.cancel()
    await server.stop(0.5)
    ctl.chain.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m devnet.controller DEVNET_DIR NODE_INDEX", file=sys.stderr)
        return 2
    spec = Spec.load(argv[0])
    index = int(argv[1])
    logging.basicConfig(level=logging.DEBUG if spec.log_level == "debug" else logging.INFO,
                        format=f"%(asctime)s %(levelname)s controller{index} %(message)s", stream=sys.stdout)
    asyncio.run(serve(spec, index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
