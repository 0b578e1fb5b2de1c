"""One owner per piece of state (issue 16): every field of PeerLoop (with its
LeaderDuties), Applier, Supervisor and Transport is created in its __init__
and written afterwards only by that owner's greenlet; the Service's own fields
only by the main greenlet. Checked at run time on a 3-node chain that makes
blocks, takes a Reconfigure and loses its leader (hand-off, raft stopped)."""
import sys

import gevent
import grpc
import pytest

import consensus
from cita_raft_pb import common_pb2, consensus_pb2_grpc

from .harness import leader_of, wait_for

OWNER_GREENLET = {consensus.PeerLoop: "peer_loop", consensus.LeaderDuties: "peer_loop",
                  consensus.Applier: "applier_loop", consensus.Supervisor: "supervisor_loop",
                  consensus.Transport: "transport_loop", consensus.Service: "main"}


def current_greenlet() -> str:
    g = gevent.getcurrent()
    if not isinstance(g, gevent.Greenlet):
        return "main"
    fn = g.args[0] if g.args else g._run   # Service.spawn runs fail_stop(fn, ...)
    return getattr(fn, "__name__", repr(fn))


@pytest.fixture
def writers(monkeypatch):
    seen: dict[tuple[str, str], set[str]] = {}
    for cls in OWNER_GREENLET:
        def record(self, name, value, cls=cls):
            if sys._getframe(1).f_code.co_name != "__init__":
                seen.setdefault((cls.__name__, name), set()).add(current_greenlet())
            object.__setattr__(self, name, value)
        monkeypatch.setattr(cls, "__setattr__", record)
    return seen


def test_each_field_is_written_only_by_its_owners_greenlet(cluster, writers):
    net, nodes = cluster(3)
    wait_for(lambda: min(n.ctrl.height for n in nodes) >= 5, what="5 blocks on all 3 nodes")
    for n in nodes:
        ch = grpc.insecure_channel(f"127.0.0.1:{n.cfg.grpc_listen_port}")
        try:
            consensus_pb2_grpc.ConsensusServiceStub(ch).Reconfigure(common_pb2.ConsensusConfiguration(
                height=n.ctrl.height, validators=list(n.ctrl.validators)), timeout=5)
        finally:
            ch.close()
    leader = leader_of(nodes)
    leader.stop()
    others = [n for n in nodes if n is not leader]
    h = max(n.ctrl.height for n in others)
    wait_for(lambda: min(n.ctrl.height for n in others) >= h + 3, timeout=60, what="blocks under a new leader")
    for n in others:
        n.stop()
    assert {("PeerLoop", "node"), ("PeerLoop", "role"), ("LeaderDuties", "proposal_in_flight"),
            ("Applier", "block_height"), ("Supervisor", "controller_height"), ("Transport", "registered"),
            ("Service", "grpc_server")} <= set(writers), "the recording missed writes"
    wrong = {f"{cls}.{field}": sorted(by) for (cls, field), by in writers.items()
             if by != {OWNER_GREENLET[getattr(consensus, cls)]} and (cls, field) != ("Service", "fatal")}
    assert not wrong, wrong
