"""Messages the core drops at its step boundary (issue 13 #1, #2; docs/internals.md,
"Messages the core drops"): unknown types, terms/indexes within 2^32 of u64 max, entries
and snapshots no leader sends, and messages from nobody or from the node itself."""

from __future__ import annotations

import logging

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Config, MemoryStorage, RawNode, StateRole
from raft.core import VALUE_LIMIT
from tests.raft_harness import Network, msg

U64_MAX = (1 << 64) - 1


def follower(nid: int = 2) -> RawNode:
    return RawNode(Config(id=nid), MemoryStorage.new_with_conf_state([1, 2, 3]))


def drain(raw: RawNode) -> list[pb.Message]:
    if not raw.has_ready():
        return []
    rd = raw.ready()
    raw.advance(rd)
    return rd.messages + rd.persisted_messages


def test_heartbeat_at_u64_max_term_is_dropped_and_the_next_election_works():
    """Issue 13 #2: MsgHeartbeat{term: 2^64-1, from: a non-validator} was adopted and the
    node's next campaign overflowed the term ('Value out of range')."""
    raw = follower()
    raw.step(msg(pb.MsgHeartbeat, 99, 2, U64_MAX))
    assert raw.raft.term == 0 and raw.raft.leader_id == 0
    assert drain(raw) == []
    raw.campaign()
    assert raw.raft.state == StateRole.Candidate and raw.raft.term == 1


@pytest.mark.parametrize("field", ["term", "index", "log_term", "commit", "commit_term", "reject_hint",
                                   "request_snapshot"])
@pytest.mark.parametrize("value", [VALUE_LIMIT, U64_MAX])
def test_every_term_and_index_field_near_u64_max_is_dropped(field, value):
    for t in (pb.MsgAppend, pb.MsgHeartbeat, pb.MsgRequestVote, pb.MsgRequestPreVote, pb.MsgAppendResponse,
              pb.MsgHeartbeatResponse, pb.MsgRequestVoteResponse, pb.MsgSnapshot, pb.MsgTimeoutNow):
        raw = follower()
        m = msg(t, 1, 2, 3)
        setattr(m, field, value)
        before = (raw.raft.term, raw.raft.vote, raw.raft.log.committed, raw.raft.log.last_index())
        raw.step(m)
        assert (raw.raft.term, raw.raft.vote, raw.raft.log.committed, raw.raft.log.last_index()) == before
        assert drain(raw) == [], (pb.MessageType.Name(t), field)
        assert raw.raft.dropped_messages == 1


def test_entries_and_snapshots_near_u64_max_are_dropped():
    raw = follower()
    raw.step(msg(pb.MsgAppend, 1, 2, 3, index=0, log_term=0,
                 entries=[pb.Entry(index=1, term=VALUE_LIMIT)]))
    big = VALUE_LIMIT
    raw.step(msg(pb.MsgAppend, 1, 2, 3, index=big - 1, log_term=1, entries=[pb.Entry(index=big, term=2)]))
    snap = pb.Snapshot()
    snap.metadata.index = U64_MAX
    snap.metadata.term = 1
    snap.metadata.conf_state.voters.extend([1, 2, 3])
    raw.step(msg(pb.MsgSnapshot, 1, 2, 3, snapshot=snap))
    assert raw.raft.dropped_messages == 3
    assert raw.raft.term == 0 and raw.raft.log.last_index() == 0


def test_values_just_below_the_limit_are_taken():
    """The rule drops only the top 2^32 values: a term just below still works (2^32
    elections of headroom)."""
    raw = follower()
    t = VALUE_LIMIT - 1
    raw.step(msg(pb.MsgHeartbeat, 1, 2, t))
    assert raw.raft.term == t and raw.raft.leader_id == 1
    raw.raft.leader_id = 0
    raw.campaign()
    assert raw.raft.term == t + 1


@pytest.mark.parametrize("msg_type", [100, 19, 1 << 30, -1, -(1 << 31)])
@pytest.mark.parametrize("term", [0, 1, 4, 9])
def test_unknown_message_types_are_dropped_even_with_debug_logging(msg_type, term, caplog):
    """Issue 13 #1: Message{msg_type: 100, term below ours} crashed the peer loop when the
    'ignored' debug line called MessageType.Name(100). Unknown (and negative) types are
    dropped before any term handling, so they cannot move the term either."""
    raw = follower()
    raw.step(msg(pb.MsgHeartbeat, 1, 2, 4))
    drain(raw)
    m = msg(msg_type, 1, 2, term)
    with caplog.at_level(logging.DEBUG):
        raw.step(m)
    assert raw.raft.term == 4 and raw.raft.leader_id == 1
    assert drain(raw) == []
    assert raw.raft.dropped_messages == 1


