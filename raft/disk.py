"""DiskStorage: the durable Raft storage of the service (WAL + snapshot files).

Owns the `raft-store/` directory under `raft_data_path`:

    raft-store/wal/<seq>.wal, LAST  segmented WAL (raft/wal.py)
    raft-store/snap/<i>-<t>.snap    the newest two snapshots (raft/snapshot.py)
    raft-store.lock                 flock: one writer per directory
    raft-snapshot, raft-entry, abort_height   the Rust service's files, if
                                    any: imported once, never modified

A WAL segment is deleted once the *older* of the two kept snapshots covers
it, so a damaged newest snapshot can always fall back to the older one.

It serves the core's reads from memory (`_entries` plus the boundary
index/term below them, like MemoryStorage's dummy entry) and writes every
change as a WAL record; `sync()` makes all of them durable at once, so
several Readies written back to back share one fsync (group commit).
Memory is bounded by `compact()`, never by re-reading files.

Recovery (`open`) = newest valid snapshot + replay of the WAL. Only the tail
of the last segment is ever cut (warning with file and offset); any other
damage raises CorruptLog naming file, offset and what to do. Every repair it
makes of a crash state (LAST, a cut tail, the hard state) is durable before
`open` returns. It never drops possibly acknowledged data silently: when the
cut tail is not what a crash leaves (see wal.torn_append), or committed
entries are missing, `recovery_lost_synced` is set and the warning says so
(docs/internals.md, "Recovery").

Crash model for tests: `simulate_crash()` drops everything not yet fsynced
(optionally keeping a torn prefix of it) and closes; `DiskStorage.open()` on
the same path is then the restart.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import struct

from google.protobuf.message import DecodeError

from cita_raft_pb import eraftpb_pb2 as pb
from raft import migrate
from raft.errors import (
    Compacted,
    CorruptLog,
    DiskFailure,
    SnapshotTemporarilyUnavailable,
    StorageError,
    Unavailable,
)
from raft.snapshot import SnapshotStore
from raft.storage import RaftState, limit_size, new_snapshot
from raft.wal import (
    Kind,
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
_UNKNOWN_TERM = -1  # replay: the boundary term lies in a deleted segment

_RESTORE_HINT = (
    "Do not delete files to make the node start: restore the data directory from a backup, or, "
    "if the other nodes are healthy, move the data directory away so this node re-bootstraps "
    "and catches up from its peers."
)


def _copy(msg):  # type: ignore[no-untyped-def]
    out = type(msg)()
    out.CopyFrom(msg)
    return out


# What decoding a record whose checksum is right but whose payload is not what its
# kind says raises (protobuf, struct): such a record was written that way, so it is
# damage recovery must refuse, as CorruptLog, never another exception.
_UNDECODABLE = (DecodeError, struct.error, ValueError)


class _Latest:
    """Replay helper: the last payload of one small-state record kind, parsed on demand."""

    __slots__ = ("cls", "obj", "raw", "where")

    def __init__(self, cls) -> None:  # type: ignore[no-untyped-def]
        self.cls = cls
        self.obj = cls()
        self.raw: bytes | None = None
        self.where: tuple[str, int] = ("", 0)  # (file, offset) of `raw`

    def set(self, obj) -> None:  # type: ignore[no-untyped-def]
        self.obj, self.raw = obj, None

    def get(self):  # type: ignore[no-untyped-def]
        if self.raw is not None:
            try:
                self.obj, self.raw = self.cls.FromString(self.raw), None
            except _UNDECODABLE as err:
                path, offset = self.where
                raise CorruptLog(
                    f"WAL damaged: {path} at offset {offset}: undecodable {self.cls.DESCRIPTOR.name} record "
                    f"with a valid checksum ({err}). {_RESTORE_HINT}"
                ) from err
        return self.obj


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
    ) -> DiskStorage:
        """Open (creating, or importing the Rust service's files, on first start) and recover.

        Raises CorruptLog when the files are damaged beyond a torn tail, and
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
                self._create_store()
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise
        return self

    def _create_store(self) -> None:
        """Build raft-store/ under a temp name and rename it into place, so a
        crash during the first start leaves either nothing or a whole store."""
        # Read the Rust files (if any) first: an unreadable one must leave nothing behind.
        imported = migrate.read_rust_state(self.path, self.log) if migrate.has_rust_files(self.path) else None
        tmp = self.root + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "wal"))
        os.makedirs(os.path.join(tmp, "snap"))
        hs, cs, applied = pb.HardState(), pb.ConfState(), pb.Snapshot()
        prev_index = prev_term = abort_height = 0
        extra: list[tuple[int, bytes]] = []
        if imported is not None:
            abort_height = imported.abort_height
            snap = imported.snapshot
            if snap is not None:
                meta = snap.metadata
                SnapshotStore(os.path.join(tmp, "snap"), self.log).save(snap)
                prev_index, prev_term = meta.index, meta.term
                cs.CopyFrom(meta.conf_state)
                applied.CopyFrom(snap)
                # The Rust service never persisted term/vote (cita-cloud.md 4.7): start from
                # what it would have restarted with.
                hs.term, hs.commit = meta.term, meta.index
                extra.append((Kind.SNAPSHOT, snap.SerializeToString()))
                entry = imported.entry
                if entry is not None and entry.index == meta.index + 1:
                    hs.term = max(hs.term, entry.term)
                    extra.append((Kind.ENTRY, entry.SerializeToString()))
        head = self._segment_head(1, prev_index, prev_term, hs, cs, applied, abort_height) + extra
        WalWriter.create(os.path.join(tmp, "wal"), 1, head, self.segment_bytes, self.log, []).close()
        fsync_dir(os.path.join(tmp, "snap"))
        fsync_dir(tmp)
        os.rename(tmp, self.root)
        fsync_dir(self.path)
        if imported is not None:
            snap = imported.snapshot
            self.log.warning(
                "migrate: imported the Rust consensus_raft files in %s: snapshot index=%s term=%s "
                "voters=%s, entry index=%s, abort_height=%d; originals kept untouched",
                self.path,
                snap.metadata.index if snap else None,
                snap.metadata.term if snap else None,
                list(snap.metadata.conf_state.voters) if snap else None,
                imported.entry.index if imported.entry else None,
                imported.abort_height,
            )
        else:
            self.log.info("disk: created a new store in %s", self.root)

    @staticmethod
    def _segment_head(
        seq: int,
        prev_index: int,
        prev_term: int,
        hs: pb.HardState,
        cs: pb.ConfState,
        applied: pb.Snapshot,
        abort_height: int,
    ) -> list[tuple[int, bytes]]:
        """SEGMENT record + checkpoint of the small state, so older segments can go."""
        marker = pb.Entry(index=prev_index, term=prev_term, data=_U64.pack(seq))
        return [
            (Kind.SEGMENT, marker.SerializeToString()),
            (Kind.HARDSTATE, hs.SerializeToString()),
            (Kind.CONFSTATE, cs.SerializeToString()),
            (Kind.APPLIED, applied.SerializeToString()),
            (Kind.ABORT_HEIGHT, _U64.pack(abort_height)),
        ]

    def _recover(self) -> None:
        wal_dir = os.path.join(self.root, "wal")
        snaps = SnapshotStore(os.path.join(self.root, "snap"), self.log)
        self._snaps = snaps
        snapshots = snaps.load()
        segments = list_segments(wal_dir)
        if not segments:
            raise CorruptLog(f"no WAL segment in {wal_dir}: the log is missing. {_RESTORE_HINT}")
        recorded = read_last_seq(wal_dir)
        newest = segments[-1][0]
        if recorded is None or not recorded <= newest <= recorded + 1:
            # newest == recorded + 1: a crash between creating a segment and updating LAST.
            raise CorruptLog(
                f"WAL in {wal_dir} ends with {segment_name(newest)} but its LAST file says "
                f"{'nothing readable' if recorded is None else segment_name(recorded)}: the newest "
                f"segment(s) are missing or LAST is damaged. {_RESTORE_HINT}"
            )
        for (a, _), (b, path_b) in zip(segments, segments[1:], strict=False):
            if b != a + 1:
                raise CorruptLog(
                    f"WAL segment(s) missing in {wal_dir}: {segment_name(a)} is followed by "
                    f"{os.path.basename(path_b)}, expected {segment_name(a + 1)}. {_RESTORE_HINT}"
                )

        # Replay state. `base`/`base_term`: the log position just before entries[0].
        entries: list[pb.Entry] = []
        base = base_term = 0
        # Small-state records are parsed lazily: only the last of each kind matters.
        hs_l, cs_l, applied_l = _Latest(pb.HardState), _Latest(pb.ConfState), _Latest(pb.Snapshot)
        cs_from_applied = False  # was the last conf state written by an APPLIED record?
        abort_height = 0
        wal_snapshot: pb.Snapshot | None = None
        seg_prev: list[tuple[int, int]] = []
        cut: tuple[str, int, int, str] | None = None
        entry_from = pb.Entry.FromString

        def corrupt(path: str, offset: int, what: str) -> CorruptLog:
            return CorruptLog(f"WAL damaged: {path} at offset {offset}: {what}. {_RESTORE_HINT}")

        last_pos = len(segments) - 1
        # Plain ints: enum attribute lookups cost more than the rest of the hot loop.
        k_entry, k_hardstate, k_truncate, k_applied = (
            int(k) for k in (Kind.ENTRY, Kind.HARDSTATE, Kind.TRUNCATE, Kind.APPLIED)
        )
        k_confstate, k_snapshot, k_abort, k_segment = (
            int(k) for k in (Kind.CONFSTATE, Kind.SNAPSHOT, Kind.ABORT_HEIGHT, Kind.SEGMENT)
        )
        history_cut = segments[0][0] > 1  # older segments were deleted (snapshot-covered)
        for pos, (seq, path) in enumerate(segments):
            scan = scan_segment(seq, path)
            if scan.damage is not None:
                if pos != last_pos:
                    raise corrupt(
                        path, scan.good_end, scan.damage + " (not the last segment, so not a torn write)"
                    )
                if scan.acknowledged_after is not None:
                    raise corrupt(
                        path,
                        scan.good_end,
                        f"{scan.damage}, but a record written after a later sync follows at offset "
                        f"{scan.acknowledged_after} (damage inside acknowledged data, not a torn write)",
                    )
                # A segment LAST does not name yet never held acknowledged data (appends
                # go to it only after LAST names it); elsewhere only a torn append is
                # damage a crash leaves behind.
                crash_like = scan.plausible_torn or seq == recorded + 1
                cut = (path, scan.good_end, scan.size - scan.good_end, scan.damage, crash_like)
            records = scan.records
            if not records:
                if pos == last_pos and pos > 0 and seq == recorded + 1:
                    # A crash while creating the segment, before LAST named it (the
                    # previous segment was synced first, so nothing is lost).
                    self.log.warning("wal: removing %s, left empty by a crash while it was created", path)
                    os.unlink(path)
                    fsync_dir(wal_dir)
                    segments.pop()
                    cut = None
                    break
                raise corrupt(path, 0, "segment has no valid SEGMENT record")
            kind, payload, offset = records[0]
            if kind != Kind.SEGMENT:
                raise corrupt(path, offset, f"segment starts with a {Kind(kind).name} record, not SEGMENT")
            try:
                marker = entry_from(payload)
            except _UNDECODABLE as err:
                raise corrupt(
                    path, offset, f"undecodable SEGMENT record with a valid checksum ({err})"
                ) from err
            marker_seq = _U64.unpack(marker.data)[0] if len(marker.data) == 8 else -1
            if marker_seq != seq:
                raise corrupt(
                    path, offset, f"SEGMENT record says seq {marker_seq}: the file was renamed or copied"
                )
            if pos == 0:
                base, base_term = marker.index, marker.term
            else:
                last = base + len(entries)
                last_term = entries[-1].term if entries else base_term
                if (marker.index, marker.term) != (last, last_term):
                    raise corrupt(
                        path,
                        offset,
                        f"segment begins after index={marker.index} term={marker.term} but the log "
                        f"before it ends at index={last} term={last_term}",
                    )
            seg_prev.append((seq, marker.index))
            try:
                for kind, payload, offset in records[1:]:
                    if kind == k_entry:
                        e = entry_from(payload)
                        if e.index != base + len(entries) + 1:
                            raise corrupt(
                                path,
                                offset,
                                f"entry index={e.index} does not follow last index={base + len(entries)}",
                            )
                        entries.append(e)
                    elif kind == k_hardstate:
                        hs_l.raw, hs_l.where = payload, (path, offset)
                    elif kind == k_truncate:
                        index = entry_from(payload).index
                        if index <= base and history_cut:
                            # Overwrites entries of a deleted segment (they were uncommitted when
                            # it was cut); a snapshot covers what came before, checked below.
                            entries, base, base_term = [], index - 1, _UNKNOWN_TERM
                        elif not base < index <= base + len(entries) + 1:
                            raise corrupt(
                                path,
                                offset,
                                f"truncation at index={index} outside the log ({base}, {base + len(entries)}]",
                            )
                        del entries[index - base - 1 :]
                    elif kind == k_applied:
                        applied_l.raw, applied_l.where = payload, (path, offset)
                        cs_from_applied = True
                    elif kind == k_confstate:
                        cs_l.raw, cs_l.where = payload, (path, offset)
                        cs_from_applied = False
                    elif kind == k_snapshot:
                        snap = pb.Snapshot.FromString(payload)
                        meta = snap.metadata
                        k = meta.index - base
                        if 0 < k <= len(entries) and entries[k - 1].term == meta.term:
                            del entries[k:]  # the log agrees up to the snapshot: keep it as history
                        else:
                            entries, base, base_term = [], meta.index, meta.term
                        cs_l.set(_copy(meta.conf_state))
                        cs_from_applied = False
                        hs = hs_l.get()
                        hs.term = max(hs.term, meta.term)
                        hs.commit = max(hs.commit, meta.index)
                        applied_l.set(_copy(snap))
                        wal_snapshot = snap
                    elif kind == k_abort:
                        abort_height = _U64.unpack(payload)[0]
                    elif kind == k_segment:
                        raise corrupt(path, offset, "SEGMENT record in the middle of a segment")

            except _UNDECODABLE as err:
                raise corrupt(
                    path, offset, f"undecodable {Kind(kind).name} record with a valid checksum ({err})"
                ) from err

        hs, applied = hs_l.get(), applied_l.get()
        cs = _copy(applied.metadata.conf_state) if cs_from_applied else cs_l.get()

        # The snapshot the log continues from: newest of the files and the WAL's own copy.
        latest = snapshots[0] if snapshots else None
        if wal_snapshot is not None and (
            latest is None or wal_snapshot.metadata.index > latest.metadata.index
        ):
            latest = wal_snapshot
        last = base + len(entries)
        adopted: pb.Snapshot | None = None
        if latest is not None:
            meta = latest.metadata
            f_index, f_term = meta.index, meta.term
            if f_index < base:
                raise CorruptLog(
                    f"the WAL in {wal_dir} starts after index {base} but the newest usable snapshot "
                    f"is at index {f_index}: entries {f_index + 1}..{base} are gone (snapshot files "
                    f"damaged or removed; see *.corrupt in {snaps.dirpath}). {_RESTORE_HINT}"
                )
            k = f_index - base
            if k == 0 and base_term == _UNKNOWN_TERM:
                base_term = f_term
            if k <= len(entries) and (entries[k - 1].term if k else base_term) == f_term:
                # The log continues from the snapshot. Entries below it stay in memory
                # (bounded by segment deletion) until the host compacts them again,
                # unless the boundary term below them is unknown.
                if base_term == _UNKNOWN_TERM:
                    entries, base, base_term = entries[k:], f_index, f_term
            else:
                # The snapshot was installed (file saved) but the crash came before its
                # WAL record was durable: the snapshot is committed state, adopt it.
                self.log.warning(
                    "disk: snapshot index=%d term=%d is not in the WAL (crash during install); "
                    "adopting it and dropping log entries %d..%d",
                    f_index,
                    f_term,
                    base + 1,
                    last,
                )
                entries, base, base_term = [], f_index, f_term
                adopted = latest
                cs = _copy(meta.conf_state)
                hs.term = max(hs.term, f_term)
                hs.commit = max(hs.commit, f_index)
                if f_index > applied.metadata.index:
                    applied = _copy(latest)
            if latest is wal_snapshot:
                snaps.save(wal_snapshot)  # its file was lost or damaged: rewrite it from the WAL
        elif base > 0:
            raise CorruptLog(
                f"the WAL in {wal_dir} starts after index {base} but there is no usable snapshot "
                f"in {snaps.dirpath}. {_RESTORE_HINT}"
            )
        last = base + len(entries)
        hs_repaired = False  # recovery changed the hard state: write it back
        if hs.commit > last:
            # The hard state is written after the entries it commits, so a crash cannot
            # keep it without them: synced entries were lost to damage. raft-rs would
            # refuse a commit beyond the log.
            self.log.warning(
                "disk: hard state commit=%d beyond last index=%d: committed entries that had been synced "
                "are missing (damaged storage); lowering it, the node restarts as one that lost state",
                hs.commit,
                last,
            )
            hs.commit = last
            hs_repaired = True
            self.recovery_lost_synced = True
        last_term = entries[-1].term if entries else base_term
        if last_term > hs.term:
            # A torn tail kept a Ready's entries but not the hard state written after
            # them. The term must cover every entry held (paper 5.1: a node adopts the
            # term of any entry it accepts); no vote in that term was ever durable,
            # hence never sent, so the vote is cleared.
            self.log.warning(
                "disk: hard state term=%d behind last entry term=%d (its record was lost with the cut tail "
                "or never written); raising it, vote cleared",
                hs.term,
                last_term,
            )
            hs.term, hs.vote = last_term, 0
            hs_repaired = True

        self._entries = entries
        self._base, self._base_term = base, base_term
        self._hard_state, self._conf_state = hs, cs
        self._applied = applied
        self._abort_height = abort_height
        self._snapshot = _copy(latest) if latest is not None else pb.Snapshot()

        seq, path = segments[-1]
        if cut is not None:
            cut_path, offset, nbytes, why, crash_like = cut
            if crash_like:
                self.log.warning(
                    "wal: torn tail cut in %s at offset %d (%d bytes: %s): it looks like a write interrupted "
                    "by a crash; recovery cannot tell whether it had been synced",
                    cut_path,
                    offset,
                    nbytes,
                    why,
                )
            else:
                self.recovery_lost_synced = True
                self.log.warning(
                    "wal: damaged tail cut in %s at offset %d (%d bytes: %s): a crash does not leave such "
                    "damage, so data that may have been synced and acknowledged is lost; the node restarts "
                    "as one that lost state",
                    cut_path,
                    offset,
                    nbytes,
                    why,
                )
            fd = os.open(cut_path, os.O_WRONLY)
            try:
                os.ftruncate(fd, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        if seq == recorded + 1:
            # A crash after the segment was created (durably) and before LAST named it:
            # accepted above, so LAST must name it now, or the next such crash at the
            # following rotation would leave a WAL two segments ahead of LAST.
            self.log.warning(
                "wal: LAST named %s; updating it to %s", segment_name(recorded), segment_name(seq)
            )
            write_last_seq(wal_dir, seq)
        size = os.path.getsize(path)
        self._writer = WalWriter(wal_dir, seq, size, self.segment_bytes, self.log, seg_prev[: len(segments)])
        if adopted is not None:
            # Write the install the crash interrupted, so that the WAL alone replays
            # to this state and entries appended from now on follow it without a gap.
            self._writer.add(Kind.SNAPSHOT, adopted.SerializeToString())
            hs_repaired = True
        if hs_repaired:
            # Durable at once: the in-memory hard state must never run ahead of the
            # WAL (an equal set_hardstate later writes no record).
            self._writer.add(Kind.HARDSTATE, hs.SerializeToString())
            self._writer.sync()
        self.log.info(
            "disk: recovered %s: entries %d..%d, snapshot index=%d, term=%d vote=%d commit=%d applied=%d, %d segment(s)",
            self.root,
            base + 1,
            last,
            self._snapshot.metadata.index,
            hs.term,
            hs.vote,
            hs.commit,
            applied.metadata.index,
            len(segments),
        )

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
        self._applied = _copy(snap)
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
                self._current_applied(),
                self._abort_height,
            )
            w.rotate(head, last)

    # ---- extras for the service ------------------------------------------------------

    def _current_applied(self) -> pb.Snapshot:
        applied = _copy(self._applied)
        applied.metadata.conf_state.CopyFrom(self._conf_state)
        return applied

    def set_applied(
        self, index: int, conf_state: pb.ConfState | None = None, data: bytes | None = None
    ) -> None:
        """Record that the host applied up to `index` (with the conf state and the
        service's ConsensusConfiguration bytes at that point); durable with the next sync()."""
        self._writer.check()
        if index < self._applied.metadata.index:
            # The applier may finish an entry after a newer snapshot was installed
            # (apply_snapshot moved applied past it): the snapshot's state wins.
            self.log.debug(
                "disk: set_applied(%d) ignored, applied=%d already", index, self._applied.metadata.index
            )
            return
        if conf_state is not None:
            self._conf_state = _copy(conf_state)
        self._applied.metadata.index = index
        if data is not None:
            self._applied.data = data
        self._writer.add(Kind.APPLIED, self._current_applied().SerializeToString())

    def applied_index(self) -> int:
        return self._applied.metadata.index

    def applied_data(self) -> bytes:
        return self._applied.data

    def abort_height(self) -> int:
        return self._abort_height

    def set_abort_height(self, height: int) -> None:
        """Record the abort height and sync at once."""
        self._writer.check()
        self._abort_height = height
        self._writer.add(Kind.ABORT_HEIGHT, _U64.pack(height))
        self.sync()

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

    def simulate_crash(self, rng: random.Random | None = None) -> None:
        """Test helper: the process dies / the power goes now.

        Everything not yet fsynced is lost. With `rng`, sometimes a random
        prefix of it survives, maybe followed by zeros (a torn write), and
        sometimes all of it survives but for a zeroed hole (pages written out
        of order); recovery must cut either. The storage is closed
        afterwards; reopen with `DiskStorage.open(path)`.
        """
        torn, garbage, hole = 0, b"", None
        pending = self._writer.unsynced_bytes
        r = rng.random() if rng is not None else 0.0
        if rng is not None and r >= 0.5:
            torn = rng.randint(0, pending)
            if r >= 0.8 and pending:
                torn = pending
                hole = (rng.randrange(pending), rng.randint(1, 4096))
            elif rng.random() < 0.3:
                garbage = bytes(rng.randint(1, 64))
        self._writer.simulate_crash(torn, garbage, hole)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
