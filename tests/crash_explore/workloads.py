"""Storage workloads for the crash-state explorer, and what they acknowledged.

A `Driver` calls DiskStorage the way the service does and keeps a timeline,
in recorded-operation positions, of what was written (every entry, hard
state, snapshot, applied record and abort height ever handed to storage) and
of acknowledgements (after each `sync()` / `set_abort_height()` return, the
logical state that must survive any crash from then on).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

from cita_raft_pb import eraftpb_pb2 as pb
from raft.disk import DiskStorage
from raft.wal import WalWriter

from .fsmodel import Recorder

LOG = logging.getLogger("crash-explore")
LOG.disabled = True  # recovery warnings are expected by the thousand

SEGMENT_BYTES = 1500
DATA = "data"  # the data dir, relative to the recorded root


@dataclass
class Logical:
    """The storage's meaning: what recovery must reproduce."""

    entries: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # index -> (term, data)
    last: int = 0
    snap: tuple[int, int, bytes] = (0, 0, b"")
    hs: tuple[int, int, int] = (0, 0, 0)
    applied: tuple[int, bytes] = (0, b"")
    abort: int = 0

    def copy(self) -> Logical:
        return copy.deepcopy(self)

    @classmethod
    def of(cls, s: DiskStorage) -> Logical:
        out = cls()
        first, last = s.first_index(), s.last_index()
        out.entries = {e.index: (e.term, e.data) for e in s.entries(first, last + 1)} if last >= first else {}
        out.last = last
        sn = s.snapshot(0, 0)
        out.snap = (sn.metadata.index, sn.metadata.term, sn.data)
        hs = s.initial_state().hard_state
        out.hs = (hs.term, hs.vote, hs.commit)
        out.applied = (s.applied_index(), s.applied_data())
        out.abort = s.abort_height()
        return out


@dataclass
class Timeline:
    """Events in recorded-operation positions: ("ack", Logical) or ("w", kind, value)."""

    events: list[tuple[int, tuple]] = field(default_factory=list)

    def add(self, pos: int, ev: tuple) -> None:
        self.events.append((pos, ev))


