"""Core Raft rules (paper §5), one behaviour per test, on the in-memory harness."""

import random

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft import (
    Config,
    ConfigInvalid,
    MemoryStorage,
    ProposalDropped,
    RawNode,
    StateRole,
    StepLocalMsg,
    StepPeerNotFound,
)
from tests.raft_harness import Network, bootstrapped_storage, msg

# ---- config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(id=0),
        dict(id=1, heartbeat_tick=0),
        dict(id=1, election_tick=3, heartbeat_tick=3),
        dict(id=1, max_inflight_msgs=0),
        dict(id=1, election_tick=10, min_election_tick=5),
        dict(id=1, election_tick=10, min_election_tick=12, max_election_tick=12),
    ],
)
def test_config_validate_rejects(kw):
    with pytest.raises(ConfigInvalid):
        Config(**kw).validate()


def test_config_defaults_are_raft_rs():
    c = Config(id=1)
    c.validate()
    assert (c.election_tick, c.heartbeat_tick, c.max_size_per_msg, c.max_inflight_msgs) == (10, 1, 0, 256)
    assert not c.check_quorum and not c.pre_vote


# ---- elections (§5.2) -----------------------------------------------------------------


def test_randomized_election_timeout_in_range():
    s = MemoryStorage.new_with_conf_state([1, 2, 3])
    node = RawNode(Config(id=1, election_tick=10), s, rng=random.Random(3))
    seen = set()
    for _ in range(300):
        node.raft.reset_randomized_election_timeout()
        seen.add(node.raft.randomized_election_timeout)
    assert min(seen) >= 10 and max(seen) < 20
    assert len(seen) == 10


def test_follower_campaigns_after_election_timeout():
    net = Network(3, seed=5)
    for _ in range(40):
        net.tick()
        if net.leader() is not None:
            break
    leader = net.leader()
    assert leader is not None, "a leader should be elected within 2 election timeouts"
    terms = {net.term(i) for i in net.nodes}
    assert len(terms) == 1
    # The leader's no-op entry of its term is committed everywhere (§8).
    for n in net.nodes.values():
        assert n.raft.log.committed == n.raft.log.last_index() >= 1


def test_single_node_elects_itself_and_commits():
    net = Network([1])
    net.elect(1)
    net.propose(1, b"a")
    assert net.nodes[1].normal_data() == [b"a"]


def test_one_vote_per_term():
    net = Network(3)
    r = net.nodes[3].raw
    r.step(msg(pb.MsgRequestVote, 1, 3, 1, index=0, log_term=0))
    r.step(msg(pb.MsgRequestVote, 2, 3, 1, index=0, log_term=0))
    rd = r.ready()
    votes = [(getattr(m, "from"), m.to, m.reject) for m in rd.persisted_messages]
    assert votes == [(3, 1, False), (3, 2, True)]
    assert rd.hard_state.vote == 1 and rd.hard_state.term == 1
    assert rd.messages == [], "vote responses must wait for the hard state to be durable"


def test_vote_refused_to_less_up_to_date_log():
    # §5.4.1: the voter's last term is higher, so it rejects.
    net = Network(3)
    net.elect(1)
    net.propose(1, b"x")
    r3 = net.nodes[3].raw
    r3.step(msg(pb.MsgRequestVote, 2, 3, 5, index=100, log_term=0))
    rd = r3.ready()
    (resp,) = rd.persisted_messages
    assert resp.reject and resp.msg_type == pb.MsgRequestVoteResponse
    # raft-rs puts our commit info on the rejection.
    assert resp.commit == net.nodes[3].raft.log.committed and resp.commit_term == 1


def test_vote_request_carries_commit_and_commit_term():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"x")
    net.isolate(2)
    net.nodes[2].raw.campaign()
    rd = net.nodes[2].raw.ready()
    reqs = [m for m in rd.persisted_messages if m.msg_type == pb.MsgRequestVote]
    assert len(reqs) == 2
    for m in reqs:
        assert (m.term, m.index, m.log_term) == (2, 2, 1)
        assert (m.commit, m.commit_term) == (2, 1)


def test_candidate_with_stale_log_loses_and_up_to_date_one_wins():
    net = Network(3)
    net.elect(1)
    net.cut(1, 3)
    net.propose(1, b"a")  # 1 and 2 have it, 3 does not
    net.isolate(1)
    net.recover()
    net.isolate(1)
    net.campaign(3)
    assert net.state(3) != StateRole.Leader
    net.campaign(2)
    assert net.state(2) == StateRole.Leader