def test_the_network_msg_of_issue_13_defect_1():
    """The raft Message inside the NetworkMsg reported in the issue, decoded and stepped."""
    from cita_raft_pb import network_pb2

    nm = network_pb2.NetworkMsg.FromString(bytes.fromhex(
        "0a09636f6e73656e73757312047261667418888e98a8c0e0808101220e086410d8eff4e5c382beb0072004"))
    m = pb.Message.FromString(nm.msg)
    assert m.msg_type == 100
    raw = RawNode(Config(id=m.to), MemoryStorage.new_with_conf_state([m.to, 2, 3]))
    raw.step(msg(pb.MsgHeartbeat, 2, m.to, 9))
    with_debug = logging.getLogger("raft")
    old = with_debug.level
    with_debug.setLevel(logging.DEBUG)
    try:
        raw.step(m)
    finally:
        with_debug.setLevel(old)
    assert raw.raft.term == 9


def test_append_with_non_contiguous_or_out_of_order_entries_is_dropped():
    raw = follower()
    bad = [
        # a gap
        msg(pb.MsgAppend, 1, 2, 3, index=0, log_term=0, entries=[pb.Entry(index=1, term=1), pb.Entry(index=3, term=1)]),
        # not starting after index
        msg(pb.MsgAppend, 1, 2, 3, index=0, log_term=0, entries=[pb.Entry(index=2, term=1)]),
        # terms going down
        msg(pb.MsgAppend, 1, 2, 3, index=0, log_term=0, entries=[pb.Entry(index=1, term=2), pb.Entry(index=2, term=1)]),
        # an entry from a later term than the leader's
        msg(pb.MsgAppend, 1, 2, 3, index=0, log_term=0, entries=[pb.Entry(index=1, term=4)]),
        # prev term above the leader's term
        msg(pb.MsgAppend, 1, 2, 3, index=1, log_term=5),
    ]
    for m in bad:
        raw.step(m)
    assert raw.raft.dropped_messages == len(bad)
    assert raw.raft.log.last_index() == 0 and raw.raft.term == 0
    good = msg(pb.MsgAppend, 1, 2, 3, index=0, log_term=0, entries=[pb.Entry(index=1, term=1), pb.Entry(index=2, term=3)])
    raw.step(good)
    assert raw.raft.log.last_index() == 2


def test_snapshot_from_a_later_term_than_its_message_is_dropped():
    raw = follower()
    snap = pb.Snapshot()
    snap.metadata.index = 10
    snap.metadata.term = 7
    snap.metadata.conf_state.voters.extend([1, 2, 3])
    raw.step(msg(pb.MsgSnapshot, 1, 2, 3, snapshot=snap))
    assert raw.raft.dropped_messages == 1 and raw.raft.log.last_index() == 0


def test_messages_from_nobody_or_from_itself_are_dropped():
    """from 0 means 'no vote': a vote request from 0 could make a node vote twice in a
    term; a forged ack from the leader's own id could count its unpersisted entries."""
    raw = follower()
    raw.step(msg(pb.MsgRequestVote, 0, 2, 5, index=0, log_term=0))
    raw.step(msg(pb.MsgHeartbeat, 2, 2, 5))
    assert raw.raft.term == 0 and raw.raft.vote == 0
    assert raw.raft.dropped_messages == 2
    net = Network(3)
    net.elect(1)
    leader = net.nodes[1].raw
    leader.raft.log.append([pb.Entry(index=leader.raft.log.last_index() + 1, term=leader.raft.term)])
    leader.step(msg(pb.MsgAppendResponse, 1, 1, leader.raft.term, index=leader.raft.log.last_index()))
    assert leader.raft.prs.progress[1].matched < leader.raft.log.last_index()


def test_drop_warnings_are_rate_limited(caplog):
    raw = follower()
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):
            raw.step(msg(pb.MsgHeartbeat, 9, 2, U64_MAX))
    warned = [r for r in caplog.records if "dropped a malformed message" in r.getMessage()]
    assert raw.raft.dropped_messages == 1000
    assert len(warned) == 10  # 1, 2, 4, ..., 512
