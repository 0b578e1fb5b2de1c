"""The recovery plan (raft/recovery.py) on hand-built inputs: no files are read or
written (the paths below do not exist), which is the point of the replay / plan /
apply split. tests/test_disk_recovery.py and the crash explorer cover the same
rules through real files."""

from __future__ import annotations

import struct

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft.errors import CorruptLog
from raft.recovery import Cut, StoreRead, plan_recovery
from raft.wal import Kind, SegmentScan

WAL = "/nonexistent/raft-store/wal"
SNAP = "/nonexistent/raft-store/snap"
U64 = struct.Struct("<Q")


def path(seq: int) -> str:
    return f"{WAL}/{seq:016x}.wal"


def head(seq: int, prev_index: int = 0, prev_term: int = 0, **small) -> list[tuple[int, bytes]]:
    """A segment head as DiskStorage writes it (SEGMENT + checkpoint)."""
    return [
        (Kind.SEGMENT, pb.Entry(index=prev_index, term=prev_term, data=U64.pack(seq)).SerializeToString()),
        (Kind.HARDSTATE, small.get("hs", pb.HardState()).SerializeToString()),
        (Kind.CONFSTATE, small.get("cs", pb.ConfState()).SerializeToString()),
        (Kind.APPLIED, small.get("applied", pb.Snapshot()).SerializeToString()),
        (Kind.ABORT_HEIGHT, U64.pack(small.get("abort", 0))),
    ]


def ents(lo: int, hi: int, term: int = 1) -> list[tuple[int, bytes]]:
    return [
        (Kind.ENTRY, pb.Entry(index=i, term=term, data=b"e%d" % i).SerializeToString())
        for i in range(lo, hi + 1)
    ]


def hs(term: int, vote: int = 0, commit: int = 0) -> tuple[int, bytes]:
    return (Kind.HARDSTATE, pb.HardState(term=term, vote=vote, commit=commit).SerializeToString())


def scan(seq: int, records: list[tuple[int, bytes]], damage: str | None = None, **kw) -> SegmentScan:
    """A SegmentScan of `records` (offsets made up); `damage` after them, of `tail` bytes."""
    out, off = [], 0
    for kind, payload in records:
        out.append((int(kind), payload, off))
        off += 13 + len(payload)
    tail = kw.pop("tail", 0 if damage is None else 40)
    return SegmentScan(
        seq=seq, path=path(seq), records=out, good_end=off, size=off + tail, damage=damage, **kw
    )


def snapshot(index: int, term: int, voters=(1, 2, 3), data: bytes = b"cfg") -> pb.Snapshot:
    s = pb.Snapshot(data=data)
    s.metadata.index, s.metadata.term = index, term
    s.metadata.conf_state.voters.extend(voters)
    return s


def read(scans: list[SegmentScan], last: int | None = -1, snapshots=()) -> StoreRead:
    return StoreRead(
        wal_dir=WAL,
        snap_dir=SNAP,
        snapshots=list(snapshots),
        last_seq=scans[-1].seq if last == -1 else last,
        segments=[(s.seq, s.path) for s in scans],
        scans=scans,
    )


def no_repairs(plan) -> bool:  # type: ignore[no-untyped-def]
    return (
        plan.remove_segment is None
        and plan.save_snapshot is None
        and plan.cut is None
        and plan.write_last is None
        and plan.install_snapshot is None
        and not plan.write_hard_state
        and not plan.lost_synced
        and not plan.warnings
    )


# ---- a clean store ----------------------------------------------------------------------


def test_a_clean_log_is_what_its_records_say_and_needs_no_repair():
    plan = plan_recovery(read([scan(1, head(1) + ents(1, 5) + [hs(1, 2, 4)])]))
    assert [e.index for e in plan.entries] == [1, 2, 3, 4, 5]
    assert (plan.base, plan.base_term, plan.last_index) == (0, 0, 5)
    assert plan.hard_state == pb.HardState(term=1, vote=2, commit=4)
    assert plan.snapshot == pb.Snapshot()
    assert plan.segments == [(1, path(1))] and plan.seg_prev == [(1, 0)]
    assert no_repairs(plan)


def test_segments_continue_the_log_and_the_last_small_records_win():
    s1 = scan(1, head(1) + ents(1, 3) + [hs(1, 1, 2), (Kind.ABORT_HEIGHT, U64.pack(7))])
    applied = snapshot(3, 1, voters=(1, 2), data=b"cfg@3")
    s2 = scan(
        2,
        head(2, 3, 1, hs=pb.HardState(term=1, vote=1, commit=2), abort=7)
        + ents(4, 4)
        + [(Kind.APPLIED, applied.SerializeToString())],
    )
    plan = plan_recovery(read([s1, s2]))
    assert plan.last_index == 4 and plan.seg_prev == [(1, 0), (2, 3)]
    assert plan.abort_height == 7
    assert plan.applied == applied
    # The last conf state was written by the APPLIED record: it is the conf state.
    assert list(plan.conf_state.voters) == [1, 2]
    assert no_repairs(plan)


