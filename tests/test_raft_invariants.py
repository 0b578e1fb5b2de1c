"""States the Raft algorithm forbids raise RaftInvariantError (not a RaftError, so no
caller that treats RaftError as an expected answer swallows it; the host must stop).
Each is provoked through the public API or a deliberately corrupted state."""

from __future__ import annotations

import logging

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Config, MemoryStorage, RawNode, StateRole
from raft.errors import RaftError, RaftInvariantError
from raft.log import RaftLog
from raft.progress import Inflights, Progress, ProgressState
from tests.raft_harness import Network, msg


def test_invariant_error_is_not_a_raft_error():
    assert not issubclass(RaftInvariantError, RaftError)


def committed_log(n: int = 3) -> RaftLog:
    st = MemoryStorage.new_with_conf_state([1])
    st.append([pb.Entry(index=i, term=1) for i in range(1, n + 1)])
    lg = RaftLog(st)
    lg.commit_to(n)
    return lg


def test_overwriting_a_committed_entry():
    lg = committed_log()
    with pytest.raises(RaftInvariantError, match="conflicts with committed"):
        lg.maybe_append(1, 1, 3, [pb.Entry(index=2, term=2)])


def test_truncating_at_or_below_the_commit_index():
    lg = committed_log()
    with pytest.raises(RaftInvariantError, match="at or below the commit index"):
        lg.append([pb.Entry(index=3, term=2)])


def test_commit_beyond_the_last_index():
    lg = committed_log()
    with pytest.raises(RaftInvariantError, match="out of range"):
        lg.commit_to(9)


def test_snapshot_restore_below_the_commit_index():
    lg = committed_log()
    snap = pb.Snapshot()
    snap.metadata.index, snap.metadata.term = 2, 1
    with pytest.raises(RaftInvariantError, match="commit index back"):
        lg.restore(snap)


def test_applied_beyond_committed_through_the_public_api():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"x")
    raw = net.nodes[2].raw
    with pytest.raises(RaftInvariantError, match="applied"):
        raw.advance_apply_to(raw.raft.log.committed + 5)


def _steady(net: Network, nid: int) -> RawNode:
    raw = net.nodes[nid].raw
    assert not raw.has_ready()
    return raw


def test_commit_going_back_is_refused_at_the_ready():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"x")
    raw = _steady(net, 2)
    raw.raft.log.committed -= 1  # corrupted state
    with pytest.raises(RaftInvariantError, match="commit index going back"):
        raw.ready()


def test_vote_changing_within_a_term_is_refused_at_the_ready():
    net = Network(3)
    net.elect(1)
    raw = _steady(net, 2)
    assert raw.raft.vote == 1
    raw.raft.vote = 3  # corrupted state: a second vote in the same term
    with pytest.raises(RaftInvariantError, match="vote changing"):
        raw.ready()


def test_term_going_back():
    net = Network(3)
    net.elect(1)
    raft = net.nodes[2].raft
    with pytest.raises(RaftInvariantError, match="term going back"):
        raft.become_follower(raft.term - 1, 0)
    raw = _steady(net, 3)
    raw.raft.term -= 1  # corrupted state
    with pytest.raises(RaftInvariantError, match="term going back"):
        raw.ready()


def test_forbidden_role_transitions():
    net = Network(3)
    net.elect(1)
    leader = net.nodes[1].raft
    with pytest.raises(RaftInvariantError):
        leader.become_candidate()
    with pytest.raises(RaftInvariantError):
        leader.become_pre_candidate()
    with pytest.raises(RaftInvariantError):
        net.nodes[2].raft.become_leader()


def test_inflight_window_overflow_and_append_in_snapshot_state():
    ins = Inflights(1)
    ins.add(1)
    with pytest.raises(RaftInvariantError):
        ins.add(2)
    pr = Progress(5, 4)
    pr.become_snapshot(9)
    assert pr.state == ProgressState.Snapshot
    with pytest.raises(RaftInvariantError):
        pr.update_state(10)


def test_a_second_leader_in_one_term_is_refused_not_followed(caplog):
    """A follower of 1 in term t gets a heartbeat and an append from 3 claiming term t:
    it neither follows 3 nor takes its entries, and logs an error. (One unauthenticated
    message must not stop a node: see Raft._conflicting_leader.)"""
    net = Network(3)
    net.elect(1)
    net.propose(1, b"x")
    f = net.nodes[2].raw
    t, last, commit = f.raft.term, f.raft.log.last_index(), f.raft.log.committed
    with caplog.at_level(logging.ERROR):
        f.step(msg(pb.MsgHeartbeat, 3, 2, t, commit=commit))
        f.step(msg(pb.MsgAppend, 3, 2, t, index=last, log_term=t, commit=last + 1,
                   entries=[pb.Entry(index=last + 1, term=t, data=b"forged")]))
    assert f.raft.leader_id == 1 and f.raft.log.last_index() == last and f.raft.log.committed == commit
    assert f.raft.conflicting_leaders == 2
    assert any("two leaders in one term" in r.getMessage() for r in caplog.records)
    # the leader itself, too
    lead = net.nodes[1].raw
    lead.step(msg(pb.MsgHeartbeat, 3, 1, t))
    assert lead.raft.state == StateRole.Leader and lead.raft.conflicting_leaders == 1


def test_follower_without_a_known_leader_still_takes_the_first_one():
    raw = RawNode(Config(id=2), MemoryStorage.new_with_conf_state([1, 2, 3]))
    raw.step(msg(pb.MsgHeartbeat, 1, 2, 2))
    raw.step(msg(pb.MsgHeartbeat, 1, 2, 2))
    assert raw.raft.leader_id == 1 and raw.raft.conflicting_leaders == 0


def test_snapshot_restore_by_a_non_follower():
    net = Network(3)
    net.elect(1)
    snap = net.compact(1)
    with pytest.raises(RaftInvariantError, match="restore a snapshot"):
        net.nodes[1].raft.restore(snap)
