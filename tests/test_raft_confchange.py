"""ConfChangeV2: simple changes, joint consensus with auto-leave (thesis §4.3), restore from ConfState."""

import random

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft import ConfChangeError, StateRole
from raft.confchange import Changer, apply_change, restore
from raft.progress import ProgressTracker
from tests.raft_harness import Network, conf_change


def tracker_with(voters, learners=()):
    t = ProgressTracker(16)
    restore(t, 10, pb.ConfState(voters=voters, learners=list(learners)))
    return t


def install(t, cc):
    cfg, prs = apply_change(t, 10, cc)
    t.apply_conf(cfg, prs)
    return t.conf.to_conf_state()


# ---- the changer on its own --------------------------------------------------------------


def test_simple_add_and_remove_one_voter():
    t = tracker_with([1, 2, 3])
    cs = install(t, conf_change(("add", 4)))
    assert list(cs.voters) == [1, 2, 3, 4] and 4 in t.progress
    cs = install(t, conf_change(("remove", 2)))
    assert list(cs.voters) == [1, 3, 4] and 2 not in t.progress


def test_simple_change_of_two_voters_is_refused():
    t = tracker_with([1, 2, 3])
    with pytest.raises(ConfChangeError, match="more than one voter"):
        Changer(t, 10).simple(conf_change(("add", 4), ("add", 5)).changes)
    assert sorted(t.conf.incoming) == [1, 2, 3], "a refused change leaves the tracker untouched"


def test_enter_and_leave_joint():
    t = tracker_with([1, 2, 3])
    cs = install(t, conf_change(("add", 4), ("remove", 1)))
    assert list(cs.voters) == [2, 3, 4] and list(cs.voters_outgoing) == [1, 2, 3] and cs.auto_leave
    assert 1 in t.progress, "an outgoing voter keeps its progress while joint"
    with pytest.raises(ConfChangeError, match="already joint"):
        install(t, conf_change(("add", 5), ("add", 6)))
    cs = install(t, pb.ConfChangeV2())
    assert list(cs.voters) == [2, 3, 4] and list(cs.voters_outgoing) == [] and not cs.auto_leave
    assert 1 not in t.progress


def test_explicit_transition_does_not_auto_leave():
    t = tracker_with([1, 2, 3])
    cs = install(t, conf_change(("add", 4), transition=pb.Explicit))
    assert list(cs.voters_outgoing) == [1, 2, 3] and not cs.auto_leave


def test_leave_non_joint_and_remove_all_voters_are_refused():
    t = tracker_with([1, 2, 3])
    with pytest.raises(ConfChangeError):
        install(t, pb.ConfChangeV2())
    t1 = tracker_with([1])
    with pytest.raises(ConfChangeError, match="removed all voters"):
        install(t1, conf_change(("remove", 1)))


def test_demoting_outgoing_voter_goes_through_learners_next():
    t = tracker_with([1, 2, 3])
    cs = install(t, conf_change(("learner", 3), ("add", 4)))
    assert list(cs.learners_next) == [3] and list(cs.voters) == [1, 2, 4]
    cs = install(t, pb.ConfChangeV2())
    assert list(cs.learners) == [3] and list(cs.learners_next) == []


def test_restore_round_trips_joint_conf_state():
    cs = pb.ConfState(voters=[2, 3, 4], voters_outgoing=[1, 2, 3], learners=[7], learners_next=[1], auto_leave=True)
    t = ProgressTracker(16)
    restore(t, 5, cs)
    assert t.conf.to_conf_state() == cs


# ---- in a running cluster ---------------------------------------------------------------


def propose_cc(net, nid, cc):
    net.nodes[nid].raw.propose_conf_change(cc)
    net.settle()


def join(net, leader, new_ids, cc):
    """Add empty nodes the way a real host does: the change commits among the old members,
    the leader snapshots (so the snapshot's conf state includes the newcomers), then the
    newcomers receive that snapshot and catch up from it."""
    for nid in new_ids:
        net.add_node(nid)
        net.cut(leader, nid)
    propose_cc(net, leader, cc)
    net.compact(leader)
    net.recover()
    net.tick(3)