def test_a_truncate_record_drops_the_conflicting_tail():
    records = (
        head(1) + ents(1, 5) + [(Kind.TRUNCATE, pb.Entry(index=4).SerializeToString())] + ents(4, 4, term=2)
    )
    plan = plan_recovery(read([scan(1, records + [hs(2, 1, 3)])]))
    assert [(e.index, e.term) for e in plan.entries] == [(1, 1), (2, 1), (3, 1), (4, 2)]
    assert no_repairs(plan)


# ---- refused --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scans, last, what",
    [
        ([], 1, "no WAL segment"),
        ([scan(1, head(1))], None, "LAST file says nothing readable"),
        ([scan(1, head(1)), scan(3, head(3))], 1, "LAST file says 0000000000000001.wal"),
        ([scan(1, head(1)), scan(3, head(3))], 2, "expected 0000000000000002.wal"),
    ],
)
def test_missing_segments_or_last_are_refused(scans, last, what):
    r = read(scans, last=last) if scans else StoreRead(WAL, SNAP, [], last, [], [])
    with pytest.raises(CorruptLog, match=what):
        plan_recovery(r)


def test_damage_before_the_last_segment_is_refused():
    scans = [
        scan(1, head(1) + ents(1, 2), damage="checksum mismatch", plausible_torn=True),
        scan(2, head(2, 2, 1)),
    ]
    with pytest.raises(CorruptLog, match="not the last segment"):
        plan_recovery(read(scans))


def test_damage_followed_by_a_later_batch_is_refused():
    s = scan(1, head(1) + ents(1, 2), damage="checksum mismatch", acknowledged_after=500, plausible_torn=True)
    with pytest.raises(CorruptLog, match="written after a later sync"):
        plan_recovery(read([s]))


@pytest.mark.parametrize(
    "records, what",
    [
        (ents(1, 1), "starts with a ENTRY record"),
        ([(Kind.SEGMENT, pb.Entry(data=U64.pack(9)).SerializeToString())], "says seq 9"),
        (head(1) + ents(2, 2), "entry index=2 does not follow last index=0"),
        (head(1) + [(Kind.SEGMENT, b"")], "SEGMENT record in the middle"),
        (head(1) + [(Kind.ENTRY, b"\xff\xff")], "undecodable ENTRY record"),
        (head(1) + [(Kind.ABORT_HEIGHT, b"\x01")], "undecodable ABORT_HEIGHT record"),
        (head(1) + ents(1, 2) + [(Kind.TRUNCATE, pb.Entry(index=5).SerializeToString())], "outside the log"),
        (head(1) + [(Kind.HARDSTATE, b"\xff")], "undecodable HardState record"),
    ],
)
def test_records_that_cannot_be_replayed_are_refused(records, what):
    with pytest.raises(CorruptLog, match=what):
        plan_recovery(read([scan(1, records)]))


def test_a_wal_starting_after_every_usable_snapshot_is_refused():
    with pytest.raises(CorruptLog, match="no usable snapshot"):
        plan_recovery(read([scan(1, head(1, 10, 2) + ents(11, 12, 2))]))
    with pytest.raises(CorruptLog, match="entries 6..10 are gone"):
        plan_recovery(read([scan(1, head(1, 10, 2) + ents(11, 12, 2))], snapshots=[snapshot(5, 1)]))


def test_scans_are_consumed_in_order_and_not_past_a_refusal():
    consumed = []

    def scans():
        for s in [scan(1, head(1) + ents(1, 1), damage="bad", plausible_torn=True), scan(2, head(2, 1, 1))]:
            consumed.append(s.seq)
            yield s

    r = StoreRead(WAL, SNAP, [], 2, [(1, path(1)), (2, path(2))], scans())
    with pytest.raises(CorruptLog):
        plan_recovery(r)
    assert consumed == [1]


# ---- repaired ---------------------------------------------------------------------------------


def test_a_torn_tail_is_cut_without_losing_synced_data():
    s = scan(
        1,
        head(1) + ents(1, 3) + [hs(1, 0, 3)],
        damage="record runs past the end",
        plausible_torn=True,
        tail=9,
    )
    plan = plan_recovery(read([s]))
    assert plan.cut == Cut(path(1), s.good_end, 9, "record runs past the end", crash_like=True)
    assert not plan.lost_synced and plan.last_index == 3


def test_damage_a_crash_does_not_leave_is_cut_and_reported_as_lost_synced():
    s = scan(1, head(1) + ents(1, 3) + [hs(1, 0, 3)], damage="checksum mismatch", plausible_torn=False)
    plan = plan_recovery(read([s]))
    assert plan.cut is not None and not plan.cut.crash_like
    assert plan.lost_synced


