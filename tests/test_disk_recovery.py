"""Recovery repairs what it accepts (LAST after a crash at segment creation) and
says when it cut damage that may have held synced data
(`DiskStorage.recovery_lost_synced`; which damage counts: docs/internals.md)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft import wal
from raft.disk import DiskStorage
from raft.errors import CorruptLog
from raft.wal import HEADER_SIZE, SECTOR, Kind, list_segments, read_last_seq, scan_segment, write_last_seq

LOG = logging.getLogger("test.recovery")
SEGMENT_BYTES = 600


def ents(lo: int, hi: int, term: int = 1) -> list[pb.Entry]:
    return [pb.Entry(index=i, term=term, data=b"entry-%d" % i) for i in range(lo, hi + 1)]


def wal_dir(path: str) -> str:
    return os.path.join(path, "raft-store", "wal")


def open_ok(path: str) -> DiskStorage:
    return DiskStorage.open(path, logger=LOG, segment_bytes=SEGMENT_BYTES)


class Crash(BaseException):
    """The process dies here (not an OSError: nothing may handle it)."""


def abandon(s: DiskStorage) -> None:
    """What the kernel does for a killed process: close its fds, nothing else."""
    if s._writer is not None and s._writer._fd is not None:
        os.close(s._writer._fd)
        s._writer._fd = None
    os.close(s._lock_fd)
    s._lock_fd = None


def append_until_rotation(s: DiskStorage) -> None:
    """Append single-entry Readies until sync() starts a new segment."""
    seq = s._writer.seq
    i = s.last_index()
    while s._writer.seq == seq:
        i += 1
        s.append(ents(i, i))
        s.set_hardstate(pb.HardState(term=1, vote=1, commit=i - 1))
        s.sync()


def crash_before_last_is_updated(s: DiskStorage, monkeypatch) -> int:
    """Append until a rotation, crashing after the new segment is durable but
    before LAST names it; returns the last index then durable (sync() fsyncs the
    old segment before it rotates, so the Ready that triggered it is durable)."""

    def die(dirpath: str, seq: int) -> None:
        raise Crash(f"killed before LAST -> {seq}")

    with monkeypatch.context() as m:
        m.setattr(wal, "write_last_seq", die)
        with pytest.raises(Crash):
            while True:
                i = s.last_index() + 1
                s.append(ents(i, i))
                s.set_hardstate(pb.HardState(term=1, vote=1, commit=i - 1))
                s.sync()
    durable = s.last_index()
    abandon(s)
    return durable


def test_two_crashes_at_segment_creation_do_not_brick_the_wal(tmp_path, monkeypatch):
    # Issue 13 defect 5: the first crash left LAST one behind, recovery accepted it
    # without repairing LAST, the second crash at the next rotation left the WAL two
    # segments ahead of LAST: "ends with ...5.wal but its LAST file says ...3.wal".
    path = str(tmp_path / "data")
    s = open_ok(path)
    append_until_rotation(s)
    acked = crash_before_last_is_updated(s, monkeypatch)
    newest = list_segments(wal_dir(path))[-1][0]
    assert read_last_seq(wal_dir(path)) == newest - 1, "the crash hit between segment and LAST"

    s = open_ok(path)  # first recovery: accepts the new segment
    assert s.last_index() == acked
    assert not s.recovery_lost_synced
    acked = crash_before_last_is_updated(s, monkeypatch)  # the second crash, one rotation later

    s = open_ok(path)
    try:
        assert s.last_index() == acked
        assert read_last_seq(wal_dir(path)) == list_segments(wal_dir(path))[-1][0]
        assert not s.recovery_lost_synced
        append_until_rotation(s)
    finally:
        s.close()
    s = open_ok(path)
    assert s.last_index() >= acked + 1
    s.close()


def test_last_repair_is_durable_through_temp_file_and_directory_fsync(tmp_path, monkeypatch):
    path = str(tmp_path / "data")
    s = open_ok(path)
    append_until_rotation(s)
    crash_before_last_is_updated(s, monkeypatch)
    calls: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(
        os, "replace", lambda a, b: (calls.append(f"replace {os.path.basename(b)}"), real_replace(a, b))[1]
    )
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    s = open_ok(path)
    s.close()
    assert read_last_seq(wal_dir(path)) == list_segments(wal_dir(path))[-1][0], "recovery repaired LAST"
    i = calls.index("replace LAST")
    assert calls[i - 1] == "fsync" and calls[i + 1] == "fsync", calls  # file before, directory after


# ---- recovery_lost_synced ------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Entries 1..30, one synced Ready each (entry + hard state), one segment."""
    path = str(tmp_path_factory.mktemp("pristine") / "data")
    s = DiskStorage.open(path, logger=LOG)
    for i in range(1, 31):
        s.append(ents(i, i))
        s.set_hardstate(pb.HardState(term=1, vote=1, commit=max(0, i - 2)))
        s.sync()
    s.close()
    return path


