"""WAL file mechanics: framing, reading back, torn-tail detection, rotation,
segment deletion and fail-closed behaviour on disk errors (raft/wal.py)."""

from __future__ import annotations

import errno
import logging
import os
import zlib

import pytest

from raft.errors import DiskFailure
from raft.wal import (
    HEADER,
    HEADER_SIZE,
    Kind,
    SegmentScan,
    WalWriter,
    acknowledged_after,
    encode_record,
    list_segments,
    read_records,
    scan_segment,
    segment_name,
)
from tests.crash_sim import crash_wal

LOG = logging.getLogger("test.wal")


def head(seq: int) -> list[tuple[int, bytes]]:
    return [(Kind.SEGMENT, seq.to_bytes(8, "little"))]


def new_writer(tmp_path, segment_bytes: int = 1 << 20) -> WalWriter:
    return WalWriter.create(str(tmp_path), 1, head(1), segment_bytes, LOG, [(1, 0)])


def read(data: bytes) -> SegmentScan:
    scan = SegmentScan(seq=0, path="")
    read_records(data, scan)
    return scan


def test_record_frame_is_length_crc_kind_batch_payload():
    payload = b"hello raft"
    rec = encode_record(Kind.ENTRY, payload, batch=4242)
    length, crc, kind, batch = HEADER.unpack_from(rec)
    assert (length, kind, batch) == (len(payload), Kind.ENTRY, 4242)
    assert crc == zlib.crc32(rec[8:]), "CRC must cover kind + batch + payload"
    assert rec[HEADER_SIZE:] == payload


def test_records_read_back_in_order_with_offsets():
    recs = [(Kind.ENTRY, b"a" * n) for n in (0, 1, 100, 5000)] + [(Kind.HARDSTATE, b"")]
    data = b"".join(encode_record(k, p) for k, p in recs)
    scan = read(data)
    assert scan.damage is None
    assert [(k, p) for k, p, _ in scan.records] == recs
    offsets = [off for _, _, off in scan.records]
    assert offsets[0] == 0 and offsets[1] == HEADER_SIZE
    assert scan.good_end == len(data)


@pytest.mark.parametrize(
    "mangle, why, intact",
    [
        (lambda d: d[:-1], "runs past the end", 1),
        (lambda d: d[:5], "incomplete record header", 0),
        (lambda d: d[:-3] + bytes([d[-3] ^ 0x10]) + d[-2:], "checksum mismatch", 1),
        (lambda d: d + bytes(20), "unknown record kind 0", 2),
    ],
)
def test_damage_stops_reading_and_says_why(mangle, why, intact):
    good = encode_record(Kind.ENTRY, b"x" * 40)
    data = mangle(good + encode_record(Kind.ENTRY, b"y" * 40))
    scan = read(data)
    assert scan.damage is not None and why in scan.damage
    assert len(scan.records) == intact
    assert scan.good_end == intact * len(good), "reading stops exactly at the damaged record"


def test_only_a_record_of_a_later_batch_proves_the_damage_was_synced():
    a = encode_record(Kind.ENTRY, b"a" * 30, batch=0)
    flipped = bytearray(a)
    flipped[HEADER_SIZE + 3] ^= 1
    same_batch = encode_record(Kind.HARDSTATE, b"\x08\x01", batch=0)
    later_batch = encode_record(Kind.HARDSTATE, b"\x08\x02", batch=len(a) + len(same_batch))
    data = bytes(flipped) + same_batch + later_batch
    assert acknowledged_after(data, 0) == len(a) + len(same_batch)
    assert acknowledged_after(bytes(flipped) + same_batch, 0) is None, "same batch: maybe never synced"
    assert acknowledged_after(a + bytes(4096), len(a)) is None
    assert acknowledged_after(bytes(flipped), 0) is None


def test_writer_buffers_until_sync_then_fsyncs(tmp_path, monkeypatch):
    w = new_writer(tmp_path)
    start = w.offset
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    w.add(Kind.ENTRY, b"e1")
    w.add(Kind.ENTRY, b"e2")
    assert os.path.getsize(tmp_path / segment_name(1)) == start, "records are buffered until sync"
    assert w.dirty
    w.sync()
    assert len(calls) == 1
    assert w.synced_offset == w.offset == start + 2 * (HEADER_SIZE + 2)
    w.sync()
    assert len(calls) == 1, "a sync with nothing new must not fsync again"
    scan = scan_segment(1, str(tmp_path / segment_name(1)))
    assert [p for _, p, _ in scan.records] == [(1).to_bytes(8, "little"), b"e1", b"e2"]
    w.close()


