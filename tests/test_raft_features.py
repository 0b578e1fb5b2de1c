"""Snapshots (§7), leader transfer (thesis §3.10), check-quorum (thesis §6.2) and pre-vote (thesis §9.6)."""

import random

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Config, MemoryStorage, ProposalDropped, RawNode, StateRole
from tests.raft_harness import Network, bootstrapped_storage, msg


def count(net, t, frm=None, to=None):
    return sum(
        1
        for m in net.sent
        if m.msg_type == t and (frm is None or getattr(m, "from") == frm) and (to is None or m.to == to)
    )


# ---- snapshots --------------------------------------------------------------------------


def lagging_follower_after_compaction(report_snapshots=True):
    net = Network(3)
    net.report_snapshots = report_snapshots
    net.elect(1)
    net.propose(1, b"a")
    net.isolate(3)
    for i in range(5):
        net.propose(1, b"b%d" % i)
    net.compact(1)
    assert net.nodes[1].storage.first_index() > net.nodes[3].raft.log.last_index() + 1
    return net


def test_leader_sends_snapshot_when_follower_needs_compacted_entries():
    net = lagging_follower_after_compaction()
    net.recover()
    net.tick(2)
    f = net.nodes[3]
    assert count(net, pb.MsgSnapshot, 1, 3) == 1
    assert f.snapshots_installed == 1
    assert f.normal_data() == net.nodes[1].normal_data() == [b"a"] + [b"b%d" % i for i in range(5)]
    net.propose(1, b"after")
    assert f.normal_data()[-1] == b"after"
    assert net.nodes[1].raw.status().progress[3][2] == "Replicate"
    # The installed conf state came with the snapshot.
    assert list(f.storage.initial_state().conf_state.voters) == [1, 2, 3]


def test_failed_snapshot_is_retried_after_report():
    net = lagging_follower_after_compaction()
    net.recover()
    net.ignore(pb.MsgSnapshot)
    net.tick(1)
    assert count(net, pb.MsgSnapshot, 1, 3) >= 1
    assert net.nodes[3].snapshots_installed == 0
    net.recover()
    net.tick(3)
    assert net.nodes[3].snapshots_installed == 1
    assert net.nodes[3].normal_data() == net.nodes[1].normal_data()


def test_snapshot_works_without_status_reports():
    net = lagging_follower_after_compaction(report_snapshots=False)
    net.recover()
    net.tick(2)
    assert net.nodes[3].normal_data() == net.nodes[1].normal_data()


def test_stale_snapshot_is_ignored_but_acknowledged():
    net = Network(3)
    net.elect(1)
    for i in range(3):
        net.propose(1, b"%d" % i)
    r2 = net.nodes[2].raw
    snap = pb.Snapshot()
    snap.metadata.index = 2
    snap.metadata.term = 1
    snap.metadata.conf_state.voters.extend([1, 2, 3])
    r2.step(msg(pb.MsgSnapshot, 1, 2, 1, snapshot=snap))
    rd = r2.ready()
    assert rd.snapshot is None
    (resp,) = rd.persisted_messages
    assert resp.msg_type == pb.MsgAppendResponse and resp.index == r2.raft.log.committed
    r2.advance(rd)


def test_bootstrap_from_snapshot_5_5_like_consensus_raft():
    voters = [11, 22, 33]
    net = Network([], seed=3)
    for nid in voters:
        net.add_node(nid, storage=bootstrapped_storage(voters))
    net.elect(11)
    assert net.term(11) == 6
    net.propose(11, b"block-1")
    for nid in voters:
        n = net.nodes[nid]
        assert n.normal_data() == [b"block-1"]
        assert [e.index for e in n.applied] == [6, 7]


def test_request_snapshot_from_follower():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"a")
    net.compact(1)
    net.nodes[2].raw.request_snapshot()
    net.settle()
    assert count(net, pb.MsgSnapshot, 1, 2) == 1
    assert net.nodes[2].snapshots_installed == 1
    net.propose(1, b"b")
    net.tick(2)  # after a snapshot the leader probes again on the next heartbeat response
    assert net.nodes[2].normal_data() == [b"a", b"b"]


# ---- leader transfer --------------------------------------------------------------------


def test_transfer_to_up_to_date_follower():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"a")
    net.nodes[1].raw.transfer_leader(2)
    net.settle()
    assert net.state(2) == StateRole.Leader and net.term(2) == 2
    assert net.state(1) == StateRole.Follower
    assert count(net, pb.MsgTimeoutNow, 1, 2) == 1
    net.propose(2, b"b")
    assert net.nodes[1].normal_data() == [b"a", b"b"]


def test_transfer_to_lagging_follower_catches_it_up_first():
    net = Network(3)
    net.elect(1)
    net.isolate(3)
    for i in range(4):
        net.propose(1, b"%d" % i)
    net.recover()
    net.nodes[1].raw.transfer_leader(3)
    net.settle()
    assert net.state(3) == StateRole.Leader
    assert net.nodes[3].normal_data() == [b"%d" % i for i in range(4)]


def test_proposals_dropped_during_transfer_and_transfer_aborts_after_election_timeout():
    net = Network(3, election_tick=10)
    net.elect(1)
    net.isolate(3)
    net.propose(1, b"x")
    net.nodes[1].raw.transfer_leader(3)
    net.settle()
    assert net.nodes[1].raft.lead_transferee == 3
    try:
        net.nodes[1].raw.propose(b"refused")
        raise AssertionError("a proposal during a leader transfer must be dropped")
    except ProposalDropped:
        pass
    net.tick(10, nodes=[1])
    assert net.nodes[1].raft.lead_transferee == 0
    assert net.state(1) == StateRole.Leader
    net.propose(1, b"accepted")
    assert net.nodes[2].normal_data() == [b"x", b"accepted"]