def test_leader_steps_down_on_higher_term():
    net = Network(3)
    net.elect(1)
    net.nodes[1].raw.step(msg(pb.MsgHeartbeat, 2, 1, 9))
    assert net.state(1) == StateRole.Follower and net.term(1) == 9
    assert net.nodes[1].raft.leader_id == 2


def test_stale_term_messages_are_ignored():
    net = Network(3)
    net.elect(1)
    net.elect(2)
    before = net.nodes[2].raft.log.last_index()
    net.nodes[2].raw.step(msg(pb.MsgAppend, 1, 2, 1, index=before, log_term=1, entries=[pb.Entry(index=before + 1, term=1)]))
    assert net.nodes[2].raft.log.last_index() == before
    assert net.state(2) == StateRole.Leader


# ---- replication and commit (§5.3, §5.4) ------------------------------------------------


def test_replication_commits_on_majority_and_applies_in_order():
    net = Network(5)
    net.elect(1)
    net.isolate(4)
    net.isolate(5)
    net.recover()
    net.cut(1, 4)
    net.cut(1, 5)
    for i in range(10):
        net.nodes[1].raw.propose(b"%d" % i)
    net.settle()
    for nid in (1, 2, 3):
        assert net.nodes[nid].normal_data() == [b"%d" % i for i in range(10)]
    assert net.nodes[4].normal_data() == []
    net.recover()
    net.tick(3)
    assert net.nodes[5].normal_data() == [b"%d" % i for i in range(10)]


def test_no_commit_without_majority():
    net = Network(3)
    net.elect(1)
    net.isolate(1)
    net.propose(1, b"lost?")
    assert net.nodes[1].raft.log.committed == 1
    assert net.nodes[1].normal_data() == []


def _node_with_log(nid, voters, entries, term):
    s = MemoryStorage.new_with_conf_state(voters)
    s.append([pb.Entry(index=i, term=t) for i, t in entries])
    s.set_hardstate(pb.HardState(term=term))
    return RawNode(Config(id=nid), s, rng=random.Random(nid))


def test_commit_only_counts_current_term_entries():
    # Paper §5.4.2 / Fig. 8: an old-term entry stored on a majority is not committed by
    # counting replicas; it commits once an entry of the leader's term does.
    r = _node_with_log(1, [1, 2, 3], [(1, 1), (2, 2)], term=2)
    r.campaign()
    for voter in (2, 3):
        r.step(msg(pb.MsgRequestVoteResponse, voter, 1, 3))
    assert r.raft.state == StateRole.Leader and r.raft.term == 3
    rd = r.ready()
    r.raft.storage.append(rd.entries)
    r.raft.storage.set_hardstate(rd.hard_state)
    r.advance(rd)
    assert r.raft.log.last_index() == 3  # the no-op of term 3
    r.step(msg(pb.MsgAppendResponse, 2, 1, 3, index=2))
    r.step(msg(pb.MsgAppendResponse, 3, 1, 3, index=2))
    assert r.raft.log.committed == 0, "index 2 is from term 2 and must not commit by counting"
    r.step(msg(pb.MsgAppendResponse, 2, 1, 3, index=3))
    assert r.raft.log.committed == 3


def test_follower_with_divergent_log_catches_up_with_fast_back_off():
    net = Network(3)
    net.elect(1)
    for i in range(3):
        net.propose(1, b"c%d" % i)
    net.isolate(3)
    for i in range(3, 6):
        net.propose(1, b"c%d" % i)  # committed by 1 and 2 only
    # Node 3, partitioned, becomes a leader of term 2 and fills its log with junk it can never commit.
    r3 = net.nodes[3].raft
    r3.become_candidate()
    r3.become_leader()
    for i in range(30):
        net.nodes[3].raw.propose(b"junk%d" % i)
    net.settle()
    # Node 2 (log 1..7) wins term 3 with node 1; its probe for 3 starts above 3's junk start.
    net.nodes[2].raft.term = 2
    net.elect(2)
    net.recover()
    net.propose(2, b"n0")
    net.tick(2)
    want = [b"c%d" % i for i in range(6)] + [b"n0"]
    for nid in (1, 2, 3):
        assert net.nodes[nid].normal_data() == want, nid
    assert net.nodes[3].raft.log.last_index() == net.nodes[2].raft.log.last_index()
    # Fast back-off (raft-rs reject_hint + log_term): one rejection skips all 31 divergent entries.
    rejects = [m for m in net.sent if m.msg_type == pb.MsgAppendResponse and m.reject and getattr(m, "from") == 3]
    assert [(m.index, m.reject_hint, m.log_term) for m in rejects] == [(7, 4, 1)]


