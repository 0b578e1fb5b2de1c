"""RaftLog: stable + unstable parts, conflict detection, commit rules."""

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft import MemoryStorage
from raft.errors import Compacted, RaftInvariantError
from raft.log import RaftLog


def ents(*pairs):
    return [pb.Entry(index=i, term=t) for i, t in pairs]


def log_with(stable, unstable=()):
    s = MemoryStorage()
    s.append(ents(*stable))
    lg = RaftLog(s)
    if unstable:
        lg.append(ents(*unstable))
    return lg


def test_indexes_span_stable_and_unstable():
    lg = log_with([(1, 1), (2, 1)], [(3, 2), (4, 2)])
    assert (lg.first_index(), lg.last_index(), lg.last_term()) == (1, 4, 2)
    assert [e.index for e in lg.slice(1, 5)] == [1, 2, 3, 4]
    assert [e.index for e in lg.slice(2, 4)] == [2, 3]
    assert lg.term(5) == 0


def test_maybe_append_rejects_on_term_mismatch():
    lg = log_with([(1, 1), (2, 2)])
    assert lg.maybe_append(2, 1, 0, ents((3, 2))) is None
    assert lg.maybe_append(2, 2, 0, ents((3, 2))) == (3, 3)


def test_old_shorter_append_does_not_truncate_acknowledged_entries():
    # Paper Fig. 2 rule 3: only truncate on a real conflict.
    lg = log_with([(1, 1), (2, 1), (3, 1), (4, 1)])
    res = lg.maybe_append(1, 1, 0, ents((2, 1)))
    assert res == (0, 2)
    assert lg.last_index() == 4


def test_conflicting_tail_is_replaced():
    lg = log_with([(1, 1), (2, 1), (3, 1)])
    res = lg.maybe_append(1, 1, 0, ents((2, 3), (3, 3), (4, 3)))
    assert res == (2, 4)
    assert [lg.term(i) for i in range(1, 5)] == [1, 3, 3, 3]
    # The replaced entries were persisted before; persisted must move back.
    assert lg.persisted == 1


def test_never_truncate_committed():
    lg = log_with([(1, 1), (2, 1), (3, 1)])
    lg.commit_to(3)
    with pytest.raises(RaftInvariantError):
        lg.maybe_append(1, 1, 3, ents((2, 5)))


def test_commit_only_current_term_entries():
    lg = log_with([(1, 1), (2, 1), (3, 2)])
    assert not lg.maybe_commit(2, 2)  # entry 2 is from term 1
    assert lg.maybe_commit(3, 2)
    assert lg.committed == 3
    assert not lg.maybe_commit(2, 1)  # never moves back


def test_commit_beyond_last_index_is_an_error():
    lg = log_with([(1, 1)])
    with pytest.raises(RaftInvariantError):
        lg.commit_to(5)


def test_find_conflict_by_term():
    lg = log_with([(1, 1), (2, 1), (3, 2), (4, 3), (5, 3)])
    assert lg.find_conflict_by_term(5, 2) == (3, 2)
    assert lg.find_conflict_by_term(5, 1) == (2, 1)
    assert lg.find_conflict_by_term(5, 3) == (5, 3)
    assert lg.find_conflict_by_term(9, 3) == (9, None)


def test_next_entries_only_up_to_persisted_and_only_once():
    lg = log_with([(1, 1), (2, 1)], [(3, 1), (4, 1)])
    lg.commit_to(4)
    assert [e.index for e in lg.next_entries()] == [1, 2]
    lg.handed_out(2)
    assert lg.next_entries() == []
    lg.storage.append(list(lg.unstable.entries))  # the host persists the unstable tail
    assert lg.stable_entries(4, 1)
    assert [e.index for e in lg.next_entries()] == [3, 4]
    lg.handed_out(4)
    assert not lg.has_next_entries()
    lg.applied_to(3)
    assert lg.applied == 3 and lg.applying == 4


def test_compacted_reads_raise():
    s = MemoryStorage()
    s.append(ents((1, 1), (2, 1), (3, 1), (4, 2)))
    s.compact(3)
    lg = RaftLog(s)
    assert lg.first_index() == 3
    assert lg.term(2) == 1  # the dummy keeps the term at first_index - 1
    assert lg.term(1) == 0
    with pytest.raises(Compacted):
        lg.slice(1, 4)


def test_restore_snapshot():
    lg = log_with([(1, 1), (2, 1)])
    snap = pb.Snapshot()
    snap.metadata.index = 10
    snap.metadata.term = 4
    lg.restore(snap)
    assert (lg.first_index(), lg.last_index(), lg.committed, lg.term(10)) == (11, 10, 10, 4)
    assert lg.next_entries() == []