def test_a_new_segment_last_does_not_name_is_adopted_and_last_updated():
    s2 = scan(2, head(2, 3, 1) + ents(4, 4), damage="checksum mismatch", plausible_torn=False)
    plan = plan_recovery(read([scan(1, head(1) + ents(1, 3) + [hs(1, 0, 3)]), s2], last=1))
    assert plan.write_last == 2
    # It never held acknowledged data, so whatever its damage, nothing synced is lost.
    assert plan.cut is not None and plan.cut.crash_like and not plan.lost_synced
    assert plan.last_index == 4


def test_an_empty_new_segment_is_removed_and_last_left_alone():
    plan = plan_recovery(
        read([scan(1, head(1) + ents(1, 3) + [hs(1, 0, 3)]), scan(2, [], damage="zeros")], last=1)
    )
    assert plan.remove_segment == path(2)
    assert plan.segments == [(1, path(1))] and plan.write_last is None
    assert plan.cut is None and not plan.lost_synced


def test_an_empty_segment_that_last_names_is_refused():
    with pytest.raises(CorruptLog, match="no valid SEGMENT record"):
        plan_recovery(read([scan(1, head(1) + ents(1, 3)), scan(2, [])], last=2))


def test_commit_beyond_the_log_is_lowered_and_reported_as_lost_synced():
    plan = plan_recovery(read([scan(1, head(1) + ents(1, 3) + [hs(1, 1, 9)])]))
    assert plan.hard_state == pb.HardState(term=1, vote=1, commit=3)
    assert plan.write_hard_state and plan.lost_synced
    assert [fmt.split(":")[1].strip().split(" ")[:3] for fmt, _ in plan.warnings] == [
        ["hard", "state", "commit=%d"]
    ]


def test_entries_of_a_newer_term_than_the_hard_state_lift_it_and_clear_the_vote():
    plan = plan_recovery(read([scan(1, head(1) + ents(1, 2) + [hs(1, 3, 2)] + ents(3, 4, term=2))]))
    assert plan.hard_state == pb.HardState(term=2, vote=0, commit=2)
    assert plan.write_hard_state and not plan.lost_synced
    assert "behind last entry term" in plan.warnings[0][0]


def test_a_snapshot_file_without_its_wal_record_is_adopted():
    snap = snapshot(40, 2, voters=(1, 2))
    plan = plan_recovery(read([scan(1, head(1) + ents(1, 10) + [hs(1, 1, 4)])], snapshots=[snap]))
    assert plan.install_snapshot == snap and plan.write_hard_state
    assert (plan.base, plan.base_term, plan.entries) == (40, 2, [])
    # The term is lifted to the snapshot's and the vote of term 1 is not carried into it
    # (soak seed 100422: it read as a vote in term 2 that was never cast).
    assert plan.hard_state == pb.HardState(term=2, vote=0, commit=40)
    assert list(plan.conf_state.voters) == [1, 2]
    assert plan.applied == snap and plan.snapshot == snap
    assert plan.save_snapshot is None and not plan.lost_synced
    assert "crash during install" in plan.warnings[0][0] and plan.warnings[0][1] == (40, 2, 1, 10)


def test_a_snapshot_the_wal_holds_but_whose_file_is_gone_is_rewritten():
    snap = snapshot(5, 1)
    records = head(1) + ents(1, 5) + [(Kind.SNAPSHOT, snap.SerializeToString())] + ents(6, 7) + [hs(1, 1, 6)]
    plan = plan_recovery(read([scan(1, records)]))
    assert plan.save_snapshot == snap and plan.snapshot == snap
    # The log agreed up to the snapshot: its entries stay as history until compacted.
    assert (plan.base, plan.last_index) == (0, 7)
    assert plan.applied == snap and list(plan.conf_state.voters) == [1, 2, 3]
    assert plan.install_snapshot is None and not plan.write_hard_state


def test_a_snapshot_file_the_log_continues_from_needs_nothing():
    snap = snapshot(3, 1)
    plan = plan_recovery(
        read([scan(2, head(2, 3, 1, hs=pb.HardState(term=1, commit=3)) + ents(4, 6))], snapshots=[snap])
    )
    assert (plan.base, plan.base_term, plan.last_index) == (3, 1, 6)
    assert plan.snapshot == snap
    assert no_repairs(plan)


def test_a_snapshot_file_of_the_hard_states_own_term_keeps_its_vote():
    snap = snapshot(40, 1, voters=(1, 2))
    plan = plan_recovery(read([scan(1, head(1) + ents(1, 10) + [hs(1, 2, 4)])], snapshots=[snap]))
    assert plan.install_snapshot == snap
    assert plan.hard_state == pb.HardState(term=1, vote=2, commit=40)