def test_add_node_catches_up_and_votes():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"a")
    join(net, 1, [4], conf_change(("add", 4)))
    assert net.nodes[4].snapshots_installed == 1
    assert net.nodes[4].normal_data() == [b"a"]
    assert sorted(net.nodes[1].raft.prs.conf.incoming) == [1, 2, 3, 4]
    assert net.nodes[4].raft.promotable
    # With 4 voters a majority is 3: {1, 4} cannot commit, {1, 2, 4} can (4 counts).
    net.isolate(2)
    net.isolate(3)
    net.propose(1, b"needs-4")
    assert net.nodes[1].normal_data() == [b"a"]
    net.recover()
    net.isolate(3)
    net.tick(2)
    assert net.nodes[4].normal_data() == [b"a", b"needs-4"]


def test_remove_follower():
    net = Network(3)
    net.elect(1)
    propose_cc(net, 1, conf_change(("remove", 3)))
    assert sorted(net.nodes[1].raft.prs.conf.incoming) == [1, 2]
    net.isolate(3)
    net.propose(1, b"two-nodes")
    assert net.nodes[2].normal_data() == [b"two-nodes"]


def test_removed_leader_steps_down_and_others_elect():
    net = Network(3)
    net.elect(1)
    propose_cc(net, 1, conf_change(("remove", 1)))
    assert net.state(1) == StateRole.Follower
    assert not net.nodes[1].raft.promotable
    net.isolate(1)
    net.tick(40, nodes=[2, 3])
    leader = net.leader()
    assert leader in (2, 3)
    net.propose(leader, b"new-era")
    assert net.nodes[5 - leader].normal_data() == [b"new-era"]


def test_joint_change_with_auto_leave():
    net = Network(3)
    net.elect(1)
    join(net, 1, [4, 5], conf_change(("add", 4), ("add", 5), ("remove", 2)))
    for nid in (1, 3):
        cs = net.nodes[nid].conf_states
        assert len(cs) == 2, (nid, cs)
        assert list(cs[0].voters_outgoing) == [1, 2, 3] and list(cs[0].voters) == [1, 3, 4, 5]
    for nid in (1, 3, 4, 5):
        cs = net.nodes[nid].conf_states[-1]
        assert list(cs.voters) == [1, 3, 4, 5] and list(cs.voters_outgoing) == [], nid
        assert sorted(net.nodes[nid].raft.prs.conf.incoming) == [1, 3, 4, 5]
    # The leave entry was the empty ConfChangeV2 proposed automatically by the leader.
    leave = [e for e in net.nodes[1].applied if e.entry_type == pb.EntryConfChangeV2][-1]
    assert pb.ConfChangeV2.FromString(leave.data) == pb.ConfChangeV2()


def test_replace_all_voters_in_two_steps_like_consensus_raft():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"old")
    join(net, 1, [4, 5, 6], conf_change(("add", 4), ("add", 5), ("add", 6)))
    assert sorted(net.nodes[1].raft.prs.conf.incoming) == [1, 2, 3, 4, 5, 6]
    propose_cc(net, 1, conf_change(("remove", 1), ("remove", 2), ("remove", 3)))
    net.tick(3)
    # Leaving the joint config removed the leader: it steps down, the new voters elect.
    assert net.state(1) == StateRole.Follower
    for nid in (1, 2, 3):
        net.isolate(nid)
    net.tick(40, nodes=[4, 5, 6])
    leader = net.leader()
    assert leader in (4, 5, 6)
    net.propose(leader, b"new")
    for nid in (4, 5, 6):
        assert net.nodes[nid].normal_data() == [b"old", b"new"]
        assert sorted(net.nodes[nid].raft.prs.conf.incoming) == [4, 5, 6]


