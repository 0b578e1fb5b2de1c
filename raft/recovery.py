"""Recovery of a DiskStorage, as a pure plan: what the files say the store is, and
what must be repaired.

`DiskStorage.open` recovers in three steps (raft/disk.py):

1. replay (`DiskStorage._replay`) reads: the valid snapshot files (newest first;
   damaged ones are set aside by SnapshotStore.load), the `LAST` file, the list
   of segment files and one `SegmentScan` per segment (wal.scan_segment),
   giving a `StoreRead`;
2. `plan_recovery(read)` (here) interprets the records, checks them and decides:
   it returns a `RecoveryPlan` (the recovered log, hard state, conf state,
   snapshot and the service's records; the repairs to make; the warnings) or
   raises CorruptLog. It does no I/O and logs nothing, so it is tested on
   hand-built scans (tests/test_recovery_plan.py);
3. apply (`DiskStorage._apply_plan`) performs the repairs, durably, in the order
   of the `RecoveryPlan` fields, and opens the WAL writer.

What is accepted, cut or refused: docs/internals.md, "Recovery".
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from cita_raft_pb import eraftpb_pb2 as pb
from raft.errors import CorruptLog
from raft.service_state import decode_abort_height
from raft.wal import Kind, SegmentScan, segment_name

__all__ = ["RESTORE_HINT", "Cut", "RecoveryPlan", "StoreRead", "plan_recovery"]

_U64 = struct.Struct("<Q")
_UNKNOWN_TERM = -1  # replay: the boundary term lies in a deleted segment

RESTORE_HINT = (
    "Do not delete files to make the node start: restore the data directory from a backup, or, "
    "if the other nodes are healthy, move the data directory away so this node re-bootstraps "
    "and catches up from its peers."
)

# What decoding a record whose checksum is right but whose payload is not what its
# kind says raises (protobuf, struct): such a record was written that way, so it is
# damage recovery must refuse, as CorruptLog, never another exception.
_UNDECODABLE = (DecodeError, struct.error, ValueError)


def _copy(msg):  # type: ignore[no-untyped-def]
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _corrupt(path: str, offset: int, what: str) -> CorruptLog:
    return CorruptLog(f"WAL damaged: {path} at offset {offset}: {what}. {RESTORE_HINT}")


@dataclass
class StoreRead:
    """What replay read from the files: the input of plan_recovery."""

    wal_dir: str  # for messages only
    snap_dir: str  # for messages only
    snapshots: list[pb.Snapshot]  # the valid snapshot files, newest first
    last_seq: int | None  # what LAST names; None when it is missing or unreadable
    segments: list[tuple[int, str]]  # (seq, path) of every segment file, by seq
    # One scan per segment, in the order of `segments`. May be lazy (production reads
    # one segment at a time); plan_recovery stops reading at the first refusal.
    scans: Iterable[SegmentScan]


@dataclass
class Cut:
    """Damage at the end of the last segment, to cut off."""

    path: str
    offset: int  # the file is truncated to this length
    nbytes: int  # how many bytes go
    why: str  # the damage found there
    crash_like: bool  # what a crash leaves (else data that may have been synced is lost)


@dataclass
class RecoveryPlan:
    """The recovered store and the repairs that make the files say the same."""

    # -- the store: the log is entries (base+1 ...), `base`/`base_term` the boundary below it
    entries: list[pb.Entry]
    base: int
    base_term: int
    hard_state: pb.HardState
    conf_state: pb.ConfState
    snapshot: pb.Snapshot  # the snapshot the log continues from (empty: none)
    applied: pb.Snapshot  # the service's applied record (raft/service_state.py)
    abort_height: int  # the service's abort height
    segments: list[tuple[int, str]]  # the live segments once repaired; the last is appended to
    seg_prev: list[tuple[int, int]]  # (seq, last index before it) of each, for WalWriter
    # -- the repairs, in the order apply makes them
    remove_segment: str | None = None  # an empty segment a crash left while creating it
    save_snapshot: pb.Snapshot | None = None  # the WAL's snapshot, whose file was lost or damaged
    cut: Cut | None = None  # the damaged tail of the last segment
    write_last: int | None = None  # LAST must name this seq (it names the one before)
    install_snapshot: pb.Snapshot | None = None  # adopted snapshot: its WAL record is missing
    write_hard_state: bool = False  # recovery changed the hard state: write it back
    # -- what to tell
    lost_synced: bool = False  # see DiskStorage.recovery_lost_synced
    warnings: list[tuple[str, tuple]] = field(default_factory=list)  # (format, args), in order

    @property
    def last_index(self) -> int:
        return self.base + len(self.entries)


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
                    f"with a valid checksum ({err}). {RESTORE_HINT}"
                ) from err
        return self.obj


def _check_segment_files(wal_dir: str, recorded: int | None, segments: list[tuple[int, str]]) -> None:
    """The segment files form one run ending at LAST (or one past it)."""
    if not segments:
        raise CorruptLog(f"no WAL segment in {wal_dir}: the log is missing. {RESTORE_HINT}")
    newest = segments[-1][0]
    if recorded is None or not recorded <= newest <= recorded + 1:
        # newest == recorded + 1: a crash between creating a segment and updating LAST.
        raise CorruptLog(
            f"WAL in {wal_dir} ends with {segment_name(newest)} but its LAST file says "
            f"{'nothing readable' if recorded is None else segment_name(recorded)}: the newest "
            f"segment(s) are missing or LAST is damaged. {RESTORE_HINT}"
        )
    for (a, _), (b, path_b) in zip(segments, segments[1:], strict=False):
        if b != a + 1:
            raise CorruptLog(
                f"WAL segment(s) missing in {wal_dir}: {segment_name(a)} is followed by "
                f"{os.path.basename(path_b)}, expected {segment_name(a + 1)}. {RESTORE_HINT}"
            )


def _tail_damage(scan: SegmentScan, is_last: bool, recorded: int) -> Cut | None:
    """The cut a segment's damage calls for; CorruptLog when it may not be cut."""
    if scan.damage is None:
        return None
    path = scan.path
    if not is_last:
        raise _corrupt(path, scan.good_end, scan.damage + " (not the last segment, so not a torn write)")
    if scan.acknowledged_after is not None:
        raise _corrupt(
            path,
            scan.good_end,
            f"{scan.damage}, but a record written after a later sync follows at offset "
            f"{scan.acknowledged_after} (damage inside acknowledged data, not a torn write)",
        )
    # A segment LAST does not name yet never held acknowledged data (appends
    # go to it only after LAST names it); elsewhere only a torn append is
    # damage a crash leaves behind.
    crash_like = scan.plausible_torn or scan.seq == recorded + 1
    return Cut(path, scan.good_end, scan.size - scan.good_end, scan.damage, crash_like)