def test_heartbeat_commit_is_min_of_match_and_commit():
    net = Network(3)
    net.elect(1)
    net.isolate(3)
    net.propose(1, b"a")
    net.propose(1, b"b")
    leader = net.nodes[1].raw
    leader.raft.tick_heartbeat()
    rd = leader.ready()
    hb = {m.to: m for m in rd.messages if m.msg_type == pb.MsgHeartbeat}
    assert hb[2].commit == 3
    assert hb[3].commit == 1  # node 3 only matched the no-op before it was cut off
    leader.advance(rd)


def test_append_response_waits_for_persistence():
    net = Network(3)
    net.elect(1)
    r1 = net.nodes[1].raw
    r1.propose(b"a")
    rd = r1.ready()
    apps = [m for m in rd.messages if m.msg_type == pb.MsgAppend]
    assert len(apps) == 2, "the leader's appends may go out before its own fsync"
    r1.advance(rd)
    f = net.nodes[2].raw
    f.step(apps[0] if apps[0].to == 2 else apps[1])
    rd2 = f.ready()
    assert rd2.messages == []
    (resp,) = rd2.persisted_messages
    assert resp.msg_type == pb.MsgAppendResponse and resp.index == 2
    assert [e.index for e in rd2.entries] == [2]


def test_leader_does_not_count_itself_before_persisting():
    net = Network([1])
    net.elect(1)
    r = net.nodes[1].raw
    r.propose(b"a")
    rd = r.ready()
    assert rd.committed_entries == []
    assert r.raft.log.committed == 1
    net.nodes[1].storage.append(rd.entries)
    r.advance(rd)
    assert r.raft.log.committed == 2
    rd = r.ready()
    assert [e.data for e in rd.committed_entries] == [b"a"]
    r.advance(rd)


def test_committed_entries_handed_out_once_even_without_apply():
    net = Network([1])
    net.elect(1)
    node = net.nodes[1]
    r = node.raw
    r.propose(b"a")
    for _ in range(3):
        if r.has_ready():
            rd = r.ready()
            node.storage.append(rd.entries)
            if rd.hard_state:
                node.storage.set_hardstate(rd.hard_state)
            node.applied.extend(rd.committed_entries)
            r.advance(rd)  # no advance_apply_to: application is still running
    datas = [e.data for e in node.applied]
    assert datas.count(b"a") == 1
    applied_before = r.raft.log.applied
    r.advance_apply_to(r.raft.log.committed)
    assert r.raft.log.applied > applied_before
    assert not r.has_ready()


def test_ready_twice_without_advance_is_an_error():
    net = Network([1])
    r = net.nodes[1].raw
    r.campaign()
    r.ready()
    with pytest.raises(Exception, match="before advance"):
        r.ready()


def test_proposal_dropped_without_leader():
    net = Network(3)
    with pytest.raises(ProposalDropped):
        net.nodes[1].raw.propose(b"x")


def test_follower_forwards_proposals_to_leader():
    net = Network(3)
    net.elect(1)
    net.propose(2, b"via-2")
    assert net.nodes[3].normal_data() == [b"via-2"]


def test_step_rejects_local_messages_and_unknown_peers():
    net = Network(3)
    net.elect(1)
    r = net.nodes[1].raw
    with pytest.raises(StepLocalMsg):
        r.step(msg(pb.MsgHup, 1, 1, 0))
    with pytest.raises(StepPeerNotFound):
        r.step(msg(pb.MsgAppendResponse, 9, 1, 1, index=1))


def test_restart_keeps_term_vote_and_log():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"a")
    n = net.restart(2)
    assert n.raft.term == 1 and n.raft.vote == 1
    assert n.raft.log.last_index() == 2 and n.raft.log.committed == 2
    net.propose(1, b"b")
    assert net.nodes[2].normal_data()[-1:] == [b"b"]


def test_status_reports_progress_on_leader():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"a")
    st = net.nodes[1].raw.status()
    assert st.role == StateRole.Leader and st.leader_id == 1 and st.commit == 2
    assert st.progress[2][0] == 2 and st.progress[2][2] == "Replicate"
    assert net.nodes[2].raw.status().progress == {}


