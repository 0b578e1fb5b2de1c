"""Snapshot files (raft/snapshot.py): atomic durable save, load newest first,
damaged files set aside, leftover temp files removed, pruning to two."""

from __future__ import annotations

import logging
import os

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft.errors import DiskFailure
from raft.snapshot import SnapshotStore, decode_snapshot_file, snapshot_name

LOG = logging.getLogger("test.snapshot")


def snap(index: int, term: int = 1, data: bytes = b"cfg") -> pb.Snapshot:
    s = pb.Snapshot(data=data + b"@%d" % index)
    s.metadata.index, s.metadata.term = index, term
    s.metadata.conf_state.voters.extend([1, 2, 3])
    return s


@pytest.fixture
def store(tmp_path) -> SnapshotStore:
    return SnapshotStore(str(tmp_path), LOG)


def test_save_then_load_round_trips(store, tmp_path):
    path = store.save(snap(7, 2))
    assert os.path.basename(path) == snapshot_name(7, 2)
    assert store.load() == [snap(7, 2)]
    assert os.listdir(tmp_path) == [snapshot_name(7, 2)], "no temp file left behind"


def test_save_fsyncs_file_before_rename_and_directory_after(store, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.save(snap(3))
    assert events[:3] == ["fsync-file", "rename", "fsync-dir"]


def test_keeps_the_newest_two(store):
    for i in (5, 9, 12, 20):
        store.save(snap(i))
    assert store.indexes() == [20, 12]
    assert [s.metadata.index for s in store.load()] == [20, 12]


def test_damaged_file_is_set_aside_and_older_one_used(store, tmp_path, caplog):
    store.save(snap(5))
    newest = store.save(snap(9))
    with open(newest, "r+b") as f:
        f.seek(12)
        b = f.read(1)[0]
        f.seek(12)
        f.write(bytes([b ^ 0x20]))
    with caplog.at_level(logging.WARNING):
        loaded = store.load()
    assert [s.metadata.index for s in loaded] == [5]
    assert os.path.exists(newest + ".corrupt")
    assert any(newest in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cut", [0, 1, 8, 9, 20])
def test_partial_file_is_damaged(store, cut):
    path = store.save(snap(4))
    with open(path, "rb") as f:
        data = f.read()
    with pytest.raises(ValueError):
        decode_snapshot_file(data[:cut], 4, 1)
    os.truncate(path, cut)
    assert store.load() == []


def test_file_whose_name_disagrees_with_its_content_is_damaged(store, tmp_path):
    path = store.save(snap(4))
    os.rename(path, os.path.join(tmp_path, snapshot_name(40, 1)))
    assert store.load() == []


def test_leftover_temp_file_from_an_interrupted_save_is_removed(store, tmp_path):
    store.save(snap(2))
    tmp = tmp_path / (snapshot_name(3, 1) + ".tmp")
    tmp.write_bytes(b"half a snapshot")
    assert [s.metadata.index for s in store.load()] == [2]
    assert not tmp.exists()


def test_disk_error_while_saving_is_a_disk_failure(store, monkeypatch):
    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(DiskFailure, match="No space"):
        store.save(snap(2))
    monkeypatch.undo()
    assert store.load() == [], "a snapshot that was not durable never gets its final name"