class _Replay:
    """The WAL's records applied in order: the log and the last small-state records."""

    def __init__(self, history_cut: bool) -> None:
        # `base`/`base_term`: the log position just before entries[0].
        self.entries: list[pb.Entry] = []
        self.base = self.base_term = 0
        # Small-state records are parsed lazily: only the last of each kind matters.
        self.hs, self.cs, self.applied = _Latest(pb.HardState), _Latest(pb.ConfState), _Latest(pb.Snapshot)
        self.cs_from_applied = False  # was the last conf state written by an APPLIED record?
        self.abort_height = 0
        self.wal_snapshot: pb.Snapshot | None = None
        self.seg_prev: list[tuple[int, int]] = []
        self.history_cut = history_cut  # older segments were deleted (snapshot-covered)

    def segment(self, scan: SegmentScan, first: bool) -> None:
        """Check the SEGMENT record that opens `scan` against the log so far."""
        path = scan.path
        kind, payload, offset = scan.records[0]
        if kind != Kind.SEGMENT:
            raise _corrupt(path, offset, f"segment starts with a {Kind(kind).name} record, not SEGMENT")
        try:
            marker = pb.Entry.FromString(payload)
        except _UNDECODABLE as err:
            raise _corrupt(path, offset, f"undecodable SEGMENT record with a valid checksum ({err})") from err
        marker_seq = _U64.unpack(marker.data)[0] if len(marker.data) == 8 else -1
        if marker_seq != scan.seq:
            raise _corrupt(
                path, offset, f"SEGMENT record says seq {marker_seq}: the file was renamed or copied"
            )
        if first:
            self.base, self.base_term = marker.index, marker.term
        else:
            last = self.base + len(self.entries)
            last_term = self.entries[-1].term if self.entries else self.base_term
            if (marker.index, marker.term) != (last, last_term):
                raise _corrupt(
                    path,
                    offset,
                    f"segment begins after index={marker.index} term={marker.term} but the log "
                    f"before it ends at index={last} term={last_term}",
                )
        self.seg_prev.append((scan.seq, marker.index))

    def records(self, path: str, records: list[tuple[int, bytes, int]]) -> None:
        """Apply the records after the SEGMENT one (the hot loop of recovery)."""
        entries, base, base_term = self.entries, self.base, self.base_term
        hs_l, cs_l, applied_l = self.hs, self.cs, self.applied
        cs_from_applied = self.cs_from_applied
        entry_from = pb.Entry.FromString
        # Plain ints: enum attribute lookups cost more than the rest of the hot loop.
        k_entry, k_hardstate, k_truncate, k_applied = (
            int(k) for k in (Kind.ENTRY, Kind.HARDSTATE, Kind.TRUNCATE, Kind.APPLIED)
        )
        k_confstate, k_snapshot, k_abort, k_segment = (
            int(k) for k in (Kind.CONFSTATE, Kind.SNAPSHOT, Kind.ABORT_HEIGHT, Kind.SEGMENT)
        )
        try:
            for kind, payload, offset in records:
                if kind == k_entry:
                    e = entry_from(payload)
                    if e.index != base + len(entries) + 1:
                        raise _corrupt(
                            path,
                            offset,
                            f"entry index={e.index} does not follow last index={base + len(entries)}",
                        )
                    entries.append(e)
                elif kind == k_hardstate:
                    hs_l.raw, hs_l.where = payload, (path, offset)
                elif kind == k_truncate:
                    index = entry_from(payload).index
                    if index <= base and self.history_cut:
                        # Overwrites entries of a deleted segment (they were uncommitted when
                        # it was cut); a snapshot covers what came before, checked in _settle.
                        entries, base, base_term = [], index - 1, _UNKNOWN_TERM
                    elif not base < index <= base + len(entries) + 1:
                        raise _corrupt(
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
                    self.wal_snapshot = snap
                elif kind == k_abort:
                    self.abort_height = decode_abort_height(payload)
                elif kind == k_segment:
                    raise _corrupt(path, offset, "SEGMENT record in the middle of a segment")
        except _UNDECODABLE as err:
            raise _corrupt(
                path, offset, f"undecodable {Kind(kind).name} record with a valid checksum ({err})"
            ) from err
        self.entries, self.base, self.base_term = entries, base, base_term
        self.cs_from_applied = cs_from_applied


def _replay_segments(read: StoreRead, plan: RecoveryPlan) -> _Replay:
    """Replay every segment; fills plan.segments, plan.cut and plan.remove_segment."""
    segments = plan.segments
    recorded = read.last_seq
    assert recorded is not None  # _check_segment_files refused a missing LAST
    replay = _Replay(history_cut=segments[0][0] > 1)
    last_pos = len(segments) - 1
    for pos, scan in enumerate(read.scans):
        plan.cut = _tail_damage(scan, pos == last_pos, recorded) or plan.cut
        if not scan.records:
            if pos == last_pos and pos > 0 and scan.seq == recorded + 1:
                # A crash while creating the segment, before LAST named it (the
                # previous segment was synced first, so nothing is lost).
                plan.remove_segment = scan.path
                segments.pop()
                plan.cut = None
                break
            raise _corrupt(scan.path, 0, "segment has no valid SEGMENT record")
        replay.segment(scan, first=pos == 0)
        replay.records(scan.path, scan.records[1:])
    plan.seg_prev = replay.seg_prev
    return replay


def _settle(read: StoreRead, r: _Replay, plan: RecoveryPlan) -> None:
    """The replayed state against the snapshot files: the snapshot the log continues
    from, or the one to adopt (a crash during an install)."""
    hs, applied = r.hs.get(), r.applied.get()
    cs = _copy(applied.metadata.conf_state) if r.cs_from_applied else r.cs.get()
    entries, base, base_term = r.entries, r.base, r.base_term
    # The snapshot the log continues from: newest of the files and the WAL's own copy.
    latest = read.snapshots[0] if read.snapshots else None
    wal_snapshot = r.wal_snapshot
    if wal_snapshot is not None and (latest is None or wal_snapshot.metadata.index > latest.metadata.index):
        latest = wal_snapshot
    if latest is not None:
        meta = latest.metadata
        f_index, f_term = meta.index, meta.term
        if f_index < base:
            raise CorruptLog(
                f"the WAL in {read.wal_dir} starts after index {base} but the newest usable snapshot "
                f"is at index {f_index}: entries {f_index + 1}..{base} are gone (snapshot files "
                f"damaged or removed; see *.corrupt in {read.snap_dir}). {RESTORE_HINT}"
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
            plan.warnings.append(
                (
                    "disk: snapshot index=%d term=%d is not in the WAL (crash during install); "
                    "adopting it and dropping log entries %d..%d",
                    (f_index, f_term, base + 1, base + len(entries)),
                )
            )
            entries, base, base_term = [], f_index, f_term
            plan.install_snapshot = latest
            cs = _copy(meta.conf_state)
            if f_term > hs.term:
                # The hard state of the snapshot's term was lost with the record; a
                # vote kept from an older term was never cast in this one (soak seed
                # 100422: lifted with it, it read as a second vote in the new term).
                hs.term, hs.vote = f_term, 0
            hs.commit = max(hs.commit, f_index)
            if f_index > applied.metadata.index:
                applied = _copy(latest)
        if latest is wal_snapshot:
            plan.save_snapshot = wal_snapshot  # its file was lost or damaged: rewrite it from the WAL
    elif base > 0:
        raise CorruptLog(
            f"the WAL in {read.wal_dir} starts after index {base} but there is no usable snapshot "
            f"in {read.snap_dir}. {RESTORE_HINT}"
        )
    plan.entries, plan.base, plan.base_term = entries, base, base_term
    plan.hard_state, plan.conf_state, plan.applied = hs, cs, applied
    plan.abort_height = r.abort_height
    plan.snapshot = _copy(latest) if latest is not None else pb.Snapshot()
    plan.write_hard_state = plan.install_snapshot is not None


def _check_hard_state(plan: RecoveryPlan) -> None:
    """A hard state that disagrees with the log kept: lowered or lifted, and written back."""
    hs, last = plan.hard_state, plan.last_index
    if hs.commit > last:
        # The hard state is written after the entries it commits, so a crash cannot
        # keep it without them: synced entries were lost to damage. raft-rs would
        # refuse a commit beyond the log.
        plan.warnings.append(
            (
                "disk: hard state commit=%d beyond last index=%d: committed entries that had been synced "
                "are missing (damaged storage); lowering it, the node restarts as one that lost state",
                (hs.commit, last),
            )
        )
        hs.commit = last
        plan.write_hard_state = True
        plan.lost_synced = True
    last_term = plan.entries[-1].term if plan.entries else plan.base_term
    if last_term > hs.term:
        # A torn tail kept a Ready's entries but not the hard state written after
        # them. The term must cover every entry held (paper 5.1: a node adopts the
        # term of any entry it accepts); no vote in that term was ever durable,
        # hence never sent, so the vote is cleared.
        plan.warnings.append(
            (
                "disk: hard state term=%d behind last entry term=%d (its record was lost with the cut tail "
                "or never written); raising it, vote cleared",
                (hs.term, last_term),
            )
        )
        hs.term, hs.vote = last_term, 0
        plan.write_hard_state = True


def plan_recovery(read: StoreRead) -> RecoveryPlan:
    """What the store is and what must be repaired; CorruptLog for damage that is refused.

    Pure: reads nothing but `read` (whose `scans` it consumes in order) and writes nothing.
    """
    _check_segment_files(read.wal_dir, read.last_seq, read.segments)
    plan = RecoveryPlan(
        entries=[],
        base=0,
        base_term=0,
        hard_state=pb.HardState(),
        conf_state=pb.ConfState(),
        snapshot=pb.Snapshot(),
        applied=pb.Snapshot(),
        abort_height=0,
        segments=list(read.segments),
        seg_prev=[],
    )
    replay = _replay_segments(read, plan)
    _settle(read, replay, plan)
    _check_hard_state(plan)
    if plan.cut is not None and not plan.cut.crash_like:
        plan.lost_synced = True
    seq = plan.segments[-1][0]
    if seq == read.last_seq + 1:  # type: ignore[operator]
        # A crash after the segment was created (durably) and before LAST named it:
        # accepted, so LAST must name it now, or the next such crash at the
        # following rotation would leave a WAL two segments ahead of LAST.
        plan.write_last = seq
    return plan
