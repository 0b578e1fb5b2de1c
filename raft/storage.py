"""The Storage protocol the Raft core reads from, and MemoryStorage, its in-memory version.

Read side (used by the core) and write side (used by the host after each Ready) follow
etcd/raft-rs semantics; docs/internals.md fixes them. DiskStorage (raft/disk.py) has the
same methods. The log is kept as a list whose slot 0 is a dummy entry carrying the
snapshot's index and term, so `term(snapshot_index)` works after compaction.
MemoryStorage never does I/O: `sync()` is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cita_raft_pb import eraftpb_pb2 as pb

from .errors import Compacted, SnapshotTemporarilyUnavailable, StorageError, Unavailable


@dataclass
class RaftState:
    """What a node starts from: the durable hard state and the conf state at the applied index."""

    hard_state: pb.HardState = field(default_factory=pb.HardState)
    conf_state: pb.ConfState = field(default_factory=pb.ConfState)


class Storage(Protocol):
    """What the core reads. All indexes are raft log indexes (>= 1)."""

    def initial_state(self) -> RaftState: ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def term(self, index: int) -> int: ...

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[pb.Entry]: ...

    def snapshot(self, request_index: int, to: int) -> pb.Snapshot: ...


def limit_size(entries: list[pb.Entry], max_size: int | None) -> list[pb.Entry]:
    """The longest prefix of `entries` whose summed ByteSize() fits `max_size` (at least one entry).

    `None` means no limit; 0 means one entry (raft-rs's `max_size_per_msg = 0`).
    """
    if max_size is None or len(entries) <= 1:
        return entries
    size = entries[0].ByteSize()
    for i in range(1, len(entries)):
        size += entries[i].ByteSize()
        if size > max_size:
            return entries[:i]
    return entries


class MemoryStorage:
    """Storage kept in memory (tests, simulation, benchmarks).

    Invariant: `self._ents[0]` is a dummy whose index/term are the snapshot's;
    `self._ents[i].index == self._ents[0].index + i`.
    """

    def __init__(self) -> None:
        self.hard_state = pb.HardState()
        self.conf_state = pb.ConfState()
        self._snapshot = pb.Snapshot()
        self._ents: list[pb.Entry] = [pb.Entry()]
        self._offset = 0  # == self._ents[0].index, kept as an int for the hot paths

    @classmethod
    def new_with_conf_state(cls, voters: list[int], learners: list[int] | None = None) -> MemoryStorage:
        """A storage whose initial conf state has these voters (and learners), log empty at index 0."""
        s = cls()
        s.conf_state = pb.ConfState(voters=voters, learners=learners or [])
        s._snapshot.metadata.conf_state.CopyFrom(s.conf_state)
        return s

    # ---- read side ----------------------------------------------------------------

    def initial_state(self) -> RaftState:
        hs = pb.HardState()
        hs.CopyFrom(self.hard_state)
        cs = pb.ConfState()
        cs.CopyFrom(self.conf_state)
        return RaftState(hs, cs)

    def first_index(self) -> int:
        return self._offset + 1

    def last_index(self) -> int:
        return self._offset + len(self._ents) - 1

    def term(self, index: int) -> int:
        offset = self._offset
        if index < offset:
            raise Compacted(f"term({index}): compacted, first index {offset + 1}")
        i = index - offset
        if i >= len(self._ents):
            raise Unavailable(f"term({index}): unavailable, last index {self.last_index()}")
        return self._ents[i].term

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[pb.Entry]:
        offset = self._offset
        if lo <= offset:
            raise Compacted(f"entries({lo}, {hi}): compacted, first index {offset + 1}")
        if hi > self.last_index() + 1:
            raise Unavailable(f"entries({lo}, {hi}): unavailable, last index {self.last_index()}")
        return limit_size(self._ents[lo - offset : hi - offset], max_size)

    def snapshot(self, request_index: int = 0, to: int = 0) -> pb.Snapshot:
        if self._snapshot.metadata.index < request_index:
            raise SnapshotTemporarilyUnavailable(
                f"snapshot index {self._snapshot.metadata.index} older than requested {request_index}"
            )
        snap = pb.Snapshot()
        snap.CopyFrom(self._snapshot)
        return snap

    # ---- write side ---------------------------------------------------------------

    def set_hardstate(self, hs: pb.HardState) -> None:
        self.hard_state = pb.HardState()
        self.hard_state.CopyFrom(hs)

    def set_conf_state(self, cs: pb.ConfState) -> None:
        self.conf_state = pb.ConfState()
        self.conf_state.CopyFrom(cs)

    def append(self, entries: list[pb.Entry]) -> None:
        """Continue or overwrite the log; a lower first index than the last truncates the tail first."""
        if not entries:
            return
        first = self.first_index()
        last = entries[-1].index
        if last < first:
            return  # everything is already compacted away
        start = entries[0].index
        if start < first:
            entries = entries[first - start :]
            start = first
        offset = self._offset
        if start > self.last_index() + 1:
            raise StorageError(f"append at {start} leaves a gap after last index {self.last_index()}")
        del self._ents[start - offset :]
        self._ents.extend(entries)

    def apply_snapshot(self, snap: pb.Snapshot) -> None:
        """Replace the whole log by the snapshot (install from a leader, or bootstrap)."""
        meta = snap.metadata
        if meta.index < self._snapshot.metadata.index:
            raise StorageError(f"snapshot index {meta.index} older than current {self._snapshot.metadata.index}")
        self._snapshot = pb.Snapshot()
        self._snapshot.CopyFrom(snap)
        self._ents = [pb.Entry(term=meta.term, index=meta.index)]
        self._offset = meta.index
        self.conf_state = pb.ConfState()
        self.conf_state.CopyFrom(meta.conf_state)
        if self.hard_state.commit < meta.index:
            self.hard_state.commit = meta.index
        if self.hard_state.term < meta.term:
            self.hard_state.term = meta.term

    def create_snapshot(self, index: int, conf_state: pb.ConfState | None, data: bytes) -> pb.Snapshot:
        """Record a snapshot at `index` (already applied by the host) with this conf state and data."""
        snap = new_snapshot(self, self._snapshot, index, conf_state, data)
        self._snapshot = snap
        return snap

    def compact(self, index: int) -> None:
        """Drop entries below `index`; the entry at `index - 1` becomes the dummy."""
        offset = self._offset
        if index <= offset + 1:
            return
        if index > self.last_index() + 1:
            raise Unavailable(f"compact({index}) above last index {self.last_index()}")
        i = index - 1 - offset
        dummy = pb.Entry(index=self._ents[i].index, term=self._ents[i].term)
        self._ents = [dummy] + self._ents[i + 1 :]
        self._offset = dummy.index

    def sync(self) -> None:
        """Nothing to make durable in memory."""


def new_snapshot(storage, current: pb.Snapshot, index: int, conf_state: pb.ConfState | None,
                 data: bytes) -> pb.Snapshot:
    """The snapshot `create_snapshot(index, ...)` makes on any storage: newer than
    `current`, within the log, with the term of `index`."""
    if index <= current.metadata.index:
        raise SnapshotTemporarilyUnavailable(f"snapshot at {index} is not newer than {current.metadata.index}")
    if index > storage.last_index():
        raise Unavailable(f"create_snapshot({index}) above last index {storage.last_index()}")
    snap = pb.Snapshot(data=data)
    snap.metadata.index = index
    snap.metadata.term = storage.term(index)
    if conf_state is not None:
        snap.metadata.conf_state.CopyFrom(conf_state)
    return snap
