"""Recovery from damaged files: a torn tail of the last segment is cut with one
warning naming file and offset; every other kind of damage stops the start
with CorruptLog naming file, offset and what to do (raft/disk.py, raft/wal.py)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft.disk import DiskStorage
from raft.errors import CorruptLog
from raft.wal import HEADER_SIZE, Kind, WalWriter, list_segments, scan_segment
from tests.crash_sim import simulate_crash

LOG = logging.getLogger("test.corruption")


def ents(lo: int, hi: int, term: int = 1) -> list[pb.Entry]:
    return [pb.Entry(index=i, term=term, data=b"entry-%d" % i) for i in range(lo, hi + 1)]


def build(path: str, n: int = 30, segment_bytes: int = 1 << 20) -> None:
    """A store with entries 1..n, each Ready synced, then closed."""
    s = DiskStorage.open(path, logger=LOG, segment_bytes=segment_bytes)
    for i in range(1, n + 1):
        s.append(ents(i, i))
        s.set_hardstate(pb.HardState(term=1, vote=1, commit=max(0, i - 2)))
        s.sync()
    s.close()


def wal_dir(path: str) -> str:
    return os.path.join(path, "raft-store", "wal")


def entry_records(seg_path: str) -> list[tuple[int, int]]:
    """(offset, end) of every ENTRY record in a segment."""
    scan = scan_segment(0, seg_path)
    return [(off, off + HEADER_SIZE + len(p)) for k, p, off in scan.records if k == Kind.ENTRY]


def open_ok(path: str, **kw) -> DiskStorage:
    return DiskStorage.open(path, logger=LOG, **kw)


def torn_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tail cut in" in r.getMessage()]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pristine") / "data")
    build(path)
    return path


@pytest.fixture
def copy_of(pristine, tmp_path):
    def make() -> str:
        dst = str(tmp_path / "data")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(pristine, dst)
        return dst

    return make


def test_last_record_truncated_at_every_byte_is_cut_with_one_warning(copy_of, caplog):
    path = copy_of()
    seg = list_segments(wal_dir(path))[-1][1]
    with open(seg, "rb") as f:
        data = f.read()
    # The last Ready wrote an ENTRY then a HARDSTATE record; cut inside either.
    last_entry_off, last_entry_end = entry_records(seg)[-1]
    for cut in range(last_entry_off + 1, len(data)):
        path = copy_of()
        with open(seg, "wb") as f:
            f.write(data[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            s = open_ok(path)
        try:
            warnings = torn_warnings(caplog)
            if cut == last_entry_end:  # a record boundary: nothing torn
                assert warnings == [], f"cut={cut}: {warnings}"
            else:
                assert len(warnings) == 1, f"cut={cut}: {warnings}"
                assert seg in warnings[0]
            assert s.last_index() == (30 if cut >= last_entry_end else 29), f"cut={cut}"
        finally:
            s.close()
        # The cut is physical: the next open is clean.
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            open_ok(path).close()
        assert torn_warnings(caplog) == []


@pytest.mark.parametrize("zeros", [1, HEADER_SIZE, 100, 4096])
def test_zero_filled_tail_is_cut(copy_of, caplog, zeros):
    path = copy_of()
    seg = list_segments(wal_dir(path))[-1][1]
    size = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(bytes(zeros))
    with caplog.at_level(logging.WARNING):
        s = open_ok(path)
    assert s.last_index() == 30
    [warning] = torn_warnings(caplog)
    assert f"offset {size}" in warning
    s.close()
    assert os.path.getsize(seg) == size


def test_last_record_zeroed_in_place_is_cut(copy_of, caplog):
    path = copy_of()
    seg = list_segments(wal_dir(path))[-1][1]
    off, end = entry_records(seg)[-1]
    with open(seg, "r+b") as f:
        f.seek(off)
        f.write(bytes(os.path.getsize(seg) - off))  # the page never reached the disk
    with caplog.at_level(logging.WARNING):
        s = open_ok(path)
    assert s.last_index() == 29
    assert len(torn_warnings(caplog)) == 1
    s.close()


REGIONS = {"length": 0, "crc": 5, "kind": 8, "payload-start": HEADER_SIZE, "payload-end": -1}


@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("bit", [0, 7])
def test_bit_flip_in_a_middle_record_is_corruption(copy_of, region, bit):
    path = copy_of()
    seg = list_segments(wal_dir(path))[-1][1]
    off, end = entry_records(seg)[10]
    pos = off + REGIONS[region] if REGIONS[region] >= 0 else end - 1
    with open(seg, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ (1 << bit)]))
    with pytest.raises(CorruptLog) as info:
        open_ok(path)
    msg = str(info.value)
    assert seg in msg and f"offset {off}" in msg, msg
    assert "restore" in msg, "the error says what to do"


@pytest.mark.parametrize("region", REGIONS)
def test_bit_flip_in_the_last_record_of_the_last_segment_is_cut_as_lost_synced_data(copy_of, caplog, region):
    # The end of the log: cut, loudly. A crash cannot flip a bit in a whole record, so
    # the record may have been synced: recovery says so (a length made larger looks
    # like a record cut short by the end of the file, as a crash leaves it).
    path = copy_of()
    seg = list_segments(wal_dir(path))[-1][1]
    off = scan_segment(0, seg).records[-1][2]
    end = os.path.getsize(seg)
    pos = off + REGIONS[region] if REGIONS[region] >= 0 else end - 1
    with open(seg, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x04]))
    with caplog.at_level(logging.WARNING):
        s = open_ok(path)
    assert s.last_index() == 30, "the last record was the hard state; entries are intact"
    [warning] = torn_warnings(caplog)
    assert f"offset {off}" in warning
    grew = region == "length" and not byte & 0x04
    assert s.recovery_lost_synced is not grew
    assert ("looks like a write interrupted by a crash" in warning) is grew
    s.close()


@pytest.fixture(scope="module")
def multi_segment(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("multi") / "data")
    build(path, n=60, segment_bytes=600)
    assert len(list_segments(wal_dir(path))) >= 4
    return path


def copy_multi(multi_segment, tmp_path) -> str:
    dst = str(tmp_path / "data")
    shutil.copytree(multi_segment, dst)
    return dst


@pytest.mark.parametrize("which", ["first-record", "last-record"])
def test_damage_in_an_earlier_segment_is_corruption_even_at_its_end(multi_segment, tmp_path, which):
    path = copy_multi(multi_segment, tmp_path)
    seg = list_segments(wal_dir(path))[1][1]
    recs = scan_segment(0, seg).records
    off = recs[0][2] if which == "first-record" else recs[-1][2]
    with open(seg, "r+b") as f:
        f.seek(off + HEADER_SIZE)
        b = f.read(1)[0]
        f.seek(off + HEADER_SIZE)
        f.write(bytes([b ^ 1]))
    with pytest.raises(CorruptLog, match=f"{os.path.basename(seg)} at offset {off}"):
        open_ok(path)


def test_truncated_earlier_segment_is_corruption(multi_segment, tmp_path):
    path = copy_multi(multi_segment, tmp_path)
    seg = list_segments(wal_dir(path))[1][1]
    os.truncate(seg, os.path.getsize(seg) - 3)
    with pytest.raises(CorruptLog, match="not the last segment"):
        open_ok(path)


@pytest.mark.parametrize("how", ["delete", "rename"])
def test_missing_middle_segment_is_corruption(multi_segment, tmp_path, how):
    path = copy_multi(multi_segment, tmp_path)
    seg = list_segments(wal_dir(path))[2][1]
    if how == "delete":
        os.unlink(seg)
    else:
        os.rename(seg, seg + ".bak")
    with pytest.raises(CorruptLog, match="missing"):
        open_ok(path)


def test_missing_last_segment_is_corruption(multi_segment, tmp_path):
    path = copy_multi(multi_segment, tmp_path)
    os.unlink(list_segments(wal_dir(path))[-1][1])
    with pytest.raises(CorruptLog, match="LAST"):
        open_ok(path)


def test_missing_first_segment_is_corruption(multi_segment, tmp_path):
    path = copy_multi(multi_segment, tmp_path)
    os.unlink(list_segments(wal_dir(path))[0][1])
    with pytest.raises(CorruptLog, match="no usable snapshot"):
        open_ok(path)


def test_segment_copied_over_another_is_corruption(multi_segment, tmp_path):
    path = copy_multi(multi_segment, tmp_path)
    segs = list_segments(wal_dir(path))
    shutil.copyfile(segs[1][1], segs[2][1])
    with pytest.raises(CorruptLog, match="renamed or copied"):
        open_ok(path)


def test_gap_in_entry_indexes_is_corruption(tmp_path):
    path = str(tmp_path / "data")
    s = open_ok(path)
    s.append(ents(1, 3))
    s.sync()
    # Write a record sequence the DiskStorage would never write: 3 then 5.
    w: WalWriter = s._writer
    w.add(Kind.ENTRY, pb.Entry(index=5, term=1).SerializeToString())
    w.add(Kind.HARDSTATE, pb.HardState(term=1).SerializeToString())
    s.close()
    with pytest.raises(CorruptLog, match="entry index=5 does not follow last index=3"):
        open_ok(path)


def test_crash_while_creating_a_segment_leaves_an_empty_one_that_is_removed(multi_segment, tmp_path, caplog):
    path = copy_multi(multi_segment, tmp_path)
    segs = list_segments(wal_dir(path))
    newest, _ = segs[-1]
    empty = os.path.join(wal_dir(path), f"{newest + 1:016x}.wal")
    open(empty, "wb").close()
    with caplog.at_level(logging.WARNING):
        s = open_ok(path, segment_bytes=600)
    assert s.last_index() == 60
    assert not os.path.exists(empty)
    s.append(ents(61, 61))
    s.sync()
    s.close()
    assert open_ok(path).last_index() == 61


# ---- snapshot files ------------------------------------------------------------------


def snapshots_store(path: str) -> DiskStorage:
    """Entries 1..400 over many small segments, snapshots at 200 and 380."""
    s = DiskStorage.open(path, logger=LOG, segment_bytes=1024)
    for lo in range(1, 400, 20):
        s.append(ents(lo, lo + 19))
        s.set_hardstate(pb.HardState(term=1, commit=lo + 19))
        s.sync()
    s.create_snapshot(200, pb.ConfState(voters=[1]), b"state@200")
    s.create_snapshot(380, pb.ConfState(voters=[1]), b"state@380")
    s.compact(381)
    s.close()
    return s


def snap_files(path: str) -> list[str]:
    d = os.path.join(path, "raft-store", "snap")
    return sorted(os.path.join(d, n) for n in os.listdir(d))


def flip_middle_byte(file: str) -> None:
    with open(file, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(data)


def test_corrupt_newest_snapshot_falls_back_when_the_wal_covers_the_gap(tmp_path, caplog):
    path = str(tmp_path / "data")
    snapshots_store(path)
    older, newest = snap_files(path)
    flip_middle_byte(newest)
    with caplog.at_level(logging.WARNING):
        s = open_ok(path)
    try:
        assert s.snapshot(0, 0).data == b"state@200"
        assert s.first_index() <= 201 and s.last_index() == 400
        assert [e.index for e in s.entries(201, 401)] == list(range(201, 401))
        assert any("damaged" in r.getMessage() for r in caplog.records)
        assert os.path.exists(newest + ".corrupt"), "the damaged file is kept for the operator"
    finally:
        s.close()


def test_corrupt_snapshots_without_wal_cover_is_a_clear_error(tmp_path):
    path = str(tmp_path / "data")
    snapshots_store(path)
    for f in snap_files(path):
        flip_middle_byte(f)
    with pytest.raises(CorruptLog, match="no usable snapshot"):
        open_ok(path)


def test_newest_snapshot_damaged_and_older_deleted_is_a_clear_error(tmp_path):
    path = str(tmp_path / "data")
    s = DiskStorage.open(path, logger=LOG, segment_bytes=1024)
    for lo in range(1, 400, 20):
        s.append(ents(lo, lo + 19))
        s.set_hardstate(pb.HardState(term=1, commit=lo + 19))
        s.sync()
    for index in (100, 200, 380):
        s.create_snapshot(index, pb.ConfState(voters=[1]), b"s%d" % index)
    s.close()
    older, newest = snap_files(path)
    flip_middle_byte(newest)
    os.unlink(older)
    # Snapshot 100 was pruned and segments up to 200 deleted: nothing covers 1..200.
    with pytest.raises(CorruptLog, match="starts after index 200 but there is no usable snapshot"):
        open_ok(path)


def test_installed_snapshot_with_damaged_file_is_recovered_from_the_wal(tmp_path):
    path = str(tmp_path / "data")
    s = open_ok(path)
    snap = pb.Snapshot(data=b"cfg", metadata=pb.SnapshotMetadata(index=50, term=3))
    s.apply_snapshot(snap)
    s.append(ents(51, 55, 3))
    s.sync()
    s.close()
    [file] = snap_files(path)
    flip_middle_byte(file)
    s = open_ok(path)
    try:
        assert s.snapshot(0, 0) == snap
        assert (s.first_index(), s.last_index()) == (51, 55)
    finally:
        s.close()
    assert any(f.endswith(".snap") for f in snap_files(path)), "the file is rewritten from the WAL"


def test_snapshot_installed_but_wal_record_lost_is_adopted(tmp_path):
    path = str(tmp_path / "data")
    s = open_ok(path)
    s.append(ents(1, 10, 1))
    s.set_hardstate(pb.HardState(term=1, commit=4))
    s.sync()
    snap = pb.Snapshot(data=b"cfg", metadata=pb.SnapshotMetadata(index=40, term=2))
    snap.metadata.conf_state.voters.extend([1, 2])
    s.apply_snapshot(snap)  # the file is durable at once, the WAL record is not yet
    simulate_crash(s)
    s = open_ok(path)
    try:
        assert (s.first_index(), s.last_index()) == (41, 40)
        assert s.snapshot(0, 0) == snap
        assert list(s.initial_state().conf_state.voters) == [1, 2]
        assert s.initial_state().hard_state.commit == 40
        assert (s.applied_index(), s.applied_data()) == (40, b"cfg")
    finally:
        s.close()


# ---- power cut: pages of the last, unsynced batch persisted out of order ------------


def batch_store(path: str, later_batch: bool) -> tuple[str, int]:
    """Entries 1..5 synced, then 6..15 + hard state as one batch (and, with
    `later_batch`, entry 16 in a batch of its own). Returns (segment, offset of entry 8)."""
    s = open_ok(path)
    s.append(ents(1, 5))
    s.sync()
    s.append(ents(6, 15))
    s.set_hardstate(pb.HardState(term=1, commit=5))
    s.sync()
    if later_batch:
        s.append(ents(16, 16))
        s.sync()
    s.close()
    seg = list_segments(wal_dir(path))[-1][1]
    return seg, entry_records(seg)[7][0]


def punch_hole(seg: str, offset: int, length: int = 40) -> None:
    with open(seg, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


def test_hole_inside_the_last_batch_is_a_torn_tail(tmp_path, caplog):
    # The records after the hole belong to the same (maybe never synced) batch.
    path = str(tmp_path / "data")
    seg, off = batch_store(path, later_batch=False)
    punch_hole(seg, off)
    with caplog.at_level(logging.WARNING):
        s = open_ok(path)
    try:
        assert s.last_index() == 7
        [warning] = torn_warnings(caplog)
        assert f"offset {off}" in warning
    finally:
        s.close()


def test_hole_in_a_batch_followed_by_a_later_batch_is_corruption(tmp_path):
    # A later batch exists, so the damaged one had been fsynced: acknowledged data.
    path = str(tmp_path / "data")
    seg, off = batch_store(path, later_batch=True)
    punch_hole(seg, off)
    with pytest.raises(CorruptLog, match=f"offset {off}.*later sync"):
        open_ok(path)


def test_newest_segment_emptied_after_it_was_in_use_is_corruption(multi_segment, tmp_path):
    # LAST names it, so its header had been fsynced: an empty file means lost data.
    path = copy_multi(multi_segment, tmp_path)
    os.truncate(list_segments(wal_dir(path))[-1][1], 0)
    with pytest.raises(CorruptLog, match="no valid SEGMENT record"):
        open_ok(path)


def test_entries_kept_without_their_hard_state_lift_the_term(tmp_path, caplog):
    path = str(tmp_path / "data")
    s = open_ok(path)
    s.append(ents(1, 3, term=1))
    s.set_hardstate(pb.HardState(term=1, vote=1, commit=2))
    s.sync()
    s.append(ents(4, 5, term=2))
    s.set_hardstate(pb.HardState(term=2, vote=3, commit=2))

    class TornInTheHardState:  # drives simulate_crash(rng) to keep all but the last 3 bytes
        def random(self) -> float:
            return 0.6

        def randint(self, lo: int, hi: int) -> int:
            return hi - 3

    simulate_crash(s, TornInTheHardState())
    with caplog.at_level(logging.WARNING):
        s = open_ok(path)
    assert s.last_index() == 5
    assert s.initial_state().hard_state == pb.HardState(term=2, vote=0, commit=2), "term covers the entries"
    assert any("behind last entry term=2" in r.getMessage() for r in caplog.records)
    s.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s = open_ok(path)
    assert s.initial_state().hard_state.term == 2 and not caplog.records, "the repair was written back"
    s.close()