@pytest.fixture
def copy(pristine, tmp_path):
    dst = str(tmp_path / "data")
    shutil.copytree(pristine, dst)
    return dst


def last_segment(path: str) -> str:
    return list_segments(wal_dir(path))[-1][1]


def records(seg: str) -> list[tuple[int, int, int]]:
    """(kind, offset, end) of every record."""
    return [(k, off, off + HEADER_SIZE + len(p)) for k, p, off in scan_segment(0, seg).records]


def reopen(path: str) -> DiskStorage:
    s = DiskStorage.open(path, logger=LOG)
    s.close()
    return s


def test_clean_start_and_clean_restart_lost_nothing(tmp_path):
    path = str(tmp_path / "data")
    s = DiskStorage.open(path, logger=LOG)
    assert s.recovery_lost_synced is False
    s.append(ents(1, 3))
    s.sync()
    s.close()
    assert reopen(path).recovery_lost_synced is False


@pytest.mark.parametrize("cut", [1, 5, HEADER_SIZE, HEADER_SIZE + 3])
def test_last_record_cut_short_by_the_end_of_file_is_a_crash(copy, cut):
    seg = last_segment(copy)
    _kind, off, _end = records(seg)[-1]
    os.truncate(seg, off + cut)
    s = reopen(copy)
    assert s.last_index() == 30
    assert s.recovery_lost_synced is False


@pytest.mark.parametrize("zeros", [1, HEADER_SIZE, 4096])
def test_zeros_after_the_last_record_are_an_unwritten_extension(copy, zeros):
    with open(last_segment(copy), "ab") as f:
        f.write(bytes(zeros))
    assert reopen(copy).recovery_lost_synced is False


def test_last_record_whose_sectors_read_as_zeros_is_a_crash(copy):
    seg = last_segment(copy)
    _kind, off, _end = records(seg)[-2]  # the last entry, then its hard state
    with open(seg, "r+b") as f:
        f.seek(off)
        f.write(bytes(os.path.getsize(seg) - off))
    s = reopen(copy)
    assert s.last_index() == 29
    assert s.recovery_lost_synced is False