def test_second_conf_change_while_one_is_pending_becomes_empty_entry():
    net = Network(3)
    net.elect(1)
    r = net.nodes[1].raw
    r.propose_conf_change(conf_change(("add", 4)))
    r.propose_conf_change(conf_change(("add", 5)))
    net.settle()
    cc_entries = [e for e in net.nodes[2].applied if e.entry_type == pb.EntryConfChangeV2]
    assert len(cc_entries) == 1
    assert sorted(net.nodes[2].raft.prs.conf.incoming) == [1, 2, 3, 4]


def test_node_does_not_campaign_with_unapplied_conf_change():
    net = Network(3)
    net.elect(1)
    net.propose(1, b"x")
    n2 = net.nodes[2]
    # A committed conf change that the host has not applied yet:
    e = pb.Entry(entry_type=pb.EntryConfChangeV2, data=conf_change(("add", 4)).SerializeToString())
    n2.raft.log.append([pb.Entry(entry_type=e.entry_type, data=e.data, term=1, index=n2.raft.log.last_index() + 1)])
    n2.raft.log.commit_to(n2.raft.log.last_index())
    n2.raw.campaign()
    assert n2.raft.state == StateRole.Follower


def test_random_change_sequences_keep_invariants_and_round_trip():
    """Seeded property check: whatever sequence of changes is accepted, the configuration
    stays well formed and a ConfState round-trips through restore()."""
    rng = random.Random(11)
    kinds = ["add", "remove", "learner"]
    for _ in range(200):
        t = tracker_with([1, 2, 3])
        for _ in range(8):
            if t.conf.is_joint() and rng.random() < 0.5:
                cc = pb.ConfChangeV2()
            else:
                n = rng.choice([1, 1, 2, 3])
                cc = conf_change(*[(rng.choice(kinds), rng.randint(1, 6)) for _ in range(n)])
            before = t.conf.to_conf_state()
            try:
                cs = install(t, cc)
            except ConfChangeError:
                assert t.conf.to_conf_state() == before, "a refused change must not alter the config"
                continue
            voters = set(cs.voters) | set(cs.voters_outgoing)
            assert cs.voters, "never zero voters"
            assert not (set(cs.learners) & voters)
            assert set(cs.learners_next) <= set(cs.voters_outgoing)
            assert set(t.progress) == voters | set(cs.learners) | set(cs.learners_next)
            fresh = ProgressTracker(16)
            restore(fresh, 10, cs)
            assert fresh.conf.to_conf_state() == cs


def test_auto_leave_waits_for_the_host_to_apply_the_joint_config():
    # The leader proposes the leave entry only once its host reports (advance_apply_to)
    # that the joint configuration was applied, as raft-rs's commit_apply.
    net = Network(3)
    net.elect(1)
    net.deferred_apply.add(1)
    for nid in (4, 5):
        net.add_node(nid)
        net.cut(1, nid)
    net.nodes[1].raw.propose_conf_change(conf_change(("add", 4), ("add", 5)))
    net.settle()
    leader = net.nodes[1]
    assert leader.raft.log.committed == 2 and not leader.raft.prs.conf.is_joint()
    assert [e.index for e in leader.to_apply] == [2]
    assert leader.raft.log.last_index() == 2, "no leave entry before the joint config is applied"
    net.apply_pending(1)
    assert leader.raft.prs.conf.is_joint()
    assert leader.raft.log.last_index() == 3
    last = pb.Entry()
    last.CopyFrom(leader.raft.log.slice(3, 4)[0])
    assert last.entry_type == pb.EntryConfChangeV2 and last.data == b""


def test_conf_change_proposal_refused_while_previous_is_unapplied():
    net = Network(3)
    net.elect(1)
    net.deferred_apply.add(1)
    net.nodes[1].raw.propose_conf_change(conf_change(("add", 4)))
    net.settle()
    net.nodes[1].raw.propose_conf_change(conf_change(("add", 5)))
    net.settle()
    ents = net.nodes[2].applied
    assert [e.entry_type for e in ents[-2:]] == [pb.EntryConfChangeV2, pb.EntryNormal]
    assert ents[-1].data == b"", "the refused change is replaced by an empty normal entry"
