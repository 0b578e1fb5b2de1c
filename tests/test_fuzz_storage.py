"""Fuzzing of the storage decoders (tests/fuzz_storage.py): a CI-sized run, and
every crasher it found, each as its own regression test (a record with a valid
checksum around a payload its kind cannot decode, a Rust abort height out of
u64 range, an undecodable snapshot file)."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import zlib

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft.disk import DiskStorage
from raft.errors import CorruptLog
from raft.snapshot import decode_snapshot_file
from raft.wal import HEADER, HEADER_SIZE, Kind, list_segments, scan_segment
from tests.fuzz_storage import fuzz

LOG = logging.getLogger("test.fuzz")
CI_INPUTS = int(os.environ.get("FUZZ_STORAGE_INPUTS", "5000"))


def test_damaged_storage_files_are_recovered_or_refused_with_corruptlog_only(capsys):
    scratch = tempfile.mkdtemp(
        prefix="fuzz-storage-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    )
    try:
        res = fuzz(CI_INPUTS, seed=int(os.environ.get("FUZZ_STORAGE_SEED", "7")), scratch=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with capsys.disabled():
        print(
            f"\nfuzz-storage: {res.inputs} inputs: {res.opened} recovered, {res.refused} refused, "
            f"{len(res.crashers)} crashers"
        )
    assert not res.crashers, "\n".join(res.crashers[:5])
    assert res.opened > CI_INPUTS // 10 and res.refused > CI_INPUTS // 10, (
        "the damage is neither all fatal nor all harmless"
    )


# ---- regression tests of the crashers found ------------------------------------------


def frame(kind: int, payload: bytes, batch: int = 0) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<BI", kind, batch)))
    return HEADER.pack(len(payload), crc, kind, batch) + payload


def store_with(tmp_path, replace_kind: Kind, payload: bytes) -> str:
    """A store whose first `replace_kind` record after the segment head is replaced by
    a record of that kind with a valid checksum around `payload`."""
    path = str(tmp_path / "data")
    s = DiskStorage.open(path, logger=LOG)
    s.append([pb.Entry(index=i, term=1, data=b"e") for i in range(1, 4)])
    s.set_hardstate(pb.HardState(term=1, vote=1, commit=2))
    s.sync()
    s.set_abort_height(9)
    snap = pb.Snapshot(data=b"s")
    snap.metadata.index, snap.metadata.term = 10, 2
    s.apply_snapshot(snap)
    s.sync()
    s.close()
    seg = list_segments(os.path.join(path, "raft-store", "wal"))[-1][1]
    recs = scan_segment(0, seg).records
    kind, old, off = next(
        r for r in recs if r[0] == replace_kind and (r[2] > recs[4][2] or replace_kind == Kind.SEGMENT)
    )
    with open(seg, "rb") as f:
        data = f.read()
    batch = struct.unpack_from("<I", data, off + 9)[0]
    data = data[:off] + frame(kind, payload, batch) + data[off + HEADER_SIZE + len(old) :]
    with open(seg, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize(
    "kind",
    [Kind.ENTRY, Kind.HARDSTATE, Kind.SNAPSHOT, Kind.ABORT_HEIGHT, Kind.SEGMENT],
)
@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab"])
def test_valid_checksum_around_an_undecodable_payload_is_corruption(tmp_path, kind, payload):
    # Before: google.protobuf DecodeError or struct.error escaped DiskStorage.open.
    path = store_with(tmp_path, kind, payload)
    with pytest.raises(CorruptLog, match=f"undecodable.*{'SEGMENT' if kind == Kind.SEGMENT else ''}"):
        DiskStorage.open(path, logger=LOG)


@pytest.mark.parametrize("raw", [b"-1", b"18446744073709551616"])
def test_rust_abort_height_outside_u64_is_skipped_with_a_warning(tmp_path, caplog, raw):
    # Before: struct.error ("argument out of range") while writing the first segment.
    path = tmp_path / "data"
    path.mkdir()
    (path / "abort_height").write_bytes(raw)
    with caplog.at_level(logging.WARNING):
        s = DiskStorage.open(str(path), logger=LOG)
    assert s.abort_height() == 0
    assert any("ignoring unreadable" in r.getMessage() for r in caplog.records)
    s.close()


def test_snapshot_file_with_a_valid_checksum_around_garbage_is_a_valueerror():
    # Before: DecodeError (SnapshotStore.load caught it only because it caught everything).
    with pytest.raises(ValueError, match="undecodable"):
        decode_snapshot_file(frame(Kind.SNAPSHOT, b"\xff\xff\xff"), 0, 0)
