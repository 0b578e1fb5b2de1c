"""Config.lost_state (docs/internals.md, "Lost state"): a node that restarted after
losing durable state withholds votes, pre-votes and its own candidacy until the leader
of its term caught it up and one max election timeout passed, then votes only in terms
above every term it heard meanwhile. Driven message by message on one RawNode."""

from __future__ import annotations

import logging
import random

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Config, RawNode, StateRole, core
from tests.raft_harness import bootstrapped_storage, msg


def _node(lost: bool, pre_vote: bool = False) -> RawNode:
    cfg = Config(id=1, election_tick=10, heartbeat_tick=1, pre_vote=pre_vote, lost_state=lost)
    raw = RawNode(cfg, bootstrapped_storage([1, 2, 3]), rng=random.Random(1), logger=logging.getLogger("t"))
    raw.test_storage = raw.raft.storage
    return raw


def _drain(raw: RawNode) -> list[pb.Message]:
    out: list[pb.Message] = []
    while raw.has_ready():
        rd = raw.ready()
        if rd.entries:
            raw.test_storage.append(list(rd.entries))
        if rd.hard_state is not None:
            raw.test_storage.set_hardstate(rd.hard_state)
        if rd.committed_entries:
            raw.advance_apply_to(rd.committed_entries[-1].index)
        out += list(rd.messages) + list(rd.persisted_messages)
        raw.advance(rd)
    return out


def _vote_answers(raw: RawNode, msgs: list[pb.Message]) -> list[bool]:
    return [not m.reject for m in msgs if m.msg_type in (pb.MsgRequestVoteResponse, pb.MsgRequestPreVoteResponse)]


def _ask_vote(raw: RawNode, frm: int, term: int, pre: bool = False, last: tuple[int, int] = (5, 5)) -> bool:
    t = pb.MsgRequestPreVote if pre else pb.MsgRequestVote
    raw.step(msg(t, frm, 1, term, index=last[0], log_term=last[1]))
    (granted,) = _vote_answers(raw, _drain(raw))
    return granted


WITNESS_AFTER = core.WITNESS_AFTER_ELECTION_TIMEOUTS * 10  # ticks: _node's election_tick is 10


def _sit_out(raw: RawNode) -> None:
    """Tick past the time after the restart in which no election counts as witnessed
    (a candidacy open at the loss may still collect votes)."""
    for _ in range(WITNESS_AFTER):
        raw.tick()
    _drain(raw)


def _catch_up(raw: RawNode, leader: int, term: int) -> None:
    """The leader of `term` appends entry 6 and commits it."""
    e = pb.Entry(index=6, term=term, data=b"x")
    raw.step(msg(pb.MsgAppend, leader, 1, term, index=5, log_term=5, commit=6, entries=[e]))
    _drain(raw)


def test_without_lost_state_the_node_votes_as_raft_says():
    raw = _node(lost=False)
    assert _ask_vote(raw, 2, 7)
    st = raw.status()
    assert (st.voting_withheld, st.vote_floor) == (False, 0)


def test_a_lost_state_node_refuses_votes_and_pre_votes_and_does_not_campaign(caplog):
    raw = _node(lost=True, pre_vote=True)
    with caplog.at_level(logging.INFO, logger="t"):
        assert not _ask_vote(raw, 2, 7)
        assert not _ask_vote(raw, 3, 9, pre=True)
        raw.campaign()
        _drain(raw)
        assert raw.status().role == StateRole.Follower
        for _ in range(100):
            raw.tick()  # no leader: it never campaigns on its own either
        _drain(raw)
    assert raw.status().role == StateRole.Follower
    assert raw.status().voting_withheld
    # Every term it heard raises the floor (a pre-vote for 9 comes from a node at 8).
    assert raw.status().vote_floor == 8
    text = caplog.text
    assert "lost state: withholding votes" in text and "lost state: vote withheld" in text
    # Rate-limited: 100 ticks of refusals are a handful of lines, not one per refusal.
    assert text.count("lost state:") < 15


def test_voting_resumes_after_a_witnessed_election_and_catch_up_then_only_above_the_floor(caplog):
    raw = _node(lost=True)
    assert not _ask_vote(raw, 3, 12)  # a candidate from before the loss, at term 12
    _sit_out(raw)
    assert not _ask_vote(raw, 2, 13)  # node 2 campaigns for 13 after our restart: we see it
    raw.step(msg(pb.MsgHeartbeat, 2, 1, 13))  # ... and wins
    _drain(raw)
    for _ in range(30):
        raw.tick()
    _drain(raw)
    assert raw.status().voting_withheld, "not caught up yet: no append from the leader"
    _catch_up(raw, 2, 13)
    assert raw.status().commit == 6
    with caplog.at_level(logging.INFO, logger="t"):
        raw.tick()
    assert not raw.status().voting_withheld
    assert "lost state: voting again" in caplog.text
    assert raw.status().vote_floor == 13
    assert not _ask_vote(raw, 3, 13, last=(6, 13))
    assert _ask_vote(raw, 3, 14, last=(6, 13))


