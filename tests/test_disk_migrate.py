"""Import of the Rust consensus_raft files on first start (raft/migrate.py,
DiskStorage.open): state carried over, originals untouched, logged once."""

from __future__ import annotations

import logging
import os

import pytest
from google.protobuf.internal.encoder import _VarintBytes

from cita_raft_pb import common_pb2
from cita_raft_pb import eraftpb_pb2 as pb
from raft.disk import DiskStorage
from raft.errors import CorruptLog
from raft.migrate import decode_length_delimited

LOG = logging.getLogger("test.migrate")


def length_delimited(msg) -> bytes:
    """What prost's encode_length_delimited writes: varint length, then the message."""
    body = msg.SerializeToString()
    return _VarintBytes(len(body)) + body


def rust_snapshot(index=120, term=7, height=118) -> pb.Snapshot:
    cfg = common_pb2.ConsensusConfiguration(
        height=height, block_interval=3, validators=[b"\x11" * 20, b"\x22" * 20]
    )
    snap = pb.Snapshot(data=cfg.SerializeToString())
    snap.metadata.index, snap.metadata.term = index, term
    snap.metadata.conf_state.voters.extend([101, 202])
    return snap


def write_rust_dir(path, snapshot=None, entry=None, abort=None) -> dict[str, bytes]:
    path.mkdir(parents=True, exist_ok=True)
    files = {}
    if snapshot is not None:
        files["raft-snapshot"] = snapshot if isinstance(snapshot, bytes) else length_delimited(snapshot)
    if entry is not None:
        files["raft-entry"] = entry if isinstance(entry, bytes) else length_delimited(entry)
    if abort is not None:
        files["abort_height"] = abort
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def test_varint_decoding_matches_protobuf():
    for n in (0, 1, 127, 128, 300, 16384, 2**40):
        body = b"x" * min(n, 1000)
        if n <= 1000:
            assert decode_length_delimited(_VarintBytes(n) + body) == body
    with pytest.raises(ValueError):
        decode_length_delimited(_VarintBytes(10) + b"short")
    with pytest.raises(ValueError):
        decode_length_delimited(b"\x80\x80")


def test_import_carries_snapshot_entry_and_abort_height(tmp_path, caplog):
    snap = rust_snapshot()
    entry = pb.Entry(index=121, term=8, data=b"proposal@119")
    files = write_rust_dir(tmp_path, snap, entry, b"130\n")
    with caplog.at_level(logging.INFO):
        s = DiskStorage.open(str(tmp_path), logger=LOG)
    try:
        assert s.snapshot(0, 0) == snap
        assert (s.first_index(), s.last_index()) == (121, 121)
        assert s.entries(121, 122) == [entry]
        st = s.initial_state()
        assert st.hard_state == pb.HardState(term=8, vote=0, commit=120)
        assert list(st.conf_state.voters) == [101, 202]
        assert s.applied_index() == 120
        cfg = common_pb2.ConsensusConfiguration.FromString(s.applied_data())
        assert (cfg.height, cfg.block_interval, len(cfg.validators)) == (118, 3, 2)
        assert s.abort_height() == 130
    finally:
        s.close()
    [msg] = [r.getMessage() for r in caplog.records if "imported the Rust" in r.getMessage()]
    assert "index=120" in msg and "abort_height=130" in msg
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data, f"original {name} must be kept untouched"


def test_import_happens_only_on_first_start(tmp_path, caplog):
    write_rust_dir(tmp_path, rust_snapshot(), abort=b"5")
    s = DiskStorage.open(str(tmp_path), logger=LOG)
    s.set_abort_height(9)
    s.close()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        s = DiskStorage.open(str(tmp_path), logger=LOG)
    assert s.abort_height() == 9, "later starts use our own store, not the Rust files"
    assert not [r for r in caplog.records if "imported" in r.getMessage()]
    s.close()


def test_entry_not_following_the_snapshot_is_not_imported(tmp_path):
    write_rust_dir(tmp_path, rust_snapshot(index=120), pb.Entry(index=119, term=7, data=b"old"))
    s = DiskStorage.open(str(tmp_path), logger=LOG)
    assert (s.first_index(), s.last_index()) == (121, 120)
    s.close()


def test_empty_rust_files_mean_an_uninitialized_node(tmp_path):
    write_rust_dir(tmp_path, b"", b"", b"")
    s = DiskStorage.open(str(tmp_path), logger=LOG)
    assert (s.last_index(), s.snapshot(0, 0).metadata.index, s.abort_height()) == (0, 0, 0)
    s.close()


def test_bootstrap_snapshot_with_empty_data_imports(tmp_path):
    snap = pb.Snapshot()
    snap.metadata.index, snap.metadata.term = 5, 5
    snap.metadata.conf_state.voters.extend([1, 2, 3])
    write_rust_dir(tmp_path, snap)
    s = DiskStorage.open(str(tmp_path), logger=LOG)
    assert (s.first_index(), s.term(5), s.applied_data()) == (6, 5, b"")
    s.close()


@pytest.mark.parametrize("damage", ["partial", "garbage"])
def test_unreadable_rust_snapshot_stops_with_a_clear_error(tmp_path, damage):
    good = length_delimited(rust_snapshot())
    data = good[: len(good) // 2] if damage == "partial" else b"\x05\xff\xff\xff\xff\xff"
    write_rust_dir(tmp_path, data)
    with pytest.raises(CorruptLog, match="raft-snapshot"):
        DiskStorage.open(str(tmp_path), logger=LOG)
    assert not os.path.exists(tmp_path / "raft-store"), "nothing half-imported is left as our store"
    assert not os.path.exists(tmp_path / "raft-store.tmp")


def test_unreadable_entry_and_abort_height_are_skipped_with_a_warning(tmp_path, caplog):
    write_rust_dir(tmp_path, rust_snapshot(), b"\x30abc", b"not-a-number")
    with caplog.at_level(logging.WARNING):
        s = DiskStorage.open(str(tmp_path), logger=LOG)
    assert (s.last_index(), s.abort_height()) == (120, 0)
    assert len([r for r in caplog.records if "ignoring unreadable" in r.getMessage()]) == 2
    s.close()