class Driver:
    """Calls DiskStorage, mirrors it in a Logical, logs written values and acks."""

    def __init__(self, rec: Recorder, root: str, acked: Logical, timeline: Timeline | None = None) -> None:
        self.rec = rec
        self.path = os.path.join(root, DATA)
        self.L = acked.copy()
        self.s: DiskStorage | None = None
        if timeline is None:  # a fresh recording: `acked` holds from its first operation on
            self.t = Timeline()
            self.written(acked)
            self.ack()
        else:  # the caller's timeline already says what was written and acknowledged
            self.t = timeline

    def ev(self, *ev) -> None:  # type: ignore[no-untyped-def]
        self.t.add(self.rec.mark(), ev)

    def written(self, lg: Logical) -> None:
        for i, (term, data) in lg.entries.items():
            self.ev("w", "entry", (i, term, data))
        self.ev("w", "hs", lg.hs)
        self.ev("w", "snap", lg.snap)
        self.ev("w", "applied", lg.applied)
        self.ev("w", "abort", lg.abort)

    def ack(self) -> None:
        self.ev("ack", self.L.copy())

    # ---- the storage API, mirrored ------------------------------------------------------

    def open(self) -> DiskStorage:
        self.s = DiskStorage.open(self.path, logger=LOG, segment_bytes=SEGMENT_BYTES)
        return self.s

    def close(self) -> None:
        self.s.close()
        self.ack()
        self.s = None

    def append(self, first: int, term: int, sizes: list[int]) -> None:
        ents = [
            pb.Entry(index=first + k, term=term, data=payload(first + k, term, n))
            for k, n in enumerate(sizes)
        ]
        if first <= self.L.last:
            self.ev("w", "trunc", first)
            for i in range(first, self.L.last + 1):
                self.L.entries.pop(i, None)
        for e in ents:
            self.ev("w", "entry", (e.index, e.term, e.data))
            self.L.entries[e.index] = (e.term, e.data)
        self.L.last = ents[-1].index
        self.s.append(ents)

    def set_hardstate(self, term: int, vote: int, commit: int) -> None:
        self.ev("w", "hs", (term, vote, commit))
        self.L.hs = (term, vote, commit)
        self.s.set_hardstate(pb.HardState(term=term, vote=vote, commit=commit))

    def sync(self) -> None:
        self.s.sync()
        self.ack()

    def ready(self, sizes: list[int], term: int | None = None, first: int | None = None) -> None:
        """One Ready as the peer loop writes it: entries, hard state, sync."""
        term = term or max(self.L.hs[0], 1)
        first = self.L.last + 1 if first is None else first
        self.append(first, term, sizes)
        commit = max(self.L.hs[2], first - 1)
        t, v, _c = self.L.hs
        new_term = max(term, t)
        self.set_hardstate(new_term, v if new_term == t and v else 1, commit)
        self.sync()

    def set_applied(self, index: int, data: bytes | None) -> None:
        if index >= self.L.applied[0]:
            self.L.applied = (index, self.L.applied[1] if data is None else data)
            self.ev("w", "applied", self.L.applied)
        self.s.set_applied(index, pb.ConfState(voters=[1, 2, 3]), data)

    def create_snapshot(self, index: int, data: bytes) -> None:
        term = self.L.entries[index][0] if index in self.L.entries else self.L.snap[1]
        self.ev("w", "snap", (index, term, data))
        self.s.create_snapshot(index, pb.ConfState(voters=[1, 2, 3]), data)
        self.L.snap = (index, term, data)
        self.ack()  # create_snapshot syncs the WAL and writes its file durably

    def apply_snapshot(self, index: int, term: int, data: bytes) -> None:
        snap = pb.Snapshot(data=data)
        snap.metadata.index, snap.metadata.term = index, term
        snap.metadata.conf_state.voters.extend([1, 2, 3])
        self.ev("w", "snap", (index, term, data))
        self.ev("w", "applied", (index, data))
        self.ev("w", "install", index)
        self.s.apply_snapshot(snap)
        self.L.entries, self.L.last, self.L.snap = {}, index, (index, term, data)
        t, v, c = self.L.hs
        self.L.hs = (max(t, term), v, max(c, index))
        self.ev("w", "hs", self.L.hs)
        self.L.applied = (index, data)

    def compact(self, index: int) -> None:
        self.s.compact(index)

    def set_abort_height(self, h: int) -> None:
        self.ev("w", "abort", h)
        self.L.abort = h
        self.s.set_abort_height(h)
        self.ack()


def payload(index: int, term: int, n: int) -> bytes:
    """Entry data, a function of (index, term, size) so mixed-up entries show."""
    head = b"%d/%d/" % (index, term)
    body = bytes((index * 31 + term * 7 + k) % 251 + 1 for k in range(max(0, n - len(head))))
    return (head + body)[:n] if n else b""


# Sizes around the record header (13 bytes), the 512-byte sector and the 4 KiB page,
# and a record larger than a whole segment.
ENTRY_SIZES = [0, 1, 2, 13, 100, 486, 499, 500, 511, 512, 513, 1000, 1487, 4083, 4096, 4097, 9000]


def appends(d: Driver) -> None:
    """Appends of every size, batches, a conflicting overwrite, rotations, reopen."""
    d.open()
    d.ack()
    for n in ENTRY_SIZES:
        d.ready([n])
    d.ready([7] * 5)
    d.ready([300] * 16)
    # a new leader overwrites the uncommitted tail (TRUNCATE record)
    t = d.L.hs[0] + 1
    d.append(d.L.last - 2, t, [40, 40, 40, 40])
    d.set_hardstate(t, 2, d.L.hs[2])
    d.sync()
    # a Ready that only changes the commit index is written but not synced (the service's shortcut)
    d.set_hardstate(t, 2, d.L.last - 1)
    d.ready([20], term=t)
    d.close()
    d.open()
    d.ack()
    d.ready([64, 64])
    d.close()


