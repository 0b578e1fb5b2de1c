"""DiskStorage behaviour: the documented storage API, persistence across
restarts and crashes, conflicts, compaction, rotation, the service extras,
fail-closed disk errors, and a seeded property check against MemoryStorage."""

from __future__ import annotations

import copy
import errno
import logging
import os
import random
import shutil
import tempfile

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft.disk import STORE_DIR, DiskStorage
from raft.errors import Compacted, DiskFailure, SnapshotTemporarilyUnavailable, StorageError, Unavailable
from raft.storage import MemoryStorage
from raft.wal import list_segments
from tests.crash_sim import simulate_crash

LOG = logging.getLogger("test.disk")


def ents(lo: int, hi: int, term: int, data: bytes = b"d") -> list[pb.Entry]:
    return [pb.Entry(index=i, term=term, data=data + str(i).encode()) for i in range(lo, hi + 1)]


def bootstrap(index: int = 5, term: int = 5, voters=(1, 2, 3)) -> pb.Snapshot:
    return pb.Snapshot(
        metadata=pb.SnapshotMetadata(index=index, term=term, conf_state=pb.ConfState(voters=voters))
    )


def reopen(s: DiskStorage, **kw) -> DiskStorage:
    s.close()
    return DiskStorage.open(s.path, logger=LOG, **kw)


@pytest.fixture
def store(tmp_path):
    s = DiskStorage.open(str(tmp_path / "data"), logger=LOG)
    yield s
    s.close()


def test_new_store_is_empty(store):
    assert (store.first_index(), store.last_index()) == (1, 0)
    assert store.term(0) == 0
    st = store.initial_state()
    assert st.hard_state == pb.HardState() and st.conf_state == pb.ConfState()
    assert store.snapshot(0, 0).metadata.index == 0
    assert (store.applied_index(), store.applied_data(), store.abort_height()) == (0, b"", 0)


def test_read_side_errors_match_the_contract(store):
    store.apply_snapshot(bootstrap())
    store.append(ents(6, 10, 6))
    assert (store.first_index(), store.last_index()) == (6, 10)
    assert store.term(5) == 5, "the snapshot's term at the snapshot index"
    with pytest.raises(Compacted):
        store.term(4)
    with pytest.raises(Unavailable):
        store.term(11)
    with pytest.raises(Compacted):
        store.entries(5, 7)
    with pytest.raises(Unavailable):
        store.entries(6, 12)
    assert [e.index for e in store.entries(6, 11)] == [6, 7, 8, 9, 10]
    one = store.entries(6, 11, max_size=0)
    assert [e.index for e in one] == [6], "max_size always returns at least one entry"
    size2 = sum(e.ByteSize() for e in store.entries(6, 8))
    assert [e.index for e in store.entries(6, 11, max_size=size2)] == [6, 7]
    with pytest.raises(SnapshotTemporarilyUnavailable):
        store.snapshot(6, 2)


def test_everything_survives_a_clean_restart(store):
    store.apply_snapshot(bootstrap())
    store.append(ents(6, 20, 6))
    store.set_hardstate(pb.HardState(term=6, vote=2, commit=15))
    store.set_conf_state(pb.ConfState(voters=[1, 2, 3, 4]))
    store.set_applied(12, data=b"config@12")
    store.set_abort_height(99)
    store.sync()
    s = reopen(store)
    try:
        assert (s.first_index(), s.last_index()) == (6, 20)
        assert s.entries(6, 21) == ents(6, 20, 6)
        st = s.initial_state()
        assert st.hard_state == pb.HardState(term=6, vote=2, commit=15)
        assert list(st.conf_state.voters) == [1, 2, 3, 4]
        assert (s.applied_index(), s.applied_data(), s.abort_height()) == (12, b"config@12", 99)
        assert s.snapshot(0, 0).metadata.index == 5
    finally:
        s.close()


