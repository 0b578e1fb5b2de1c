"""A follower that lost its durable state catches up while the leader stays (issue 13, defect 4).

A wiped data dir or a WAL whose synced tail was lost leaves a follower whose log ends below
what it once acknowledged (the leader's `matched`). The leader must not dismiss its
rejections as stale: within two election timeouts, with the same leader and term, the
follower holds the leader's committed log again (by entries, or by a snapshot when the
leader compacted them), and the traffic per tick stays bounded meanwhile.
"""

from __future__ import annotations

import logging

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft import MemoryStorage, StateRole
from tests.raft_harness import Network, bootstrapped_storage, msg

ELECTION = 10


def assert_bounded(per_tick: list[int], missing: int) -> None:
    """Steady state of 3 nodes with heartbeat_tick 1 is 2 heartbeats and 2 responses per
    tick. Catching up may add, once, a rejection, a probe and its answer, and an append
    and an ack per missing entry (one entry per append with max_size_per_msg 0): never a
    rejection/probe ping-pong (the defect: 200-390 messages/s in the service)."""
    assert sum(per_tick) <= 4 * len(per_tick) + 2 * missing + 8, per_tick


CONFIGS = {
    "plain": {},
    "prevote+checkquorum": {"pre_vote": True, "check_quorum": True},
    "batched-appends": {"max_size_per_msg": 1 << 20},
    "window-of-2": {"max_size_per_msg": 0, "max_inflight_msgs": 2},
}


def committed_log(node) -> list[tuple[int, int, bytes]]:
    lg = node.raft.log
    return [(e.index, e.term, e.data) for e in lg.slice(lg.first_index(), lg.committed + 1)]


def run_until_caught_up(net: Network, leader: int, nid: int, ticks: int = 2 * ELECTION) -> tuple[int, list[int]]:
    """Tick every node until `nid` committed everything the leader committed (and
    applied the same data); returns (ticks used, messages sent in each tick)."""
    term = net.term(leader)
    missing = net.nodes[leader].raft.log.last_index() - net.nodes[nid].raft.log.last_index()
    per_tick = []
    for t in range(1, ticks + 1):
        before = len(net.sent)
        net.tick()
        per_tick.append(len(net.sent) - before)
        assert net.state(leader) == StateRole.Leader and net.term(leader) == term, (
            f"tick {t}: the leader changed; the follower must catch up under the same leader"
        )
        lead, f = net.nodes[leader], net.nodes[nid]
        if (
            f.raft.log.committed == lead.raft.log.committed
            and f.raft.log.applied == lead.raft.log.applied
            and f.normal_data() == lead.normal_data()
        ):
            assert_bounded(per_tick, missing)
            return t, per_tick
    lead, f = net.nodes[leader], net.nodes[nid]
    raise AssertionError(
        f"node {nid} did not catch up within {ticks} ticks: commit {f.raft.log.committed} "
        f"last {f.raft.log.last_index()} vs leader commit {lead.raft.log.committed}; "
        f"leader progress {lead.raw.status().progress.get(nid)}; messages per tick {per_tick}"
    )


def assert_quiet_after(net: Network, ticks: int = 5) -> None:
    """After catching up, the cluster is back to heartbeats only."""
    for _ in range(ticks):
        before = len(net.sent)
        net.tick()
        assert len(net.sent) - before <= 4, [
            (pb.MessageType.Name(m.msg_type), getattr(m, "from"), m.to) for m in net.sent[before:]
        ]


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_wiped_follower_catches_up_by_log_under_the_same_leader(cfg):
    net = Network(3, election_tick=ELECTION, **cfg)
    net.elect(1)
    for i in range(20):
        net.propose(1, b"block-%d" % i)
    assert net.nodes[3].raft.log.committed == net.nodes[1].raft.log.committed
    net.wipe(3)
    used, per_tick = run_until_caught_up(net, 1, 3)
    assert committed_log(net.nodes[3]) == committed_log(net.nodes[1])
    assert net.nodes[3].normal_data() == [b"block-%d" % i for i in range(20)]
    assert_quiet_after(net)
    # and it keeps replicating normally
    net.propose(1, b"after")
    assert net.nodes[3].normal_data()[-1] == b"after"


def test_wiped_follower_catches_up_by_snapshot_when_the_leader_compacted():
    net = Network(3, election_tick=ELECTION)
    net.elect(1)
    for i in range(20):
        net.propose(1, b"block-%d" % i)
    net.compact(1)
    net.wipe(3)
    used, per_tick = run_until_caught_up(net, 1, 3)
    assert net.nodes[3].snapshots_installed == 1
    assert net.nodes[3].normal_data() == [b"block-%d" % i for i in range(20)]
    assert_quiet_after(net)


def test_wiped_bootstrapped_follower_catches_up_like_consensus_raft():
    """consensus_raft nodes start from a snapshot at index 5, term 5; a wiped node starts
    from that snapshot again (pre-vote on, as the service runs)."""
    voters = [11, 22, 33]
    net = Network([], seed=5, election_tick=ELECTION, pre_vote=True)
    for nid in voters:
        net.add_node(nid, storage=bootstrapped_storage(voters))
    net.elect(11)
    for i in range(12):
        net.propose(11, b"block-%d" % i)
    net.wipe(33, storage=bootstrapped_storage(voters))
    used, per_tick = run_until_caught_up(net, 11, 33)
    assert net.nodes[33].normal_data() == [b"block-%d" % i for i in range(12)]
    assert_quiet_after(net)


