"""MemoryStorage: the read/write contract of docs/internals.md."""

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Compacted, MemoryStorage, SnapshotTemporarilyUnavailable, Unavailable


def ents(*pairs):
    return [pb.Entry(index=i, term=t, data=b"d%d" % i) for i, t in pairs]


def storage_with(n=5):
    s = MemoryStorage()
    s.append(ents(*[(i, 1 + i // 3) for i in range(1, n + 1)]))
    return s


def test_empty_storage_indexes():
    s = MemoryStorage()
    assert (s.first_index(), s.last_index()) == (1, 0)
    assert s.term(0) == 0
    with pytest.raises(Unavailable):
        s.term(1)


def test_append_and_read():
    s = storage_with(5)
    assert (s.first_index(), s.last_index()) == (1, 5)
    assert [e.index for e in s.entries(2, 5)] == [2, 3, 4]
    assert s.term(3) == 2
    with pytest.raises(Unavailable):
        s.entries(2, 7)


def test_append_overwrites_conflicting_tail():
    s = storage_with(5)
    s.append(ents((3, 9), (4, 9)))
    assert s.last_index() == 4
    assert [e.term for e in s.entries(1, 5)] == [1, 1, 9, 9]


def test_append_with_gap_is_refused():
    s = storage_with(3)
    with pytest.raises(Exception, match="gap"):
        s.append(ents((6, 2)))


def test_max_size_returns_at_least_one_entry():
    s = storage_with(5)
    one = s.entries(1, 6, max_size=0)
    assert len(one) == 1
    size2 = sum(e.ByteSize() for e in s.entries(1, 3))
    assert [e.index for e in s.entries(1, 6, max_size=size2)] == [1, 2]


def test_compact_then_term_and_entries():
    s = storage_with(6)
    s.compact(4)  # entries below 4 are gone; 3 stays as the dummy
    assert s.first_index() == 4
    assert s.term(3) == 2
    with pytest.raises(Compacted):
        s.term(2)
    with pytest.raises(Compacted):
        s.entries(3, 5)
    assert [e.index for e in s.entries(4, 7)] == [4, 5, 6]


def test_snapshot_create_apply_and_request_index():
    s = storage_with(6)
    cs = pb.ConfState(voters=[1, 2, 3])
    snap = s.create_snapshot(4, cs, b"state")
    assert (snap.metadata.index, snap.metadata.term, snap.data) == (4, 2, b"state")
    with pytest.raises(SnapshotTemporarilyUnavailable):
        s.snapshot(5, 2)
    assert s.snapshot(4, 2).metadata.index == 4

    other = MemoryStorage()
    other.apply_snapshot(snap)
    assert (other.first_index(), other.last_index(), other.term(4)) == (5, 4, 2)
    assert list(other.initial_state().conf_state.voters) == [1, 2, 3]
    other.append(ents((5, 3)))
    assert other.last_index() == 5


def test_bootstrap_snapshot_5_5():
    s = MemoryStorage()
    snap = pb.Snapshot()
    snap.metadata.index = 5
    snap.metadata.term = 5
    snap.metadata.conf_state.voters.extend([7, 8])
    s.apply_snapshot(snap)
    assert (s.first_index(), s.last_index(), s.term(5)) == (6, 5, 5)
    assert s.initial_state().hard_state.commit == 5
