"""The raft log: the stable part (in Storage) plus the unstable tail not yet persisted.

Owns the indexes `committed`, `persisted`, `applying` and `applied`, with the invariants
    applied <= applying <= min(committed, persisted)   (entries are handed out only once persisted)
    committed <= last_index()
and the rule that nothing at or below `committed` is ever truncated (Raft paper §5.3/§5.4:
committed entries are durable and never change). It never does I/O; Storage is only read.
"""

from __future__ import annotations

import logging

from cita_raft_pb import eraftpb_pb2 as pb

from .errors import Compacted, RaftError, RaftInvariantError, Unavailable
from .storage import Storage, limit_size


class Unstable:
    """Entries (and maybe a snapshot) received but not yet persisted by the host.

    `entries[i].index == offset + i`; a pending snapshot has index `offset - 1`.
    """

    __slots__ = ("snapshot", "entries", "offset")

    def __init__(self, offset: int) -> None:
        self.snapshot: pb.Snapshot | None = None
        self.entries: list[pb.Entry] = []
        self.offset = offset

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.metadata.index == index:
                return self.snapshot.metadata.term
            return None
        i = index - self.offset
        if i < len(self.entries):
            return self.entries[i].term
        return None

    def stable_to(self, index: int, term: int) -> bool:
        """The host persisted entries up to (index, term): drop them from the tail."""
        t = self.maybe_term(index)
        if t is None or t != term or index < self.offset:
            return False
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1
        return True

    def stable_snap(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.metadata.index == index:
            self.snapshot = None

    def restore(self, snap: pb.Snapshot) -> None:
        self.entries = []
        self.offset = snap.metadata.index + 1
        self.snapshot = snap

    def truncate_and_append(self, ents: list[pb.Entry]) -> None:
        after = ents[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(ents)
        elif after <= self.offset:
            # The new entries replace the whole unstable tail (and maybe stable ones).
            self.offset = after
            self.entries = list(ents)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(ents)


class RaftLog:
    """Stable + unstable log with commit/persist/apply bookkeeping."""

    def __init__(self, storage: Storage, logger: logging.Logger | None = None) -> None:
        self.storage = storage
        self.logger = logger or logging.getLogger("raft")
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        # Invariant: applied <= applying <= committed; everything up to first-1 is in the snapshot.
        self.committed = first - 1
        self.persisted = last
        self.applying = first - 1
        self.applied = first - 1

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed} persisted={self.persisted} applying={self.applying} "
            f"applied={self.applied} unstable.offset={self.unstable.offset} unstable.len={len(self.unstable.entries)})"
        )

    # ---- indexes and terms --------------------------------------------------------

    def first_index(self) -> int:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot.metadata.index + 1
        return self.storage.first_index()

    def last_index(self) -> int:
        # Invariant: unstable.offset is one past the last persisted entry (or the pending
        # snapshot), so the last index never needs the storage.
        u = self.unstable
        return u.offset + len(u.entries) - 1

    def term(self, index: int) -> int:
        """Term of the entry at `index`; 0 when it is unknown (compacted below the snapshot, or beyond the log)."""
        u = self.unstable
        off = u.offset
        if index >= off:
            i = index - off
            return u.entries[i].term if i < len(u.entries) else 0
        snap = u.snapshot
        if snap is not None:
            return snap.metadata.term if index == snap.metadata.index else 0
        try:
            return self.storage.term(index)
        except (Compacted, Unavailable):
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        """Whether our entry at `index` has `term`; False where we do not know the term
        (beyond the last index, or compacted below the snapshot), even for term 0: term()
        answers 0 there, which must not let an append "match" a hole (raft-rs: an error)."""
        if index > self.last_index() or index < self.first_index() - 1:
            return False
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Raft paper §5.4.1: a candidate's log is at least as up to date as ours."""
        our_term = self.last_term()
        return term > our_term or (term == our_term and last_index >= self.last_index())

    def commit_info(self) -> tuple[int, int]:
        """(committed, term of committed) as raft-rs puts on vote messages."""
        return self.committed, self.term(self.committed)

    # ---- appending ----------------------------------------------------------------

    def find_conflict(self, ents: list[pb.Entry]) -> int:
        """Index of the first entry whose term differs from ours (or that we lack); 0 if none."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int | None]:
        """Largest index <= `index` whose term is <= `term` (raft-rs fast back-off, thesis §3.5 opt.)."""
        if index > self.last_index():
            return index, None
        first = self.first_index()
        while True:
            if index < first - 1:
                return index, None  # compacted: the term is unknown
            t = self.term(index)
            if t > term:
                index -= 1
            else:
                return index, t

    def maybe_append(self, index: int, log_term: int, committed: int, ents: list[pb.Entry]) -> tuple[int, int] | None:
        """AppendEntries receiver rules 2-5 (paper Fig. 2): (conflict index, last new index) or None."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(ents)
        conflict = 0
        if ents:
            # Fast path: the first new entry is beyond our log, so it is the conflict.
            u = self.unstable
            if ents[0].index > u.offset + len(u.entries) - 1:
                conflict = ents[0].index
            else:
                conflict = self.find_conflict(ents)
        if conflict:
            if conflict <= self.committed:
                raise RaftInvariantError(f"entry {conflict} conflicts with committed entry (committed {self.committed})")
            start = conflict - (index + 1)
            self.append(ents[start:] if start else ents)
        self.commit_to(min(committed, last_new))
        return conflict, last_new

    def append(self, ents: list[pb.Entry]) -> int:
        if not ents:
            return self.last_index()
        after = ents[0].index - 1
        if after < self.committed:
            raise RaftInvariantError(f"truncating at {after + 1}, at or below the commit index {self.committed}")
        self.unstable.truncate_and_append(ents)
        # Entries at or above the first new one were replaced, so they are no longer persisted.
        if self.persisted > after:
            self.persisted = after
        return self.last_index()

    # ---- reading ------------------------------------------------------------------

    def entries(self, lo: int, max_size: int | None = None) -> list[pb.Entry]:
        last = self.last_index()
        if lo > last:
            return []
        return self.slice(lo, last + 1, max_size)

    def slice(self, lo: int, hi: int, max_size: int | None = None) -> list[pb.Entry]:
        """Entries [lo, hi) from storage and the unstable tail; Compacted below first_index()."""
        if lo >= hi:
            return []
        if max_size == 0:
            hi = lo + 1  # raft-rs: a zero limit still returns exactly one entry
        u = self.unstable
        off = u.offset
        if hi > off + len(u.entries):
            raise RaftError(f"slice({lo}, {hi}) out of bound, last index {self.last_index()}")
        if lo >= off:
            # Entirely in the unstable tail (which never starts below first_index()).
            return limit_size(u.entries[lo - off : hi - off], max_size)
        first = self.first_index()
        if lo < first:
            raise Compacted(f"slice({lo}, {hi}): compacted, first index {first}")
        stored = self.storage.entries(lo, min(hi, off), max_size)
        if hi <= off or len(stored) < min(hi, off) - lo:
            return stored
        combined = stored + u.entries[: hi - off]
        return limit_size(combined, max_size)

    def next_entries(self, max_size: int | None = None) -> list[pb.Entry]:
        """Committed entries not yet handed out, only those persisted locally."""
        lo = max(self.applying + 1, self.first_index())
        hi = min(self.committed, self.persisted) + 1
        if hi <= lo:
            return []
        return self.slice(lo, hi, max_size)

    def has_next_entries(self) -> bool:
        hi = min(self.committed, self.persisted)
        if hi <= self.applying:
            return False
        return hi + 1 > self.first_index()

    def snapshot(self, request_index: int, to: int) -> pb.Snapshot:
        if self.unstable.snapshot is not None and self.unstable.snapshot.metadata.index >= request_index:
            return self.unstable.snapshot
        return self.storage.snapshot(request_index, to)

    # ---- commit / persist / apply ---------------------------------------------------

    def commit_to(self, index: int) -> None:
        if index <= self.committed:
            return  # never decrease commit
        u = self.unstable
        last = u.offset + len(u.entries) - 1
        if index > last:
            raise RaftInvariantError(f"commit index {index} out of range [last index {last}], the log is lost or corrupt")
        self.committed = index

    def maybe_commit(self, max_index: int, term: int) -> bool:
        """Commit `max_index` if its entry is from `term` (paper §5.4.2: count only current-term entries)."""
        if max_index > self.committed and self.match_term(max_index, term):
            self.commit_to(max_index)
            return True
        return False

    def stable_entries(self, index: int, term: int) -> bool:
        """The host persisted entries up to (index, term)."""
        if self.unstable.stable_to(index, term):
            if index > self.persisted:
                self.persisted = index
            return True
        return False

    def stable_snap(self, index: int) -> None:
        self.unstable.stable_snap(index)
        if index > self.persisted:
            self.persisted = index

    def handed_out(self, index: int) -> None:
        """Committed entries up to `index` were given to the applier."""
        if index > self.applying:
            self.applying = index

    def applied_to(self, index: int) -> None:
        if index == 0 or index <= self.applied:
            return
        if index > self.committed:
            raise RaftInvariantError(f"applied({index}) is out of range [committed {self.committed}]")
        self.applied = index
        if self.applying < index:
            self.applying = index

    def restore(self, snap: pb.Snapshot) -> None:
        """Replace the log by a snapshot received from the leader (not yet persisted)."""
        index = snap.metadata.index
        if index < self.committed:
            raise RaftInvariantError(f"restoring a snapshot at {index} would move the commit index back from {self.committed}")
        self.logger.info("log starts to restore snapshot index=%d term=%d", index, snap.metadata.term)
        self.unstable.restore(snap)
        self.committed = index
        self.applying = max(self.applying, index)
        # Everything above the snapshot was dropped; the snapshot itself is persisted at advance().
        self.persisted = min(self.persisted, index)