@pytest.mark.parametrize("lost", [1, 4])
def test_follower_that_lost_its_synced_wal_tail_catches_up(lost):
    """The follower restarts with its log (and hard state) as of `lost` entries ago: a
    synced tail that recovery cut. The leader's match for it is beyond its last index."""
    net = Network(3, election_tick=ELECTION)
    net.elect(1)
    for i in range(10):
        net.propose(1, b"block-%d" % i)
    old = net.nodes[3].storage
    last = old.last_index() - lost
    st = MemoryStorage.new_with_conf_state([1, 2, 3])
    st.append(old.entries(1, last + 1))
    hs = pb.HardState()
    hs.CopyFrom(old.hard_state)
    hs.commit = min(hs.commit, last)
    st.set_hardstate(hs)
    net.wipe(3, storage=st)
    assert net.nodes[3].raft.log.last_index() < net.nodes[1].raw.status().progress[3][0]
    used, per_tick = run_until_caught_up(net, 1, 3)
    assert committed_log(net.nodes[3]) == committed_log(net.nodes[1])
    assert_quiet_after(net)


def test_lost_tail_follower_catches_up_while_blocks_keep_coming():
    """The leader keeps proposing while the follower is behind its recorded match: the
    rejections of the new appends must not be taken as stale forever."""
    net = Network(3, election_tick=ELECTION)
    net.elect(1)
    for i in range(10):
        net.propose(1, b"block-%d" % i)
    old = net.nodes[3].storage
    st = MemoryStorage.new_with_conf_state([1, 2, 3])
    st.append(old.entries(1, old.last_index() - 1))
    hs = pb.HardState()
    hs.CopyFrom(old.hard_state)
    hs.commit = min(hs.commit, old.last_index() - 2)
    st.set_hardstate(hs)
    net.wipe(3, storage=st)
    for i in range(3):
        net.propose(1, b"more-%d" % i)
    used, per_tick = run_until_caught_up(net, 1, 3)
    assert committed_log(net.nodes[3]) == committed_log(net.nodes[1])


def test_heartbeat_commit_beyond_last_index_is_reported_once_not_every_heartbeat(caplog):
    net = Network(3, election_tick=ELECTION)
    net.elect(1)
    for i in range(5):
        net.propose(1, b"block-%d" % i)
    net.nodes[1].raw.raft.skip_bcast_commit = False
    net.wipe(3)
    with caplog.at_level(logging.WARNING, logger="raft.test"):
        run_until_caught_up(net, 1, 3)
        for _ in range(2 * ELECTION):
            net.tick()
    beyond = [r for r in caplog.records if "heartbeat commit beyond last index" in r.getMessage()]
    assert len(beyond) <= 1, [r.getMessage() for r in beyond]


def test_follower_reports_lost_log_to_the_leader_on_a_heartbeat():
    """Unit view of the follower's signal: a heartbeat whose commit is beyond our last
    index means we lost entries we acknowledged; the answer carries a rejection whose
    hint is our last index, so the leader probes from there (raft-rs field meanings)."""
    from raft import Config, RawNode

    st = MemoryStorage.new_with_conf_state([1, 2, 3])
    raw = RawNode(Config(id=3), st)
    raw.step(msg(pb.MsgHeartbeat, 1, 3, 4, commit=9))
    rd = raw.ready()
    out = rd.messages + rd.persisted_messages
    rejects = [m for m in out if m.msg_type == pb.MsgAppendResponse and m.reject]
    assert len(rejects) == 1, out
    r = rejects[0]
    assert (r.to, r.term, r.index, r.reject_hint, r.log_term, r.request_snapshot) == (1, 4, 9, 0, 0, 0)
    # the heartbeat itself is still answered (check-quorum / read-index of any leader)
    assert [m.msg_type for m in out].count(pb.MsgHeartbeatResponse) == 1


def test_stale_rejection_below_match_costs_at_most_one_probe():
    """A rejection below match may also be a duplicate of an old one: the leader then
    re-sends from the hint once and is back in Replicate after the follower's answer."""
    net = Network(3, election_tick=ELECTION)
    net.elect(1)
    for i in range(5):
        net.propose(1, b"block-%d" % i)
    before = len(net.sent)
    net.nodes[1].raw.step(msg(pb.MsgAppendResponse, 3, 1, net.term(1), index=3, reject=True, reject_hint=2, log_term=1))
    net.settle()
    # a probe at the hint, its ack, then the entries after it again (one per append) and their acks
    assert len(net.sent) - before <= 2 + 2 * (net.nodes[1].raft.log.last_index() - 2)
    assert net.nodes[1].raw.status().progress[3][2] == "Replicate"
    assert net.nodes[1].raw.status().progress[3][0] == net.nodes[1].raft.log.last_index()