def test_wire_tolerance_absent_or_zero_snapshot_is_empty():
    net = Network(3)
    net.elect(1)
    r2 = net.nodes[2].raw
    before = r2.raft.log.last_index()
    r2.step(msg(pb.MsgSnapshot, 1, 2, 1))  # no snapshot field at all
    m = msg(pb.MsgSnapshot, 1, 2, 1)
    m.snapshot.data = b""  # present but index 0 (etcd-style zero snapshot)
    r2.step(m)
    assert r2.raft.log.last_index() == before and r2.raft.log.unstable.snapshot is None


def test_stale_shorter_append_does_not_drop_acknowledged_entries():
    net = Network(3)
    net.elect(1)
    r2 = net.nodes[2].raw
    first = msg(pb.MsgAppend, 1, 2, 1, index=1, log_term=1, commit=1, entries=[pb.Entry(index=2, term=1, data=b"a")])
    second = msg(
        pb.MsgAppend,
        1,
        2,
        1,
        index=1,
        log_term=1,
        commit=1,
        entries=[pb.Entry(index=2, term=1, data=b"a"), pb.Entry(index=3, term=1, data=b"b")],
    )
    r2.step(second)
    r2.step(first)  # an old, shorter duplicate arrives late
    assert r2.raft.log.last_index() == 3
    rd = r2.ready()
    assert [m.index for m in rd.persisted_messages] == [3, 2]
    r2.advance(rd)


def test_follower_hands_out_committed_entries_only_after_persisting_them():
    net = Network(3)
    net.elect(1)
    r2 = net.nodes[2].raw
    r2.step(msg(pb.MsgAppend, 1, 2, 1, index=1, log_term=1, commit=2, entries=[pb.Entry(index=2, term=1, data=b"a")]))
    rd = r2.ready()
    assert rd.hard_state.commit == 2
    assert rd.committed_entries == [], "entry 2 is committed but not yet persisted here"
    net.nodes[2].storage.append(rd.entries)
    r2.advance(rd)
    rd = r2.ready()
    assert [e.data for e in rd.committed_entries] == [b"a"]
    r2.advance(rd)


def test_unreachable_follower_falls_back_to_probe():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"a")
    r1 = net.nodes[1].raw
    assert r1.status().progress[2][2] == "Replicate"
    r1.report_unreachable(2)
    assert r1.status().progress[2][2] == "Probe"
    net.propose(1, b"b")  # the probe succeeds, streaming resumes
    assert r1.status().progress[2][2] == "Replicate"
    assert net.nodes[2].normal_data() == [b"a", b"b"]


def test_bogus_append_response_beyond_last_index_is_ignored():
    net = Network(3)
    net.elect(1)
    r1 = net.nodes[1].raw
    r1.step(msg(pb.MsgAppendResponse, 2, 1, 1, index=99))
    assert r1.raft.log.committed == 1
    assert r1.status().progress[2][0] == 1


def test_hard_state_commit_below_snapshot_is_tolerated():
    s = bootstrapped_storage([1, 2, 3])
    s.set_hardstate(pb.HardState(term=5, vote=0, commit=0))
    r = RawNode(Config(id=1), s, rng=random.Random(1))
    assert r.raft.log.committed == 5 and r.raft.term == 5


def test_learner_replicates_but_does_not_vote_or_count():
    net = Network([1, 2, 3, 4])
    for nid in net.nodes:
        cs = pb.ConfState(voters=[1, 2, 3], learners=[4])
        net.nodes[nid] = net.add_node(nid, storage=MemoryStorage.new_with_conf_state([1, 2, 3], [4]))
        assert net.nodes[nid].raft.prs.conf.to_conf_state() == cs
    net.elect(1)
    reqs = [m for m in net.sent if m.msg_type == pb.MsgRequestVote]
    assert sorted(m.to for m in reqs) == [2, 3]
    net.propose(1, b"a")
    assert net.nodes[4].normal_data() == [b"a"]
    assert not net.nodes[4].raft.promotable
    net.isolate(2)
    net.isolate(3)
    net.propose(1, b"b")
    assert net.nodes[1].normal_data() == [b"a"], "a learner's ack must not count towards commit"


def test_term_is_never_below_the_last_log_term_at_start():
    s = bootstrapped_storage([1, 2, 3])
    s.hard_state = pb.HardState()  # a store that forgot the term
    r = RawNode(Config(id=1), s, rng=random.Random(1))
    assert r.raft.term == 5
    r.campaign()
    assert r.raft.term == 6