def test_record_complete_but_for_a_zero_sector_is_a_crash(tmp_path):
    path = str(tmp_path / "data")
    s = DiskStorage.open(path, logger=LOG)
    s.append(ents(1, 2))
    s.sync()
    s.append([pb.Entry(index=3, term=1, data=b"\x01" * 3000)])
    s.sync()
    s.close()
    seg = last_segment(path)
    _kind, off, end = records(seg)[-1]
    sector = (off // SECTOR + 2) * SECTOR  # a whole sector inside the record's payload
    assert sector + SECTOR < end
    with open(seg, "r+b") as f:
        f.seek(sector)
        f.write(bytes(SECTOR))
    s = reopen(path)
    assert s.last_index() == 2
    assert s.recovery_lost_synced is False


@pytest.mark.parametrize("where", ["payload", "crc", "kind-to-garbage"])
def test_damage_inside_a_whole_last_record_may_have_been_synced(copy, where):
    seg = last_segment(copy)
    _kind, off, end = records(seg)[-1]
    pos = {"payload": end - 1, "crc": off + 5, "kind-to-garbage": off + 8}[where]
    with open(seg, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([0xEE if where == "kind-to-garbage" else b ^ 0x10]))
    s = reopen(copy)
    assert s.last_index() == 30
    assert s.recovery_lost_synced is True


def test_garbage_after_the_last_record_may_hide_synced_data(copy):
    with open(last_segment(copy), "ab") as f:
        f.write(b"\xa5" * 100)
    assert reopen(copy).recovery_lost_synced is True


def test_zeroed_header_followed_by_nonzero_bytes_may_hide_synced_data(copy):
    seg = last_segment(copy)
    _kind, off, _end = records(seg)[-2]
    with open(seg, "r+b") as f:
        f.seek(off)
        f.write(bytes(HEADER_SIZE))
    s = reopen(copy)
    assert s.last_index() == 29
    assert s.recovery_lost_synced is True


def test_hole_followed_by_valid_records_of_the_same_batch_may_hide_synced_data(tmp_path):
    path = str(tmp_path / "data")
    s = DiskStorage.open(path, logger=LOG)
    s.append(ents(1, 5))
    s.sync()
    s.append(ents(6, 15))
    s.sync()
    s.close()
    seg = last_segment(path)
    off = [o for k, o, _e in records(seg) if k == Kind.ENTRY][7]
    with open(seg, "r+b") as f:
        f.seek(off)
        f.write(bytes(40))
    s = reopen(path)
    assert s.last_index() == 7
    assert s.recovery_lost_synced is True


def test_commit_beyond_the_log_means_synced_entries_are_gone(tmp_path, caplog):
    path = str(tmp_path / "data")
    s = DiskStorage.open(path, logger=LOG)
    s.append(ents(1, 3))
    s.sync()
    # Records no DiskStorage writes (a hard state committing entries it does not hold):
    # what is left when synced entries vanish but the hard state after them stays.
    s._writer.add(Kind.HARDSTATE, pb.HardState(term=1, vote=1, commit=9).SerializeToString())
    s.sync()
    s.close()
    with caplog.at_level(logging.WARNING):
        s = reopen(path)
    assert s.recovery_lost_synced is True
    assert s.initial_state().hard_state.commit == 3
    assert not any("never acknowledged" in r.getMessage() for r in caplog.records)


def test_damaged_new_segment_that_last_does_not_name_held_nothing_acknowledged(tmp_path, monkeypatch):
    path = str(tmp_path / "data")
    s = open_ok(path)
    append_until_rotation(s)
    acked = crash_before_last_is_updated(s, monkeypatch)
    seg = last_segment(path)
    size = os.path.getsize(seg)
    os.truncate(seg, size - 3)  # its checkpoint torn: the power went during creation
    s = open_ok(path)
    try:
        assert s.last_index() == acked
        assert s.recovery_lost_synced is False
        assert read_last_seq(wal_dir(path)) == list_segments(wal_dir(path))[-1][0]
    finally:
        s.close()


def test_refused_damage_raises_instead_of_setting_the_flag(tmp_path):
    # Damage followed by a record of a later batch: acknowledged data, start refused.
    path = str(tmp_path / "data")
    s = DiskStorage.open(path, logger=LOG)
    s.append(ents(1, 5))
    s.sync()
    s.append(ents(6, 6))
    s.sync()
    s.close()
    seg = last_segment(path)
    off = [o for k, o, _e in records(seg) if k == Kind.ENTRY][2]
    with open(seg, "r+b") as f:
        f.seek(off + HEADER_SIZE)
        f.write(b"\xff")
    with pytest.raises(CorruptLog):
        DiskStorage.open(path, logger=LOG)


def test_last_naming_a_missing_segment_is_still_refused(tmp_path):
    path = str(tmp_path / "data")
    s = open_ok(path)
    append_until_rotation(s)
    s.close()
    write_last_seq(wal_dir(path), list_segments(wal_dir(path))[-1][0] + 1)
    with pytest.raises(CorruptLog, match="LAST"):
        open_ok(path)


def test_header_torn_at_a_sector_boundary_is_a_crash(tmp_path):
    # Found by the crash-state explorer: a record header straddling a sector boundary
    # whose second sector never reached the disk (zeros from the boundary on) was
    # taken for damage a crash cannot leave.
    path = str(tmp_path / "data")
    s = DiskStorage.open(path, logger=LOG)
    i = 0
    while True:
        i += 1
        s.append(ents(i, i))
        s.sync()
        seg = last_segment(path)
        _kind, off, _end = records(seg)[-1]
        boundary = (off // SECTOR + 1) * SECTOR
        if off < boundary < off + HEADER_SIZE:
            break
    s.close()
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:
        f.seek(boundary)
        f.write(bytes(size - boundary))
    s = reopen(path)
    assert s.last_index() == i - 1
    assert s.recovery_lost_synced is False


def test_whole_zero_sectors_before_records_of_the_same_write_are_a_power_cut(tmp_path):
    """A power cut can persist an unsynced write's sectors out of order: a hole of
    whole zero sectors followed by valid records of that same write is a crash state,
    cut without recovery_lost_synced (otherwise one power cut over a whole cluster
    could leave a majority withholding votes forever)."""
    path = str(tmp_path / "data")
    s = DiskStorage.open(path, logger=LOG)
    s.append(ents(1, 5))
    s.sync()
    s.append(ents(6, 40))
    s.sync()  # one batch: entries 6..40 written by one write
    s.close()
    seg = last_segment(path)
    offs = [o for k, o, _e in records(seg) if k == Kind.ENTRY]
    hole = (offs[10] // SECTOR + 1) * SECTOR  # a whole sector after entry 11 starts
    assert hole + SECTOR < offs[-1]  # valid records of the same write follow it
    with open(seg, "r+b") as f:
        f.seek(hole)
        f.write(bytes(SECTOR))
    s = reopen(path)
    assert 6 <= s.last_index() < 40
    assert s.recovery_lost_synced is False
