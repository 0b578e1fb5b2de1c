"""Benchmark of the sans-I/O raft core: 3- and 5-node in-memory clusters driven through the
public API (RawNode + MemoryStorage), printing committed entries/s with one proposal in
flight, with batches of 64 proposals per Ready, and the mean cost of one step() call.

    .venv/bin/python scripts/bench_raft.py [--seconds 2] [--wire]

--wire serializes every message to bytes and parses it back, as a real transport does.
Rates are per second of this process's CPU time (time.process_time), so other jobs on the
machine disturb them less than wall-clock rates; the script is single-threaded, so on an
idle machine both agree.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

# The repo root: `raft`, and the Ready driver the test hosts share (tests/ready_driver.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cita_raft_pb import eraftpb_pb2 as pb  # noqa: E402
from raft import Config, MemoryStorage, RawNode, StateRole  # noqa: E402
from tests.ready_driver import StorageHost, handle_ready  # noqa: E402


class _Host(StorageHost):
    """One node's part of the Ready loop (tests/ready_driver.py): MemoryStorage, messages
    to the cluster's inbox, nothing to apply but the applied index."""

    def __init__(self, cluster: Cluster, nid: int) -> None:
        super().__init__(cluster.stores[nid])
        self.cluster = cluster
        self.nid = nid

    def send(self, msgs: list[pb.Message]) -> None:
        self.cluster.deliver(msgs)

    def apply(self, entries: list[pb.Entry]) -> int:
        last = entries[-1].index
        self.cluster.applied[self.nid] = last
        return last


class Cluster:
    def __init__(self, n: int, wire: bool, max_size_per_msg: int) -> None:
        ids = list(range(1, n + 1))
        log = logging.getLogger("bench")
        log.setLevel(logging.WARNING)
        self.wire = wire
        self.stores = {i: MemoryStorage.new_with_conf_state(ids) for i in ids}
        self.nodes = {
            i: RawNode(
                Config(id=i, election_tick=10, heartbeat_tick=1, max_size_per_msg=max_size_per_msg),
                self.stores[i],
                rng=random.Random(i),
                logger=log,
            )
            for i in ids
        }
        self.hosts = {i: _Host(self, i) for i in ids}
        self.inbox: list[pb.Message] = []
        self.steps = 0
        self.step_time = 0.0
        self.applied = {i: 0 for i in ids}
        self.dirty: set[int] = set(ids)
        # Timing every batch of step() calls costs syscalls: only in the step-cost pass.
        self.time_steps = False
        self.nodes[1].campaign()
        self.run()
        assert self.nodes[1].raft.state == StateRole.Leader

    def deliver(self, msgs):
        if self.wire:
            self.inbox.extend(pb.Message.FromString(m.SerializeToString()) for m in msgs)
        else:
            self.inbox.extend(msgs)

    def handle(self, nid: int, node: RawNode) -> bool:
        return handle_ready(node, self.hosts[nid])

    def run(self) -> None:
        """Host loop: handle the Readies of nodes that got input, deliver, repeat until quiet."""
        nodes = self.nodes
        dirty = self.dirty
        while dirty or self.inbox:
            for nid in sorted(dirty):
                node = nodes[nid]
                while self.handle(nid, node):
                    pass
            dirty.clear()
            if self.inbox:
                batch, self.inbox = self.inbox, []
                if self.time_steps:
                    t0 = time.process_time()
                    for m in batch:
                        nodes[m.to].step(m)
                    self.step_time += time.process_time() - t0
                    self.steps += len(batch)
                for m in batch:
                    if not self.time_steps:
                        nodes[m.to].step(m)
                    dirty.add(m.to)


def bench_sequential(n: int, seconds: float, wire: bool) -> tuple[float, float]:
    """(commits/s with one proposal in flight, mean step() cost in us)."""
    rate = _sequential(n, seconds, wire, time_steps=False)[0]
    per_step = _sequential(n, min(seconds, 0.5), wire, time_steps=True)[1]
    return rate, per_step


def _sequential(n: int, seconds: float, wire: bool, time_steps: bool) -> tuple[float, float]:
    c = Cluster(n, wire, max_size_per_msg=0)
    c.time_steps = time_steps
    leader = c.nodes[1]
    payload = b"p" * 64
    count = 0
    t0 = time.process_time()
    end = t0 + seconds
    while time.process_time() < end:
        for _ in range(100):
            target = leader.raft.log.last_index() + 1
            leader.propose(payload)
            c.dirty.add(1)
            c.run()
            assert c.applied[1] >= target
            count += 1
    dt = time.process_time() - t0
    return count / dt, c.step_time / max(c.steps, 1) * 1e6


def bench_batched(n: int, seconds: float, wire: bool, batch: int = 64) -> tuple[float, float]:
    """(entries/s with `batch` proposals per Ready, mean step() cost in us)."""
    rate = _batched(n, seconds, wire, batch, time_steps=False)[0]
    per_step = _batched(n, min(seconds, 0.5), wire, batch, time_steps=True)[1]
    return rate, per_step


def _batched(n: int, seconds: float, wire: bool, batch: int, time_steps: bool) -> tuple[float, float]:
    c = Cluster(n, wire, max_size_per_msg=1 << 20)
    c.time_steps = time_steps
    leader = c.nodes[1]
    payload = b"p" * 64
    count = 0
    t0 = time.process_time()
    end = t0 + seconds
    while time.process_time() < end:
        for _ in range(10):
            target = leader.raft.log.last_index() + batch
            for _ in range(batch):
                leader.propose(payload)
            c.dirty.add(1)
            c.run()
            assert c.applied[1] >= target and min(c.applied.values()) >= target
            count += batch
    dt = time.process_time() - t0
    return count / dt, c.step_time / max(c.steps, 1) * 1e6


def calibration() -> float:
    """Millions of trivial interpreter loop iterations per CPU second: a yardstick for how fast
    this machine runs Python right now (it drops when other jobs share the cores)."""
    n = 2_000_000
    t0 = time.process_time()
    total = 0
    for i in range(n):
        total += i
    return n / (time.process_time() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--wire", action="store_true", help="serialize/parse every message")
    args = ap.parse_args()
    print(f"raft core benchmark ({'wire' if args.wire else 'in-memory objects'}, {args.seconds}s per figure)")
    print(f"  yardstick: {calibration():.1f} M loop iterations per CPU second")
    for n in (3, 5):
        rate, per_step = bench_sequential(n, args.seconds, args.wire)
        print(f"  {n} nodes  sequential (1 in flight): {rate:9.0f} commits/s   step() {per_step:5.1f} us")
        rate, per_step = bench_batched(n, args.seconds, args.wire)
        print(f"  {n} nodes  batched (64 per Ready):   {rate:9.0f} entries/s   step() {per_step:5.1f} us")


if __name__ == "__main__":
    main()
