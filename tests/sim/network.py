"""The simulation's in-memory network: latency, loss, duplication, reordering,
stale redelivery and directed link cuts, all drawn from one seeded RNG.

Messages travel as eraftpb bytes (as on the real wire), so a node can never
share a mutable object with another. Time is the simulation's step counter.
The network knows nothing about Raft beyond a message's from/to/type.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field


@dataclass(order=True)
class Packet:
    deliver_at: int
    seq: int
    frm: int = field(compare=False)
    to: int = field(compare=False)
    msg_type: int = field(compare=False)
    data: bytes = field(compare=False)


class SimNetwork:
    """Directed links between node ids. `blocked` holds (from, to) pairs that are cut."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = 0
        self._queue: list[Packet] = []
        self._seq = 0
        self.blocked: set[tuple[int, int]] = set()
        self.drop_rate = 0.0
        self.dup_rate = 0.0
        self.min_latency = 1
        self.max_latency = 3
        self.slow: dict[int, int] = {}  # node id -> extra latency on every link touching it
        self.history: deque[Packet] = deque(maxlen=300)
        self.sent = 0
        self.delivered = 0
        self.dropped = 0

    def clear_faults(self) -> None:
        self.blocked.clear()
        self.drop_rate = 0.0
        self.dup_rate = 0.0
        self.min_latency, self.max_latency = 1, 3
        self.slow.clear()

    def latency(self, frm: int, to: int) -> int:
        base = self.rng.randint(self.min_latency, self.max_latency)
        return base + self.slow.get(frm, 0) + self.slow.get(to, 0)

    def send(self, frm: int, to: int, msg_type: int, data: bytes) -> None:
        """Queue a message; loss and duplication are decided now, cuts at delivery."""
        self.sent += 1
        if self.drop_rate and self.rng.random() < self.drop_rate:
            self.dropped += 1
            return
        copies = 2 if self.dup_rate and self.rng.random() < self.dup_rate else 1
        for _ in range(copies):
            self._seq += 1
            heapq.heappush(self._queue, Packet(self.now + self.latency(frm, to), self._seq, frm, to, msg_type, data))

    def requeue(self, pkt: Packet) -> None:
        """Hold a packet for a paused node until it resumes (its socket buffer)."""
        self._seq += 1
        pkt.seq = self._seq
        heapq.heappush(self._queue, pkt)

    def due(self) -> list[Packet]:
        """Packets whose time has come, shuffled so equal-time packets interleave freely."""
        out: list[Packet] = []
        while self._queue and self._queue[0].deliver_at <= self.now:
            out.append(heapq.heappop(self._queue))
        if len(out) > 1:
            self.rng.shuffle(out)
        return out

    def is_cut(self, frm: int, to: int) -> bool:
        return (frm, to) in self.blocked

    def delivered_ok(self, pkt: Packet) -> None:
        self.delivered += 1
        self.history.append(pkt)

    def stale_packet(self) -> Packet | None:
        """An old, already delivered message to deliver again (a delayed duplicate)."""
        if not self.history:
            return None
        return self.history[self.rng.randrange(len(self.history))]

    def in_flight(self) -> int:
        return len(self._queue)
