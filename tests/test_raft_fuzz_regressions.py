"""Crashers found by tests/raft_fuzz.py, each shrunk to a few RawNode calls. The
docstring names the fuzz seed and mode that found it."""

from __future__ import annotations

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Config, MemoryStorage, RawNode, StateRole
from tests.raft_harness import msg


def follower(nid: int = 2) -> tuple[RawNode, MemoryStorage]:
    st = MemoryStorage.new_with_conf_state([1, 2, 3])
    return RawNode(Config(id=nid), st), st


def persist(raw: RawNode, st: MemoryStorage) -> list[pb.Message]:
    out = []
    while raw.has_ready():
        rd = raw.ready()
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        st.append(list(rd.entries))
        if rd.hard_state is not None:
            st.set_hardstate(rd.hard_state)
        out += rd.messages + rd.persisted_messages
        raw.advance(rd)
    return out


def test_append_beyond_the_last_index_with_log_term_0_is_rejected():
    """Hostile seeds 5 and 7: term() answers 0 beyond the log, so an append at index 10
    with log_term 0 'matched' a hole: its entries went in after a gap (a corrupt unstable
    tail) and its commit beyond the last index raised."""
    raw, st = follower()
    raw.step(msg(pb.MsgAppend, 1, 2, 3, index=10, log_term=0, commit=11,
                 entries=[pb.Entry(index=11, term=1, data=b"x")]))
    raw.step(msg(pb.MsgAppend, 1, 2, 3, index=1, log_term=0, commit=1))
    assert raw.raft.log.last_index() == 0 and raw.raft.log.committed == 0
    out = persist(raw, st)
    rejects = [m for m in out if m.msg_type == pb.MsgAppendResponse and m.reject]
    assert [m.index for m in rejects] == [10, 1]
    assert st.last_index() == 0


def test_snapshot_fast_forward_needs_a_known_term():
    """Hostile seed 6: a snapshot (index beyond our log, term 0 in the metadata) 'matched'
    our log by the same hole and fast-forwarded commit beyond the last index."""
    raw, st = follower()
    raw.step(msg(pb.MsgAppend, 1, 2, 3, index=0, log_term=0, commit=0, entries=[pb.Entry(index=1, term=3)]))
    persist(raw, st)
    snap = pb.Snapshot()
    snap.metadata.index = 7
    snap.metadata.conf_state.voters.extend([1, 2, 3])
    raw.step(msg(pb.MsgSnapshot, 1, 2, 3, snapshot=snap))
    assert raw.raft.log.committed <= raw.raft.log.last_index()


def test_peer_message_without_a_term_cannot_move_the_term_back():
    """Hostile seeds 5 and 6: a peer message with term 0 is taken as local by the term
    checks; a candidate that got MsgHeartbeat{term: 0} became a follower at term 0."""
    raw, st = follower()
    raw.campaign()
    persist(raw, st)
    assert raw.raft.state == StateRole.Candidate and raw.raft.term == 1
    raw.step(msg(pb.MsgHeartbeat, 3, 2, 0))
    raw.step(msg(pb.MsgAppend, 3, 2, 0))
    assert raw.raft.term == 1 and raw.raft.state == StateRole.Candidate
    persist(raw, st)
    assert st.hard_state.term == 1


def test_snapshot_with_an_impossible_conf_state_is_refused_before_it_is_installed():
    """Hostile seed 8: a snapshot whose ConfState has outgoing voters but no incoming ones
    was half installed (log replaced, then the config restore raised): persisted, it made
    the node fail at every restart with ConfChangeError('removed all voters')."""
    raw, st = follower()
    for cs in (pb.ConfState(voters_outgoing=[1, 2, 3]), pb.ConfState(learners=[2]),
               pb.ConfState(voters=[1, 3], learners=[1, 2])):
        snap = pb.Snapshot()
        snap.metadata.index, snap.metadata.term = 9, 2
        snap.metadata.conf_state.CopyFrom(cs)
        raw.step(msg(pb.MsgSnapshot, 1, 2, 2, snapshot=snap))
        persist(raw, st)
        assert raw.raft.log.last_index() == 0 and st.snapshot().metadata.index == 0
    RawNode(Config(id=2), st)  # and it still starts


def test_forwarded_conf_change_that_cannot_be_applied_is_dropped():
    """Hostile fuzzing with proposals aimed at the leader: a follower-forwarded MsgPropose
    whose ConfChangeV2 does not parse raised DecodeError out of step() (not a RaftError:
    the peer loop died); one with an unknown change type was appended, committed, and
    then refused by apply_conf_change on every node."""
    from tests.raft_harness import Network

    net = Network(3)
    net.elect(1)
    raw = net.nodes[1].raw
    last = raw.raft.log.last_index()
    bad = [b"\xff\xff\xff",
           pb.ConfChangeV2(changes=[pb.ConfChangeSingle(change_type=9, node_id=4)]).SerializeToString(),
           pb.ConfChangeV2(transition=-1).SerializeToString()]
    for data in bad:
        raw.step(msg(pb.MsgPropose, 2, 1, 0, entries=[pb.Entry(entry_type=pb.EntryConfChangeV2, data=data)]))
        net.settle()
    assert raw.raft.log.last_index() == last