def test_transfer_request_on_follower_is_forwarded_to_leader():
    net = Network(3)
    net.elect(1)
    net.nodes[3].raw.transfer_leader(3)
    net.settle()
    assert net.state(3) == StateRole.Leader


# ---- check quorum -----------------------------------------------------------------------


def test_check_quorum_leader_steps_down_when_isolated():
    net = Network(3, check_quorum=True, election_tick=10)
    net.elect(1)
    net.isolate(1)
    net.tick(21, nodes=[1])
    assert net.state(1) == StateRole.Follower


def test_without_check_quorum_isolated_leader_stays():
    net = Network(3, check_quorum=False, election_tick=10)
    net.elect(1)
    net.isolate(1)
    net.tick(25, nodes=[1])
    assert net.state(1) == StateRole.Leader


def test_check_quorum_lease_ignores_disruptive_vote_requests():
    net = Network(3, check_quorum=True, election_tick=10)
    net.elect(1)
    net.tick(1)
    r2 = net.nodes[2].raw
    r2.step(msg(pb.MsgRequestVote, 3, 2, 9, index=100, log_term=9))
    assert net.term(2) == 1 and net.nodes[2].raft.vote == 1
    # A transfer campaign is allowed through the lease.
    r2.step(msg(pb.MsgRequestVote, 3, 2, 9, index=100, log_term=9, context=b"CampaignTransfer"))
    assert net.term(2) == 9


def test_stale_leader_learns_new_term_from_append_response():
    net = Network(3, check_quorum=True, election_tick=10)
    net.elect(1)
    net.isolate(1)
    net.tick(10, nodes=[2, 3])  # their leader lease expires
    net.elect(2)
    net.recover()
    net.tick(1, nodes=[1])
    assert net.state(1) == StateRole.Follower and net.term(1) == net.term(2)


# ---- pre-vote ---------------------------------------------------------------------------


def test_pre_vote_isolated_node_does_not_inflate_its_term():
    net = Network(3, pre_vote=True, election_tick=10)
    net.elect(1)
    net.isolate(3)
    net.tick(60, nodes=[3])
    assert net.term(3) == 1
    assert net.state(3) == StateRole.PreCandidate
    net.recover()
    net.tick(2)
    assert net.state(1) == StateRole.Leader and net.term(1) == 1
    assert net.nodes[3].raft.leader_id == 1


def test_without_pre_vote_rejoining_node_disrupts_leader():
    net = Network(3, pre_vote=False, election_tick=10)
    net.elect(1)
    net.isolate(3)
    net.tick(60, nodes=[3])
    assert net.term(3) > 2
    net.recover()
    net.tick(30)
    assert net.leader() is not None and net.term(net.leader()) > 1


def test_pre_vote_election_moves_term_once():
    net = Network(3, pre_vote=True)
    net.elect(2)
    assert net.term(2) == 1
    reqs = [m for m in net.sent if m.msg_type == pb.MsgRequestPreVote]
    assert len(reqs) == 2 and all(m.term == 1 for m in reqs)


def test_pre_vote_granted_only_to_up_to_date_log():
    s = MemoryStorage.new_with_conf_state([1, 2, 3])
    s.append([pb.Entry(index=1, term=1), pb.Entry(index=2, term=1)])
    s.set_hardstate(pb.HardState(term=1))
    r = RawNode(Config(id=2, pre_vote=True), s, rng=random.Random(1))
    r.step(msg(pb.MsgRequestPreVote, 3, 2, 2, index=1, log_term=1))
    r.step(msg(pb.MsgRequestPreVote, 1, 2, 2, index=2, log_term=1))
    rd = r.ready()
    got = {m.to: m.reject for m in rd.messages + rd.persisted_messages}
    assert got == {3: True, 1: False}
    assert r.raft.term == 1 and r.raft.vote == 0, "pre-vote must not change term or vote"


# ---- skip_bcast_commit (raft-rs Config / RawNode::skip_bcast_commit) --------------------


def commits(net):
    return {nid: n.raft.log.committed for nid, n in net.nodes.items()}


def test_skip_bcast_commit_followers_learn_commit_with_the_next_append():
    net = Network(3, skip_bcast_commit=True)
    net.elect(1)
    base = commits(net)[1]
    net.propose(1, b"a")
    c = commits(net)
    # The leader committed "a"; nothing told the followers yet (no empty append was broadcast).
    assert c[1] == base + 1 and c[2] == base and c[3] == base
    net.propose(1, b"b")
    c = commits(net)
    # The append carrying "b" carried the commit of "a".
    assert c[1] == base + 2 and c[2] == base + 1 and c[3] == base + 1
    net.tick(net.cfg["heartbeat_tick"], nodes=[1])
    net.settle()
    # A heartbeat carries it too.
    assert set(commits(net).values()) == {base + 2}


def test_skip_bcast_commit_can_be_switched_at_run_time():
    net = Network(3, skip_bcast_commit=True)
    net.elect(1)
    net.nodes[1].raw.skip_bcast_commit(False)
    net.propose(1, b"a")
    assert len(set(commits(net).values())) == 1
    net.nodes[1].raw.skip_bcast_commit(True)
    net.propose(1, b"b")
    c = commits(net)
    assert c[2] == c[1] - 1


def test_skip_bcast_commit_still_broadcasts_a_pending_conf_change():
    from tests.raft_harness import conf_change

    net = Network(3, skip_bcast_commit=True)
    net.elect(1)
    net.nodes[1].raw.propose_conf_change(conf_change(("remove", 3)))
    net.settle()
    c = commits(net)
    # The conf change's commit was broadcast at once: followers apply it without waiting.
    assert c[1] == c[2]