@pytest.mark.parametrize("failing", ["write", "fsync"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_disk_errors_fail_closed(tmp_path, monkeypatch, failing, code):
    w = new_writer(tmp_path)
    w.add(Kind.ENTRY, b"before")
    w.sync()

    def boom(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, failing, boom)
    w.add(Kind.ENTRY, b"lost")
    with pytest.raises(DiskFailure) as info:
        w.sync()
    assert errno.errorcode[code] in str(info.value)
    monkeypatch.undo()
    # Even with the disk "working" again, the writer must not pretend anything.
    with pytest.raises(DiskFailure):
        w.add(Kind.ENTRY, b"after") or w.sync()
    with pytest.raises(DiskFailure):
        w.flush()
    w.close()


def test_rotation_syncs_old_segment_and_creates_new_one(tmp_path):
    w = new_writer(tmp_path, segment_bytes=200)
    for i in range(10):
        w.add(Kind.ENTRY, bytes([i]) * 30)
    assert w.should_rotate()
    w.rotate(head(2), prev_index=10)
    assert w.seq == 2 and w.segments == [(1, 0), (2, 10)]
    assert [s for s, _ in list_segments(str(tmp_path))] == [1, 2]
    first = scan_segment(1, str(tmp_path / segment_name(1)))
    assert first.damage is None and len(first.records) == 11, "old segment fully written before rotating"
    w.add(Kind.ENTRY, b"in two")
    w.sync()
    second = scan_segment(2, str(tmp_path / segment_name(2)))
    assert [p for _, p, _ in second.records][-1] == b"in two"
    w.close()


def test_delete_below_keeps_segments_a_snapshot_does_not_cover(tmp_path):
    w = new_writer(tmp_path, segment_bytes=10)
    for seq, prev in [(2, 100), (3, 200), (4, 300)]:
        w.add(Kind.ENTRY, b"x")
        w.rotate(head(seq), prev_index=prev)
    assert w.delete_below(99) == 0
    # Segment 1 holds entries <= 100 (segment 2 starts after 100); 2 holds 101..200.
    assert w.delete_below(150) == 1
    assert [s for s, _ in list_segments(str(tmp_path))] == [2, 3, 4]
    assert w.delete_below(10_000) == 2, "the active segment is never deleted"
    assert [s for s, _ in list_segments(str(tmp_path))] == [4]
    w.close()


def test_records_carry_the_offset_where_their_sync_batch_began(tmp_path):
    w = new_writer(tmp_path)
    first_batch = w.synced_offset
    w.add(Kind.ENTRY, b"1")
    w.add(Kind.ENTRY, b"2")
    w.sync()
    second_batch = w.synced_offset
    w.add(Kind.ENTRY, b"3")
    w.sync()
    w.close()
    data = (tmp_path / segment_name(1)).read_bytes()
    batches = [HEADER.unpack_from(data, off)[3] for _, _, off in read(data).records]
    assert batches == [0, first_batch, first_batch, second_batch]


def test_simulate_crash_drops_unsynced_bytes(tmp_path):
    w = new_writer(tmp_path)
    w.add(Kind.ENTRY, b"durable")
    w.sync()
    synced = w.synced_offset
    w.add(Kind.ENTRY, b"written but not synced")
    w.flush()
    w.add(Kind.ENTRY, b"only buffered")
    crash_wal(w)
    assert os.path.getsize(tmp_path / segment_name(1)) == synced
    with pytest.raises(DiskFailure):
        w.add(Kind.ENTRY, b"x") or w.sync()


def test_simulate_crash_can_leave_a_torn_record(tmp_path):
    w = new_writer(tmp_path)
    w.add(Kind.ENTRY, b"durable")
    w.sync()
    w.add(Kind.ENTRY, b"z" * 100)
    crash_wal(w, torn_bytes=50, garbage=bytes(7))
    scan = scan_segment(1, str(tmp_path / segment_name(1)))
    assert scan.damage is not None and scan.acknowledged_after is None
    assert [p for _, p, _ in scan.records][-1] == b"durable"