def test_conflicting_append_truncates_and_replay_yields_the_same_log(store):
    store.append(ents(1, 10, 1))
    store.set_hardstate(pb.HardState(term=1, commit=3))
    store.append(ents(5, 7, 2, b"new"))  # the leader of term 2 overwrote 5..10
    assert store.last_index() == 7
    assert [e.term for e in store.entries(1, 8)] == [1, 1, 1, 1, 2, 2, 2]
    store.append(ents(8, 9, 2, b"more"))
    store.sync()
    expected = store.entries(1, 10)
    s = reopen(store)
    try:
        assert s.entries(1, s.last_index() + 1) == expected
    finally:
        s.close()


def test_append_refuses_gaps_and_rewriting_committed_entries(store):
    store.append(ents(1, 5, 1))
    with pytest.raises(StorageError):
        store.append(ents(7, 8, 1))
    store.set_hardstate(pb.HardState(term=1, commit=4))
    with pytest.raises(StorageError, match="committed"):
        store.append(ents(4, 6, 2))
    store.append(ents(5, 6, 2))
    assert store.last_index() == 6


def test_compaction_bounds_memory_and_keeps_boundary_term(store):
    store.append(ents(1, 100, 3))
    store.set_hardstate(pb.HardState(term=3, commit=100))
    store.create_snapshot(60, pb.ConfState(voters=[1]), b"state@60")
    store.compact(60)
    assert store.first_index() == 60 and store.term(59) == 3
    assert len(store._entries) == 41
    with pytest.raises(Compacted):
        store.entries(59, 61)
    store.compact(10)  # below the first index: no-op
    assert store.first_index() == 60
    with pytest.raises(Unavailable):
        store.compact(102)


def test_create_snapshot_rules(store):
    store.append(ents(1, 10, 2))
    snap = store.create_snapshot(8, pb.ConfState(voters=[7]), b"cfg")
    assert (snap.metadata.index, snap.metadata.term, snap.data) == (8, 2, b"cfg")
    assert store.snapshot(8, 1) == snap
    with pytest.raises(SnapshotTemporarilyUnavailable):
        store.create_snapshot(8, None, b"")
    with pytest.raises(Unavailable):
        store.create_snapshot(11, None, b"")


def test_apply_snapshot_replaces_log_and_survives_restart(store):
    store.append(ents(1, 10, 1))
    store.set_hardstate(pb.HardState(term=1, vote=1, commit=3))
    snap = bootstrap(50, 4, (4, 5))
    snap.data = b"cfg@50"
    store.apply_snapshot(snap)
    assert (store.first_index(), store.last_index(), store.term(50)) == (51, 50, 4)
    hs = store.initial_state().hard_state
    assert (hs.term, hs.commit) == (4, 50)
    assert (store.applied_index(), store.applied_data()) == (50, b"cfg@50")
    store.append(ents(51, 52, 4))
    store.sync()
    s = reopen(store)
    try:
        assert (s.first_index(), s.last_index()) == (51, 52)
        assert list(s.initial_state().conf_state.voters) == [4, 5]
        assert s.snapshot(50, 2) == snap
        assert (s.applied_index(), s.applied_data()) == (50, b"cfg@50")
    finally:
        s.close()
    with pytest.raises(StorageError):
        DiskStorage.open(store.path, logger=LOG).apply_snapshot(bootstrap(40, 4))


def test_set_applied_keeps_data_when_not_given(store):
    store.set_applied(3, conf_state=pb.ConfState(voters=[9]), data=b"A")
    store.set_applied(4)
    assert (store.applied_index(), store.applied_data()) == (4, b"A")
    assert list(store.initial_state().conf_state.voters) == [9]


def test_set_applied_behind_an_installed_snapshot_is_ignored(store):
    # The applier can finish entry 3 after a snapshot at 50 was installed.
    store.set_applied(2, data=b"cfg@2")
    store.apply_snapshot(pb.Snapshot(data=b"cfg@50", metadata=pb.SnapshotMetadata(index=50, term=2)))
    store.set_applied(3, conf_state=pb.ConfState(voters=[1]), data=b"cfg@3")
    assert (store.applied_index(), store.applied_data()) == (50, b"cfg@50")
    store.sync()
    s = reopen(store)
    assert (s.applied_index(), s.applied_data()) == (50, b"cfg@50")
    s.close()