def test_a_leader_elected_before_the_restart_is_asked_to_hand_over():
    """Caught up by a leader whose election it did not see (it may date from before the
    loss, when this node's lost vote may have elected someone else in a higher term), the
    node keeps withholding and asks the leader, once per election timeout, to transfer
    leadership to another voter: the election that follows is one it sees."""
    raw = _node(lost=True)
    _catch_up(raw, 2, 6)
    transfers = []
    for _ in range(WITNESS_AFTER + 15):  # none before WITNESS_AFTER: that election would not count
        raw.tick()
        transfers += [m for m in _drain(raw) if m.msg_type == pb.MsgTransferLeader]
    assert raw.status().voting_withheld
    assert [(m.to, getattr(m, "from"), m.term) for m in transfers] == [(2, 3, 6), (2, 3, 6)]
    assert not _ask_vote(raw, 3, 7)  # node 3 campaigns (the transfer), we refuse but see it
    e = pb.Entry(index=7, term=7)
    raw.step(msg(pb.MsgAppend, 3, 1, 7, index=6, log_term=6, commit=7, entries=[e]))
    _drain(raw)
    raw.tick()
    assert not raw.status().voting_withheld
    assert raw.status().vote_floor == 7


def test_after_resuming_a_campaign_starts_above_the_floor():
    raw = _node(lost=True, pre_vote=False)
    raw.step(msg(pb.MsgRequestPreVote, 3, 1, 20, index=5, log_term=5))  # floor 19, our term stays 5
    assert _vote_answers(raw, _drain(raw)) == [False]
    _sit_out(raw)
    assert not _ask_vote(raw, 2, 6)
    _catch_up(raw, 2, 6)
    raw.tick()
    assert not raw.status().voting_withheld
    assert raw.status().vote_floor == 19
    raw.campaign()
    msgs = _drain(raw)
    assert raw.status().term == 20
    assert {m.term for m in msgs if m.msg_type == pb.MsgRequestVote} == {20}


def test_a_wiped_node_at_term_0_refuses_a_pre_vote_silently():
    """Regression (sim seed 22 before the fix): a node started from an empty store with
    lost_state refused a pre-vote at term 0 and the core raised 'term should be set when
    sending MsgRequestPreVoteResponse'. A refusal without a term is no answer at all."""
    from raft import MemoryStorage

    cfg = Config(id=4, election_tick=10, heartbeat_tick=1, pre_vote=True, lost_state=True)
    raw = RawNode(cfg, MemoryStorage(), rng=random.Random(1), logger=logging.getLogger("t"))
    raw.step(msg(pb.MsgRequestPreVote, 2, 4, 7, index=9, log_term=6))
    assert raw.status().term == 0
    assert not [m for m in _drain(raw) if m.msg_type == pb.MsgRequestPreVoteResponse]
    assert raw.status().vote_floor == 6


def test_a_heartbeat_commits_only_what_an_append_of_its_term_matched():
    """Regression (sim seed 2435: state-machine safety broken). After losing a synced
    tail a node may hold an older entry where it had acknowledged the leader's: the
    leader's heartbeat commit (min of its stale match for us and its commit) would commit
    that stale entry. A lost-state node moves its commit from a heartbeat only as far as
    an append of the leader's term matched its log."""
    storage = bootstrapped_storage([1, 2, 3])
    storage.append([pb.Entry(index=6, term=5, data=b"stale")])  # what survived the loss
    storage.set_hardstate(pb.HardState(term=5, commit=5))
    cfg = Config(id=1, election_tick=10, heartbeat_tick=1, lost_state=True)
    raw = RawNode(cfg, storage, rng=random.Random(1), logger=logging.getLogger("t"))
    raw.test_storage = storage
    raw.step(msg(pb.MsgHeartbeat, 2, 1, 7, commit=6))
    _drain(raw)
    assert raw.status().commit == 5, "committed an entry no append of term 7 vouched for"
    e = pb.Entry(index=6, term=7, data=b"leader's")
    raw.step(msg(pb.MsgAppend, 2, 1, 7, index=5, log_term=5, commit=6, entries=[e]))
    _drain(raw)
    assert raw.status().commit == 6
    assert raw.raft.storage.entries(6, 7)[0].data == b"leader's"
    raw.step(msg(pb.MsgHeartbeat, 2, 1, 7, commit=6))
    _drain(raw)
    assert raw.status().commit == 6


def test_an_election_right_after_the_restart_is_not_witnessed(caplog):
    """Soak seed 1669: the node voted for candidate 6 in term 16, was wiped and
    restarted at once; node 3 won term 15 meanwhile (6's candidacy had not reached it).
    Counting 3's election as witnessed, the node resumed with floor 15 and voted for
    another candidate in 16: two votes in one term, two leaders possible. An election
    counts only once a candidacy open at the loss has ended (4 election timeouts)."""
    raw = _node(lost=True)
    assert not _ask_vote(raw, 3, 15)          # at once after the restart
    _catch_up(raw, 3, 15)
    for _ in range(5):
        raw.tick()
    _drain(raw)
    assert raw.status().voting_withheld       # the old rule resumed here, floor 15
    assert not _ask_vote(raw, 2, 16, last=(6, 15))
    # Later, an election it does see: it resumes above every term it heard.
    _sit_out(raw)
    assert not _ask_vote(raw, 3, 17, last=(6, 15))
    e = pb.Entry(index=7, term=17)
    raw.step(msg(pb.MsgAppend, 3, 1, 17, index=6, log_term=15, commit=7, entries=[e]))
    _drain(raw)
    with caplog.at_level(logging.INFO, logger="t"):
        raw.tick()
    assert not raw.status().voting_withheld
    assert raw.status().vote_floor == 17
    assert _ask_vote(raw, 2, 18, last=(7, 17))
