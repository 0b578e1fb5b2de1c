"""Operator surface of consensus.py (issue 15): the health service as
Kubernetes probes it (liveness "", readiness consensus.Ready, NOT_FOUND for
any other name) and the Prometheus metrics (names, values, labels)."""
import re
import types
import urllib.request

import grpc
import pytest

import consensus
import raft
from cita_raft_pb import common_pb2, consensus_pb2_grpc, health_check_pb2, health_check_pb2_grpc

from .fakes import FakeNetwork, free_port, origin_of
from .harness import Node, addr, leader_of, wait_for

# the fixtures `cluster` and `fast_loops` (autouse) come from conftest.py

SERVING = health_check_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_check_pb2.HealthCheckResponse.NOT_SERVING


def check(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_check_pb2_grpc.HealthStub(ch).Check(
            health_check_pb2.HealthCheckRequest(service=service), timeout=5).status


def scrape(node) -> str:
    url = f"http://127.0.0.1:{node.cfg.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    """The value of one series in Prometheus text, None if absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


# ----- health -----

def test_unknown_health_service_is_not_found(cluster):
    net, (node,) = cluster(1)
    port = node.cfg.grpc_listen_port
    assert check(port) == SERVING
    with pytest.raises(grpc.RpcError) as e:
        check(port, "no.such.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_readiness_serves_once_a_validator_runs_raft(cluster):
    net, nodes = cluster(3)
    for n in nodes:
        wait_for(lambda n=n: check(n.cfg.grpc_listen_port, consensus.READY_SERVICE) == SERVING,
                 what="consensus.Ready SERVING")
        assert check(n.cfg.grpc_listen_port) == SERVING


def test_not_ready_while_unregistered_but_alive(tmp_path):
    # The network port answers nothing: the node cannot register.
    net = FakeNetwork()
    node = Node(tmp_path, 0, net, [addr(0)], network_port=free_port())
    try:
        node.start()
        port = node.cfg.grpc_listen_port
        wait_for(lambda: node.service.controller.reachable, what="controller answered a ping")
        wait_for(lambda: node.service.health.ready_reason is not None, what="first readiness check")
        assert check(port) == SERVING                                  # liveness
        assert check(port, consensus.READY_SERVICE) == NOT_SERVING     # readiness
        assert node.service.health.ready_reason == "not registered with the network"
        text = scrape(node)
        assert sample(text, "consensus_raft_network_registered") == 0
        assert sample(text, "consensus_raft_controller_reachable") == 1
        assert sample(text, "consensus_raft_ready") == 0
    finally:
        node.close()
        net.stop()


def test_cut_off_validator_is_stuck_then_ready_again(cluster):
    net, nodes = cluster(3)
    wait_for(lambda: min(n.ctrl.height for n in nodes) >= 3, what="3 blocks")
    leader = leader_of(nodes)
    victim = next(n for n in nodes if n is not leader)
    me = origin_of(victim.address)
    others = [origin_of(n.address) for n in nodes if n is not victim]
    net.cut |= {(me, o) for o in others} | {(o, me) for o in others}
    port = victim.cfg.grpc_listen_port
    wait_for(lambda: check(port, consensus.READY_SERVICE) == NOT_SERVING, what="cut-off node not ready")
    wait_for(lambda: sample(scrape(victim), "consensus_raft_stuck") == 1, what="stuck gauge")
    assert "no raft leader" in victim.service.health.ready_reason
    assert check(port) == SERVING          # alive all along: liveness must not restart it
    net.cut.clear()
    wait_for(lambda: check(port, consensus.READY_SERVICE) == SERVING, what="ready after the heal")
    assert sample(scrape(victim), "consensus_raft_stuck") == 0


def fake_service(**kw):
    st = types.SimpleNamespace(commit=10, leader_id=7, role=raft.StateRole.Follower, id=1,
                               conf_state=types.SimpleNamespace(voters=[1, 2, 7]))
    base = dict(fatal=None, stopping=types.SimpleNamespace(is_set=lambda: False), registered=True,
                peer_running=lambda: True, raft_status=st, controller_height=100, block_height=100,
                address=b"\x01" * 20, consensus_config=common_pb2.ConsensusConfiguration(),
                controller=types.SimpleNamespace(reachable=True), election_timeout=lambda: 1.0,
                metrics=types.SimpleNamespace(last_contact={}))
    base.update(kw)
    return types.SimpleNamespace(**base), st


def test_readiness_flags_a_chain_that_moves_without_raft():
    # The wiped-follower shape: the controller syncs blocks from peers while
    # this node's raft commit index stands still (a leader is known).
    svc, st = fake_service()
    r = consensus.Readiness(svc, now=0.0)
    limit = r.limit()
    assert r.check(now=0.0)[:2] == (True, False)
    svc.controller_height = 101
    assert r.check(now=limit + 1)[:2] == (True, False)      # one height: a block in flight
    svc.controller_height = 130
    ready, stuck, reason = r.check(now=limit + 2)
    assert (ready, stuck) == (False, True)
    assert "commit index stuck at 10" in reason and "to 130" in reason
    st.commit = 11                                            # raft moves again
    assert r.check(now=limit + 3)[:2] == (True, False)


def test_readiness_flags_a_leader_without_quorum():
    svc, st = fake_service()
    st.role, st.leader_id = raft.StateRole.Leader, 1
    r = consensus.Readiness(svc, now=0.0)
    limit = r.limit()
    svc.metrics.last_contact = {2: 0.0, 7: 0.0}
    assert r.check(now=0.0)[:2] == (True, False)
    svc.metrics.last_contact = {2: limit + 5.0, 7: 0.0}       # 2 answers, 7 silent: 2 of 3 voters
    assert r.check(now=limit + 6)[:2] == (True, False)
    svc.metrics.last_contact = {2: 0.0, 7: 0.0}                # both silent since t=0
    ready, stuck, reason = r.check(now=3 * limit)
    assert (ready, stuck) == (False, True) and "without a quorum" in reason


def test_non_validator_is_ready_without_raft():
    svc, _ = fake_service(peer_running=lambda: False, raft_status=None)
    assert consensus.Readiness(svc).check() == (True, False, "not a validator (not in raft)")
    svc.controller.reachable = False
    assert consensus.Readiness(svc).check()[0] is False


# ----- metrics -----

def test_leader_metrics_are_labels_and_peer_progress(cluster):
    net, nodes = cluster(3)
    wait_for(lambda: min(n.ctrl.height for n in nodes) >= 3, what="3 blocks")
    leader = leader_of(nodes)
    lid = str(leader.service.id)
    wait_for(lambda: all(sample(scrape(n), "consensus_raft_leader", leader_id=lid) == 1 for n in nodes),
             what="every node exports the leader's id as a label")
    for n in nodes:
        text = scrape(n)
        assert "consensus_raft_leader_id" not in text            # no float-valued raft id
        assert "_created" not in text
        assert sample(text, "consensus_raft_is_leader") == (1 if n is leader else 0)
        assert sample(text, "consensus_raft_node_info", raft_id=str(n.service.id),
                      address="0x" + n.address.hex()) == 1
        assert sample(text, "process_cpu_seconds_total") is not None
        assert sample(text, "python_gc_objects_collected_total", generation="0") is not None
        for name in ("consensus_raft_network_registered", "consensus_raft_controller_reachable"):
            assert sample(text, name) == 1, name
        if n is not leader:
            assert "consensus_raft_peer_match_index{" not in text   # progress lives on the leader only
    followers = [n for n in nodes if n is not leader]

    def progress_ok():
        text = scrape(leader)
        last = sample(text, "consensus_raft_last_index")
        for f in followers:
            peer = str(f.service.id)
            match = sample(text, "consensus_raft_peer_match_index", peer=peer)
            nxt = sample(text, "consensus_raft_peer_next_index", peer=peer)
            lag = sample(text, "consensus_raft_peer_lag_entries", peer=peer)
            contact = sample(text, "consensus_raft_peer_last_contact_seconds", peer=peer)
            if None in (match, nxt, lag, contact, last) or not (0 < match < nxt and lag == last - match):
                return False
            if sample(text, "consensus_raft_peer_state", peer=peer, state="Replicate") != 1:
                return False
            if sample(text, "consensus_raft_peer_state", peer=peer, state="Probe") != 0 or contact > 5:
                return False
        return str(leader.service.id) not in re.findall(r'peer="(\d+)"', text)
    wait_for(progress_ok, what="per-peer progress of both followers on the leader")


def test_controller_unreachable_gauge(cluster):
    net, (node,) = cluster(1)
    wait_for(lambda: sample(scrape(node), "consensus_raft_controller_reachable") == 1, what="reachable")
    node.ctrl.unavailable = True
    wait_for(lambda: sample(scrape(node), "consensus_raft_controller_reachable") == 0, what="unreachable")
    node.ctrl.unavailable = False
    wait_for(lambda: sample(scrape(node), "consensus_raft_controller_reachable") == 1, what="reachable again")


def test_latency_histograms_count_calls_without_client_name(cluster):
    net, (node,) = cluster(1)
    with grpc.insecure_channel(f"127.0.0.1:{node.cfg.grpc_listen_port}") as ch:
        stub = consensus_pb2_grpc.ConsensusServiceStub(ch)
        req = common_pb2.ProposalWithProof(proposal=common_pb2.Proposal(height=1))
        stub.CheckBlock(req, timeout=5)
        stub.CheckBlock(req, timeout=5)
        stub.CheckBlock(req, timeout=5, metadata=(("client-name", "controller"),))
    assert check(node.cfg.grpc_listen_port) == SERVING
    text = scrape(node)
    assert sample(text, "unknown_to_CheckBlock_count") == 2
    assert sample(text, "controller_to_CheckBlock_count") == 1
    assert "to_Check_" not in text      # health checks are not measured


def test_commit_gauge_never_trails_the_applied_gauge(cluster):
    """A scrape must never show applied_index above commit_index (CI once
    caught a follower at commit 8, applied 9: the commit gauge moved on the
    next tick, the applied one as soon as the applier finished). Every time a
    node sets its applied gauge, its commit gauge already covers the index."""
    net, nodes = cluster(3)
    seen = []   # (node, commit gauge, applied index) at each applied-gauge update
    for n in nodes:
        m = n.service.metrics
        original = m.applied_index.set

        def checked(value, n=n, m=m, original=original):
            seen.append((n.service.id, m.commit_index._value.get(), value))
            original(value)
        m.applied_index.set = checked
    wait_for(lambda: min(n.ctrl.height for n in nodes) >= 6, what="6 blocks on every node")
    assert {nid for nid, _, _ in seen} == {n.service.id for n in nodes}
    behind = [(nid, commit, applied) for nid, commit, applied in seen if commit < applied]
    assert not behind, behind


def test_withholding_votes_gauge_shows_a_wiped_node_until_it_has_seen_an_election(cluster):
    """A node restarted without its raft state refuses votes until it has seen
    an election (docs/internals.md, Lost state); meanwhile a 3-node chain cannot
    lose another node. Operators (and the devnet's converge) see it in
    consensus_raft_withholding_votes."""
    import shutil
    net, nodes = cluster(3)
    wait_for(lambda: min(n.ctrl.height for n in nodes) >= 3, what="3 blocks")
    victim = next(n for n in nodes if n is not leader_of(nodes))
    for n in nodes:
        assert sample(scrape(n), "consensus_raft_withholding_votes") == 0
    victim.stop()
    shutil.rmtree(victim.cfg.raft_data_path)
    me = origin_of(victim.address)
    others = [origin_of(n.address) for n in nodes if n is not victim]
    net.cut |= {(me, o) for o in others} | {(o, me) for o in others}   # no election to see yet
    victim.start()
    wait_for(lambda: sample(scrape(victim), "consensus_raft_withholding_votes") == 1, what="the gauge at 1")
    net.cut.clear()
    wait_for(lambda: sample(scrape(victim), "consensus_raft_withholding_votes") == 0,
             what="the wiped node voting again after the election it asked for")
    top = max(n.ctrl.height for n in nodes)
    wait_for(lambda: min(n.ctrl.height for n in nodes) >= top + 2, what="2 more blocks on every node")