def test_unsynced_writes_are_lost_in_a_crash_synced_ones_are_not(store):
    store.append(ents(1, 5, 1))
    store.set_hardstate(pb.HardState(term=1, vote=3, commit=2))
    store.sync()
    store.append(ents(6, 9, 1))
    store.set_hardstate(pb.HardState(term=2, vote=1, commit=2))
    simulate_crash(store)
    s = DiskStorage.open(store.path, logger=LOG)
    try:
        assert s.last_index() == 5
        assert s.initial_state().hard_state == pb.HardState(term=1, vote=3, commit=2)
    finally:
        s.close()


def test_set_abort_height_is_durable_at_once(store):
    store.set_abort_height(1234)
    simulate_crash(store)
    s = DiskStorage.open(store.path, logger=LOG)
    assert s.abort_height() == 1234
    s.close()


def test_group_commit_several_readies_one_fsync(store, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    for i in range(1, 6):  # five Readies written back to back
        store.append(ents(i, i, 1))
        store.set_hardstate(pb.HardState(term=1, commit=i - 1))
    store.sync()
    assert len(calls) == 1
    store.sync()
    assert len(calls) == 1, "nothing new: no fsync"


def test_rotation_and_deletion_of_segments_covered_by_snapshots(tmp_path):
    s = DiskStorage.open(str(tmp_path), logger=LOG, segment_bytes=2048)
    wal = os.path.join(s.root, "wal")
    for lo in range(1, 400, 20):
        s.append(ents(lo, lo + 19, 1, b"x" * 40))
        s.set_hardstate(pb.HardState(term=1, commit=lo + 19))
        s.sync()
    total = len(list_segments(wal))
    assert total > 5
    s.create_snapshot(200, pb.ConfState(voters=[1]), b"s200")
    assert len(list_segments(wal)) < total, "segments wholly below the snapshot are deleted"
    s.create_snapshot(380, pb.ConfState(voters=[1]), b"s380")
    # Deletion follows the *older* of the two kept snapshots, so the WAL still
    # reaches back to 200 and the node could start from snapshot 200 if 380 broke.
    assert s._writer.segments[0][1] <= 200 < s._writer.segments[1][1]
    s.compact(381)
    s = reopen(s, segment_bytes=2048)
    try:
        assert s.last_index() == 400 and s.first_index() <= 201
        assert s.entries(201, 401) == [
            e for lo in range(201, 400, 20) for e in ents(lo, lo + 19, 1, b"x" * 40)
        ]
        assert s.snapshot(0, 0).data == b"s380"
    finally:
        s.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_disk_failure_stops_writes_but_not_reads(store, monkeypatch, code):
    store.append(ents(1, 3, 1))
    store.sync()

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    store.append(ents(4, 4, 1))
    with pytest.raises(DiskFailure, match=errno.errorcode[code]):
        store.sync()
    monkeypatch.undo()
    for write in (
        lambda: store.append(ents(5, 5, 1)),
        lambda: store.set_hardstate(pb.HardState(term=2)),
        store.sync,
        lambda: store.set_abort_height(3),
        lambda: store.set_applied(1),
    ):
        with pytest.raises(DiskFailure):
            write()
    assert store.term(3) == 1


def test_failed_snapshot_save_also_stops_writes(store, monkeypatch):
    store.append(ents(1, 5, 1))
    real_replace = os.replace

    def fail(a, b):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(DiskFailure):
        store.create_snapshot(3, None, b"s")
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(DiskFailure):
        store.append(ents(6, 6, 1))
    assert store.snapshot(0, 0).metadata.index == 0


def test_one_writer_per_directory(store):
    with pytest.raises(StorageError, match="in use"):
        DiskStorage.open(store.path, logger=LOG)


def test_interrupted_first_start_is_redone(tmp_path):
    data = tmp_path / "data"
    (data / (STORE_DIR + ".tmp") / "wal").mkdir(parents=True)
    (data / (STORE_DIR + ".tmp") / "wal" / "junk").write_bytes(b"half-made store")
    s = DiskStorage.open(str(data), logger=LOG)
    assert s.last_index() == 0
    assert not (data / (STORE_DIR + ".tmp")).exists()
    s.close()


# ---- property check against MemoryStorage ---------------------------------------------


def same_state(disk: DiskStorage, mem: MemoryStorage, exact: bool = True) -> None:
    assert disk.last_index() == mem.last_index()
    if exact:
        assert disk.first_index() == mem.first_index()
    else:
        # After a restart the disk may hold more (not yet compacted) or fewer
        # (covered by a snapshot) old entries: align both on the later start.
        lo = max(disk.first_index(), mem.first_index())
        disk.compact(lo)
        mem.compact(lo)
    lo, hi = mem.first_index(), mem.last_index()
    for i in range(lo - 1, hi + 1):
        assert disk.term(i) == mem.term(i), f"term({i})"
    assert disk.entries(lo, hi + 1) == mem.entries(lo, hi + 1)
    d, m = disk.initial_state(), mem.initial_state()
    assert d.hard_state == m.hard_state
    assert d.conf_state == m.conf_state
    assert disk.snapshot(0, 0) == mem.snapshot(0, 0)


def random_op(rng: random.Random, mem: MemoryStorage) -> tuple[str, object]:
    last, first = mem.last_index(), mem.first_index()
    hs = mem.hard_state
    snap_index = mem.snapshot(0, 0).metadata.index
    r = rng.random()
    if r < 0.35:
        start = rng.randint(max(first, hs.commit + 1), last + 1)
        term = max(mem.term(start - 1), hs.term)  # entries never outrun the hard state's term
        n = rng.randint(1, 6)
        return "append", [
            pb.Entry(index=start + i, term=term, data=rng.randbytes(rng.randint(0, 40))) for i in range(n)
        ]
    if r < 0.55:
        term = max(hs.term, mem.term(last)) + rng.randint(0, 1)
        return "hardstate", pb.HardState(
            term=term, vote=rng.randint(0, 3), commit=rng.randint(hs.commit, last)
        )
    if r < 0.63:
        return "confstate", pb.ConfState(voters=rng.sample(range(1, 9), rng.randint(1, 4)))
    if r < 0.71 and hs.commit > snap_index and hs.commit >= first:
        index = rng.randint(max(snap_index + 1, first), hs.commit)
        return "create_snapshot", (index, pb.ConfState(voters=[rng.randint(1, 5)]), rng.randbytes(8))
    if r < 0.78:
        return "compact", rng.randint(first, min(last + 1, hs.commit + 1))
    if r < 0.81:
        index = max(snap_index, hs.commit) + rng.randint(1, 15)
        snap = pb.Snapshot(data=rng.randbytes(6))
        snap.metadata.index = index
        snap.metadata.term = max(hs.term, mem.term(last)) + rng.randint(0, 1)
        snap.metadata.conf_state.voters.extend(rng.sample(range(1, 9), 3))
        return "apply_snapshot", snap
    if r < 0.9:
        return "sync", None
    if r < 0.94:
        return "reopen", None
    return "crash", None


def apply_op(target, op: str, arg) -> None:
    if op == "append":
        target.append(copy.deepcopy(arg))
    elif op == "hardstate":
        target.set_hardstate(arg)
    elif op == "confstate":
        target.set_conf_state(arg)
    elif op == "create_snapshot":
        target.create_snapshot(*arg)
    elif op == "compact":
        target.compact(arg)
    elif op == "apply_snapshot":
        target.apply_snapshot(arg)
    elif op == "sync":
        target.sync()


@pytest.fixture
def fast_dir(tmp_path):
    """tmpfs when available: this test checks logic, and simulate_crash models the
    power cut the same on any file system."""
    if not os.access("/dev/shm", os.W_OK):
        yield str(tmp_path)
        return
    d = tempfile.mkdtemp(prefix="disk-prop-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("seed", range(int(os.environ.get("DISK_PROPERTY_SEEDS", "12"))))
def test_disk_matches_memory_storage_on_random_sequences(fast_dir, seed):
    rng = random.Random(seed)
    path = os.path.join(fast_dir, "data")
    disk = DiskStorage.open(path, logger=LOG, segment_bytes=rng.choice([512, 4096, 1 << 20]))
    mem = MemoryStorage()
    synced = copy.deepcopy(mem)  # MemoryStorage as of the last sync()
    snapshot_since_sync = False
    try:
        for step in range(250):
            op, arg = random_op(rng, mem)
            where = f"seed={seed} step={step} op={op}"
            if op in ("reopen", "crash"):
                if op == "crash" and not snapshot_since_sync:
                    # Power cut now: everything after the last sync() is gone.
                    simulate_crash(disk)
                    mem = copy.deepcopy(synced)
                else:
                    disk.close()  # close() syncs
                    synced = copy.deepcopy(mem)
                disk = DiskStorage.open(path, logger=LOG, segment_bytes=disk.segment_bytes)
                snapshot_since_sync = False
                same_state(disk, mem, exact=False)
                continue
            apply_op(mem, op, arg)
            apply_op(disk, op, arg)
            if op == "sync":
                synced = copy.deepcopy(mem)
                snapshot_since_sync = False
            elif op in ("create_snapshot", "apply_snapshot"):
                snapshot_since_sync = True
            try:
                same_state(disk, mem)
            except AssertionError as err:
                raise AssertionError(f"{where}: {err}") from err
    finally:
        disk.close()


@pytest.mark.parametrize("seed", range(int(os.environ.get("DISK_TORN_SEEDS", "100"))))
def test_torn_crash_keeps_everything_synced_and_only_whole_entries(fast_dir, seed):
    """simulate_crash(rng) leaves a random prefix of the unsynced bytes (sometimes
    followed by zeros): the restart must succeed, without the lost-synced verdict, with
    the synced state intact and nothing but whole entries that were really written."""
    rng = random.Random(10_000 + seed)
    path = os.path.join(fast_dir, "data")
    disk = DiskStorage.open(path, logger=LOG, segment_bytes=rng.choice([512, 4096]))
    mem = MemoryStorage()
    for _ in range(rng.randint(10, 120)):
        op, arg = random_op(rng, mem)
        if op not in ("reopen", "crash"):
            apply_op(mem, op, arg)
            apply_op(disk, op, arg)
    disk.sync()
    synced = copy.deepcopy(mem)
    written = set()
    for _ in range(rng.randint(1, 12)):  # the unsynced window: no snapshot operations
        op, arg = random_op(rng, mem)
        if op in ("append", "hardstate", "confstate"):
            apply_op(mem, op, arg)
            apply_op(disk, op, arg)
            if op == "append":
                written.update(e.SerializeToString() for e in arg)
    simulate_crash(disk, rng)
    disk = DiskStorage.open(path, logger=LOG)
    try:
        hs, commit = disk.initial_state().hard_state, synced.hard_state.commit
        # every state simulate_crash leaves is a crash state: recovery must not call it lost synced data
        assert not disk.recovery_lost_synced, f"seed={seed}: a crash state was taken for damage to synced data"
        assert hs.term >= synced.hard_state.term and hs.commit >= commit
        assert disk.last_index() >= commit, "committed entries survive"
        lo = max(disk.first_index(), synced.first_index())
        assert disk.entries(lo, commit + 1) == synced.entries(lo, commit + 1)
        for e in disk.entries(max(lo, commit + 1), disk.last_index() + 1):
            whole = e.SerializeToString()
            assert whole in written or (
                e.index <= synced.last_index() and e == synced.entries(e.index, e.index + 1)[0]
            ), f"seed={seed}: entry {e.index} was never written like this"
    finally:
        disk.close()