def snapshots(d: Driver) -> None:
    """set_applied, local snapshots with compaction and segment deletion, a
    leader's snapshot install, abort heights, reopen."""
    d.open()
    d.ack()
    WalWriter.FLUSH_BYTES = 2048  # a big batch is handed to the kernel before its sync
    try:
        d.ready([200] * 3)
        d.ready([700] * 6)
    finally:
        WalWriter.FLUSH_BYTES = 4 * 1024 * 1024
    d.set_applied(5, b"cfg-5")
    d.sync()
    d.create_snapshot(5, b"snap-5")
    d.compact(5)
    for _ in range(4):
        d.ready([500, 300])
    d.set_applied(12, b"cfg-12")
    d.ready([100])
    d.create_snapshot(12, b"snap-12")  # two snapshots now: segments below 5 go
    d.compact(12)
    d.set_abort_height(7)
    for _ in range(3):
        d.ready([600])
    d.set_applied(16, None)
    d.sync()
    d.create_snapshot(16, b"snap-16")  # segments below 12 go
    d.apply_snapshot(d.L.last + 5, d.L.hs[0] + 1, b"leader-snap")
    d.set_hardstate(d.L.hs[0], 3, d.L.hs[2])
    d.sync()
    d.ready([50, 50])
    d.set_abort_height(2**64 - 1)
    d.close()
    d.open()
    d.ack()
    d.ready([10])
    d.close()


def bootstrap(d: Driver) -> None:
    """A first start as the service does it: the bootstrap snapshot 5/5, then blocks."""
    d.open()
    d.ack()
    d.apply_snapshot(5, 5, b"")
    d.set_hardstate(5, 0, 5)
    d.sync()
    d.set_abort_height(3)
    d.ready([150, 150], term=6)
    d.set_applied(6, b"cc")
    d.ready([150], term=6)
    d.close()


def rust_files() -> dict[str, bytes]:
    """A Rust consensus_raft data dir: snapshot at 120/7 (length-delimited), entry 121, abort height."""
    from google.protobuf.internal.encoder import _VarintBytes  # noqa: PLC0415

    snap = pb.Snapshot(data=b"rust-config")
    snap.metadata.index, snap.metadata.term = 120, 7
    snap.metadata.conf_state.voters.extend([11, 22, 33])
    entry = pb.Entry(index=121, term=7, data=b"rust-entry")

    def ld(msg) -> bytes:  # type: ignore[no-untyped-def]
        raw = msg.SerializeToString()
        return _VarintBytes(len(raw)) + raw

    return {"raft-snapshot": ld(snap), "raft-entry": ld(entry), "abort_height": b"118\n"}


def import_rust(d: Driver) -> None:
    """First start on a Rust data dir: the import, then the node goes on."""
    d.open()
    d.ack()
    d.ready([80, 80], term=8)
    d.close()


def sizes(top: int):  # type: ignore[no-untyped-def]
    """A workload appending one entry of every payload size from 0 to `top`
    bytes, one Ready each: records start and end at every offset within a
    sector, and headers straddle every sector boundary."""

    def run(d: Driver) -> None:
        every_size(d, top)

    return run


def every_size(d: Driver, top: int) -> None:
    d.open()
    d.ack()
    for n in range(0, top + 1):
        d.ready([n])
        if n % 40 == 39:  # snapshots let old segments go, so states stay small
            d.set_applied(d.L.hs[2], b"cfg-%d" % n)
            d.sync()
            d.create_snapshot(d.L.hs[2], b"snap-%d" % n)
            d.compact(d.L.hs[2])
    d.close()


WORKLOADS = {
    "appends": appends,
    "snapshots": snapshots,
    "bootstrap": bootstrap,
    "import": import_rust,
    "sizes-0-160": sizes(160),
}
# Only in the full exploration (make crash-explore): long, and mostly more of the same.
FULL_WORKLOADS = {**WORKLOADS, "sizes-0-1100": sizes(1100)}
# The second level (crash during recovery) runs on every n-th new first-level state of
# these long workloads (their states repeat the same few shapes).
LEVEL2_EVERY = {"sizes-0-160": 30, "sizes-0-1100": 10}


def continuation(d: Driver) -> None:
    """After a crash: recover, then go on far enough to rotate, and close."""
    d.open()
    d.L = Logical.of(d.s)
    d.written(d.L)
    d.ack()
    t = max(d.L.hs[0], d.L.entries[d.L.last][0] if d.L.last in d.L.entries else d.L.snap[1], 1)
    d.append(d.L.last + 1, t + 1, [400, 400])
    d.set_hardstate(t + 1, 2, d.L.hs[2])
    d.sync()
    d.ready([900], term=t + 1)
    d.ready([900], term=t + 1)
    d.close()
