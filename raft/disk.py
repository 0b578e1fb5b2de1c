"""DiskStorage: the durable Raft storage of the service (WAL + snapshot files).

Owns the `raft-store/` directory under `raft_data_path`:

    raft-store/wal/<seq>.wal, LAST  segmented WAL (raft/wal.py)
    raft-store/snap/<i>-<t>.snap    the newest two snapshots (raft/snapshot.py)
    raft-store.lock                 flock: one writer per directory
    raft-snapshot, raft-entry, abort_height   the Rust service's files, if
                                    any: imported once, never modified
                                    (raft/migrate.py)

A WAL segment is deleted once the *older* of the two kept snapshots covers
it, so a damaged newest snapshot can always fall back to the older one.

It serves the core's reads from memory (`_entries` plus the boundary
index/term below them, like MemoryStorage's dummy entry) and writes every
change as a WAL record; `sync()` makes all of them durable at once, so
several Readies written back to back share one fsync (group commit).
Memory is bounded by `compact()`, never by re-reading files.

Besides the Raft state it carries the service's own records (the applied
record and the abort height) in the same WAL, so they are durable in the same
fsync; `ServiceState` (raft/service_state.py) owns them, and the methods of
the section "the service's records" below are the service's only way to them.

Recovery (`open`) = replay (read the snapshot files and the WAL segments),
plan (raft/recovery.py: a pure function deciding what the store is and what
must be repaired) and apply (the repairs, durably). Only the tail of the last
segment is ever cut (warning with file and offset); any other damage raises
CorruptLog naming file, offset and what to do. Every repair it makes of a
crash state (LAST, a cut tail, the hard state) is durable before `open`
returns. It never drops possibly acknowledged data silently: when the cut
tail is not what a crash leaves (see wal.torn_append), or committed entries
are missing, `recovery_lost_synced` is set and the warning says so
(docs/internals.md, "Recovery").

Crashes in tests: tests/crash_sim.py (`simulate_crash(storage)` drops
everything not yet fsynced and closes; `DiskStorage.open()` on the same path
is then the restart).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterator

from cita_raft_pb import eraftpb_pb2 as pb
from raft import migrate
from raft.errors import (
    Compacted,
    DiskFailure,
    SnapshotTemporarilyUnavailable,
    StorageError,
    Unavailable,
)
from raft.recovery import Cut, RecoveryPlan, StoreRead, plan_recovery
from raft.service_state import ServiceState, checkpoint_records, encode_abort_height
from raft.snapshot import SnapshotStore
from raft.storage import RaftState, limit_size, new_snapshot
from raft.wal import (
    Kind,
    SegmentScan,
    WalWriter,
    fsync_dir,
    list_segments,
    read_last_seq,
    scan_segment,
    segment_name,
    write_last_seq,
)

__all__ = ["DiskStorage", "STORE_DIR"]

STORE_DIR = "raft-store"
LOCK_FILE = "raft-store.lock"
DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024  # bounds replay: segments go once two snapshots cover them
_U64 = struct.Struct("<Q")

# Where a new store's first state comes from: the Rust service's files by default.
Importer = Callable[[str, logging.Logger], migrate.StoreSeed | None]


def _copy(msg):  # type: ignore[no-untyped-def]
    out = type(msg)()
    out.CopyFrom(msg)
    return out


class DiskStorage:
    """Raft storage on disk; same read/write API as MemoryStorage (docs/internals.md)."""

    def __init__(self) -> None:
        raise TypeError("use DiskStorage.open(path)")

    # ---- opening and recovery --------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        logger: logging.Logger | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        importer: Importer | None = migrate.import_rust_files,
    ) -> DiskStorage:
        """Open (creating, or importing the Rust service's files, on first start) and recover.

        `importer` gives a new store its first state (None: start empty). Raises
        CorruptLog when the files are damaged beyond a torn tail, and
        StorageError when another process holds the directory.
        """
        self = object.__new__(cls)
        self.log = logger or logging.getLogger("raft.disk")
        self.path = path
        self.root = os.path.join(path, STORE_DIR)
        self.segment_bytes = segment_bytes
        self._writer = None
        # True when recovery cut or dropped damaged data that may have been synced
        # (acknowledged): the host must then start raft as a node that lost state
        # (Config.lost_state). Which damage counts: docs/internals.md.
        self.recovery_lost_synced = False
        os.makedirs(path, exist_ok=True)
        self._lock_fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StorageError(f"{path} is in use by another DiskStorage (lock {LOCK_FILE} held)") from None
        try:
            if not os.path.isdir(self.root):
                self._create_store(importer)
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise
        return self

    def _create_store(self, importer: Importer | None) -> None:
        """Build raft-store/ under a temp name and rename it into place, so a
        crash during the first start leaves either nothing or a whole store."""
        # Read the Rust files (if any) first: an unreadable one must leave nothing behind.
        imported = importer(self.path, self.log) if importer is not None else None
        seed = imported if imported is not None else migrate.StoreSeed()
        tmp = self.root + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "wal"))
        os.makedirs(os.path.join(tmp, "snap"))
        if seed.snapshot is not None:
            SnapshotStore(os.path.join(tmp, "snap"), self.log).save(seed.snapshot)
        head = self._segment_head(
            1,
            seed.prev_index,
            seed.prev_term,
            seed.hard_state,
            seed.conf_state,
            checkpoint_records(seed.applied, seed.abort_height),
        )
        wal_dir = os.path.join(tmp, "wal")
        WalWriter.create(wal_dir, 1, head + seed.records, self.segment_bytes, self.log, []).close()
        fsync_dir(os.path.join(tmp, "snap"))
        fsync_dir(tmp)
        os.rename(tmp, self.root)
        fsync_dir(self.path)
        if imported is not None:
            migrate.log_import(self.path, imported, self.log)
        else:
            self.log.info("disk: created a new store in %s", self.root)

    @staticmethod
    def _segment_head(
        seq: int,
        prev_index: int,
        prev_term: int,
        hs: pb.HardState,
        cs: pb.ConfState,
        service_records: list[tuple[int, bytes]],
    ) -> list[tuple[int, bytes]]:
        """SEGMENT record + checkpoint of the small state (Raft's, then the
        service's records), so older segments can go."""
        marker = pb.Entry(index=prev_index, term=prev_term, data=_U64.pack(seq))
        return [
            (Kind.SEGMENT, marker.SerializeToString()),
            (Kind.HARDSTATE, hs.SerializeToString()),
            (Kind.CONFSTATE, cs.SerializeToString()),
            *service_records,
        ]

    def _recover(self) -> None:
        """Replay, plan (raft/recovery.py), apply."""
        self._apply_plan(plan_recovery(self._replay()))

    def _replay(self) -> StoreRead:
        """Read what recovery needs. Loading the snapshots sets damaged files aside
        (SnapshotStore.load); the segments are scanned lazily, one at a time, as the
        plan asks for them (it stops at the first refusal)."""
        wal_dir = os.path.join(self.root, "wal")
        self._snaps = SnapshotStore(os.path.join(self.root, "snap"), self.log)
        snapshots = self._snaps.load()
        segments = list_segments(wal_dir)

        def scans() -> Iterator[SegmentScan]:
            for seq, path in segments:
                yield scan_segment(seq, path)

        return StoreRead(
            wal_dir=wal_dir,
            snap_dir=self._snaps.dirpath,
            snapshots=snapshots,
            last_seq=read_last_seq(wal_dir),
            segments=segments,
            scans=scans(),
        )

    def _apply_plan(self, plan: RecoveryPlan) -> None:
        """Make the repairs the plan lists, durably and in its order, then take its state."""
        wal_dir = os.path.join(self.root, "wal")
        if plan.remove_segment is not None:
            self.log.warning(
                "wal: removing %s, left empty by a crash while it was created", plan.remove_segment
            )
            os.unlink(plan.remove_segment)
            fsync_dir(wal_dir)
        for fmt, args in plan.warnings:
            self.log.warning(fmt, *args)
        if plan.save_snapshot is not None:
            self._snaps.save(plan.save_snapshot)
        self.recovery_lost_synced = plan.lost_synced
        if plan.cut is not None:
            self._cut_tail(plan.cut)
        seq, path = plan.segments[-1]
        if plan.write_last is not None:
            self.log.warning(
                "wal: LAST named %s; updating it to %s", segment_name(plan.write_last - 1), segment_name(seq)
            )
            write_last_seq(wal_dir, plan.write_last)

        self._entries = plan.entries
        self._base, self._base_term = plan.base, plan.base_term
        self._hard_state, self._conf_state = plan.hard_state, plan.conf_state
        self.service_state = ServiceState(plan.applied, plan.abort_height)
        self._snapshot = plan.snapshot

        size = os.path.getsize(path)
        self._writer = WalWriter(wal_dir, seq, size, self.segment_bytes, self.log, plan.seg_prev)
        if plan.install_snapshot is not None:
            # Write the install the crash interrupted, so that the WAL alone replays
            # to this state and entries appended from now on follow it without a gap.
            self._writer.add(Kind.SNAPSHOT, plan.install_snapshot.SerializeToString())
        if plan.write_hard_state:
            # Durable at once: the in-memory hard state must never run ahead of the
            # WAL (an equal set_hardstate later writes no record).
            self._writer.add(Kind.HARDSTATE, plan.hard_state.SerializeToString())
            self._writer.sync()
        hs = plan.hard_state
        self.log.info(
            "disk: recovered %s: entries %d..%d, snapshot index=%d, term=%d vote=%d commit=%d applied=%d, %d segment(s)",
            self.root,
            plan.base + 1,
            plan.last_index,
            self._snapshot.metadata.index,
            hs.term,
            hs.vote,
            hs.commit,
            plan.applied.metadata.index,
            len(plan.segments),
        )

    def _cut_tail(self, cut: Cut) -> None:
        """Truncate the damaged tail of the last segment, durably, saying what it was."""
        if cut.crash_like:
            self.log.warning(
                "wal: torn tail cut in %s at offset %d (%d bytes: %s): it looks like a write interrupted "
                "by a crash; recovery cannot tell whether it had been synced",
                cut.path,
                cut.offset,
                cut.nbytes,
                cut.why,
            )
        else:
            self.log.warning(
                "wal: damaged tail cut in %s at offset %d (%d bytes: %s): a crash does not leave such "
                "damage, so data that may have been synced and acknowledged is lost; the node restarts "
                "as one that lost state",
                cut.path,
                cut.offset,
                cut.nbytes,
                cut.why,
            )
        fd = os.open(cut.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, cut.offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- read side (the core) --------------------------------------------------------

    def initial_state(self) -> RaftState:
        return RaftState(_copy(self._hard_state), _copy(self._conf_state))

    def first_index(self) -> int:
        return self._base + 1

    def last_index(self) -> int:
        return self._base + len(self._entries)

    def term(self, index: int) -> int:
        k = index - self._base
        if k == 0:
            return self._base_term
        if k < 0:
            raise Compacted(f"term({index}): compacted, first index {self._base + 1}")
        if k > len(self._entries):
            raise Unavailable(f"term({index}): unavailable, last index {self.last_index()}")
        return self._entries[k - 1].term

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[pb.Entry]:
        if lo <= self._base:
            raise Compacted(f"entries({lo}, {hi}): compacted, first index {self._base + 1}")
        if hi > self.last_index() + 1:
            raise Unavailable(f"entries({lo}, {hi}): unavailable, last index {self.last_index()}")
        return limit_size(self._entries[lo - self._base - 1 : hi - self._base - 1], max_size)

    def snapshot(self, request_index: int = 0, to: int = 0) -> pb.Snapshot:
        index = self._snapshot.metadata.index
        if index < request_index:
            raise SnapshotTemporarilyUnavailable(
                f"snapshot index {index} older than requested {request_index}"
            )
        return _copy(self._snapshot)

    # ---- write side (the host, after each Ready) -------------------------------------

    def append(self, entries: list[pb.Entry]) -> None:
        """Continue or overwrite the log; a lower first index than the last truncates
        the conflicting tail first (a TRUNCATE record, so replay sees the same log)."""
        if not entries:
            return
        w = self._writer
        w.check()
        first = self._base + 1
        if entries[-1].index < first:
            return  # all compacted away already
        start = entries[0].index
        if start < first:
            entries = entries[first - start :]
            start = first
        last = self._base + len(self._entries)
        if start > last + 1:
            raise StorageError(f"append at {start} leaves a gap after last index {last}")
        if entries[-1].index != start + len(entries) - 1:
            raise StorageError(f"append of {len(entries)} entries from {start} is not contiguous")
        if start <= last:
            if start <= self._hard_state.commit:
                # Raft never rewrites a committed entry (paper 5.3/5.4); this would be a core bug.
                raise StorageError(
                    f"append at {start} would truncate committed entries (commit={self._hard_state.commit})"
                )
            w.add(Kind.TRUNCATE, pb.Entry(index=start).SerializeToString())
            del self._entries[start - self._base - 1 :]
        add = w.add
        for e in entries:
            add(Kind.ENTRY, e.SerializeToString())
        self._entries.extend(entries)

    def set_hardstate(self, hs: pb.HardState) -> None:
        self._writer.check()
        if hs == self._hard_state:
            return  # nothing new to make durable
        self._hard_state = _copy(hs)
        self._writer.add(Kind.HARDSTATE, hs.SerializeToString())

    def set_conf_state(self, cs: pb.ConfState) -> None:
        self._writer.check()
        self._conf_state = _copy(cs)
        self._writer.add(Kind.CONFSTATE, cs.SerializeToString())

    def apply_snapshot(self, snap: pb.Snapshot) -> None:
        """Replace the log by `snap` (a leader's snapshot or the bootstrap one).

        The snapshot file is made durable first and the WAL record follows, so
        recovery finds the snapshot whichever moment a crash hits.
        """
        self._writer.check()
        meta = snap.metadata
        if meta.index < self._snapshot.metadata.index:
            raise StorageError(
                f"snapshot index {meta.index} older than current {self._snapshot.metadata.index}"
            )
        self._save_snapshot(snap)
        self._writer.add(Kind.SNAPSHOT, snap.SerializeToString())
        self._snapshot = _copy(snap)
        self._entries, self._base, self._base_term = [], meta.index, meta.term
        self._conf_state = _copy(meta.conf_state)
        self._hard_state.term = max(self._hard_state.term, meta.term)
        self._hard_state.commit = max(self._hard_state.commit, meta.index)
        self.service_state.snapshot_installed(snap)
        self._delete_covered_segments()

    def create_snapshot(self, index: int, conf_state: pb.ConfState | None, data: bytes) -> pb.Snapshot:
        """Write a snapshot at `index` (already applied by the host) durably; keep the
        newest two files and delete WAL segments the older of them covers."""
        self._writer.check()
        snap = new_snapshot(self, self._snapshot, index, conf_state, data)
        # The applied record that justifies this snapshot goes to disk first, so a
        # restart never finds a snapshot newer than its applied index.
        self._writer.sync()
        self._save_snapshot(snap)
        self._snapshot = snap
        self._delete_covered_segments()
        return _copy(snap)

    def _save_snapshot(self, snap: pb.Snapshot) -> None:
        try:
            self._snaps.save(snap)
        except DiskFailure as err:
            self._writer.failed = err  # fail closed, as for a WAL write
            self.log.error("disk: %s", err)
            raise

    def _delete_covered_segments(self) -> None:
        # Keep what the *older* kept snapshot needs, so that if the newest file is
        # ever damaged the node can still start from the older one plus the WAL.
        kept = self._snaps.indexes()
        if kept:
            self._writer.delete_below(min(kept))

    def compact(self, index: int) -> None:
        """Drop entries below `index` from memory (the WAL keeps them until a
        snapshot covers their segment); the entry at index-1 becomes the boundary."""
        if index <= self._base + 1:
            return
        if index > self.last_index() + 1:
            raise Unavailable(f"compact({index}) above last index {self.last_index()}")
        k = index - 1 - self._base
        self._base_term = self._entries[k - 1].term
        self._base = index - 1
        del self._entries[:k]

    def sync(self) -> None:
        """fsync everything written so far (and the directory after a file was
        created); DiskFailure if the disk refuses, after which writes are refused."""
        w = self._writer
        w.sync()
        if w.should_rotate():
            last = self.last_index()
            head = self._segment_head(
                w.seq + 1,
                last,
                self.term(last),
                self._hard_state,
                self._conf_state,
                self.service_state.checkpoint(self._conf_state),
            )
            w.rotate(head, last)

    # ---- the service's records (raft/service_state.py) ------------------------------
    # The applied record and the abort height are the service's state, not Raft's; they
    # share the WAL only to be durable in the same fsync. These methods are the
    # service's way to them; `self.service_state` (a ServiceState) owns them in memory.

    def set_applied(
        self, index: int, conf_state: pb.ConfState | None = None, data: bytes | None = None
    ) -> None:
        """Record that the host applied up to `index` (with the conf state and the
        service's ConsensusConfiguration bytes at that point); durable with the next sync()."""
        self._writer.check()
        if not self.service_state.set_applied(index, data):
            # The applier may finish an entry after a newer snapshot was installed
            # (apply_snapshot moved applied past it): the snapshot's state wins.
            self.log.debug("disk: set_applied(%d) ignored, applied=%d already", index, self.applied_index())
            return
        if conf_state is not None:
            self._conf_state = _copy(conf_state)
        record = self.service_state.applied_record(self._conf_state)
        self._writer.add(Kind.APPLIED, record.SerializeToString())

    def applied_index(self) -> int:
        return self.service_state.applied_index()

    def applied_data(self) -> bytes:
        return self.service_state.applied_data()

    def abort_height(self) -> int:
        return self.service_state.abort_height

    def set_abort_height(self, height: int) -> None:
        """Record the abort height and sync at once."""
        self._writer.check()
        self.service_state.abort_height = height
        self._writer.add(Kind.ABORT_HEIGHT, encode_abort_height(height))
        self.sync()

    # ---- state for the host and closing ----------------------------------------------

    @property
    def hard_state(self) -> pb.HardState:
        return _copy(self._hard_state)

    @property
    def conf_state(self) -> pb.ConfState:
        return _copy(self._conf_state)

    def close(self) -> None:
        """Sync what is pending (if the disk still works) and release the directory."""
        w = self._writer
        try:
            if w is not None and w.failed is None and not w.closed:
                w.sync()
        finally:
            if w is not None:
                w.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
