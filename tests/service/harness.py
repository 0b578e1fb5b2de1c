"""Helpers of the service tests: node addresses, bounded waits, an in-process
node (consensus.Service against a fake controller and network) and chain checks.
The fixtures that use them (cluster, fast_loops) are in conftest.py."""
import gevent

import consensus
import raft
from tests import waiting

from .fakes import FakeController, FakeNetwork, free_port


def addr(i: int) -> bytes:
    return bytes([0x10 + i] * 8) + bytes(range(12))


# Bounded waits (tests/waiting.py): bounds sized for a quiet machine, multiplied by
# TEST_WAIT_SCALE (default 4 here); a passing test returns as soon as its condition holds.
WAIT_SCALE = waiting.wait_scale(4)


def wait_for(pred, timeout=30.0, what="condition"):
    """tests/waiting.wait_for with this suite's scale, sleeping in gevent."""
    return waiting.wait_for(pred, timeout, what, scale=WAIT_SCALE, interval=0.05, sleep=gevent.sleep)


class Node:
    def __init__(self, tmp_path, i, net: FakeNetwork, validators, block_interval=0, network_port=None,
                 **cfg_overrides):
        self.address = addr(i)
        self.dir = tmp_path / f"node{i}"
        self.dir.mkdir(exist_ok=True)
        self.ctrl = FakeController(validators, block_interval).start()
        self.net_port = network_port or net.add_node(self.address)
        self.cfg = consensus.Config(
            node_addr=self.address.hex(), node_address=self.address, grpc_listen_port=free_port(),
            network_port=self.net_port, controller_port=self.ctrl.port, metrics_port=free_port(),
            tick_interval_in_millis=20, heartbeat_tick=2, election_tick=10,
            raft_data_path=str(self.dir / "raft-data-dir"), **cfg_overrides)
        self.service = None

    def start(self):
        self.service = consensus.Service(self.cfg)
        self.service.start()
        return self

    def stop(self):
        if self.service:
            self.service.stop()
            self.service = None

    def close(self):
        self.stop()
        self.ctrl.stop()


def leader_of(nodes):
    """The started node that is raft leader now (StopIteration if none)."""
    return next(n for n in nodes if n.service.node.status().role == raft.StateRole.Leader)


def assert_same_chain(nodes):
    heights = [n.ctrl.height for n in nodes]
    top = min(heights)
    for h in range(1, top + 1):
        blocks = {n.ctrl.committed[h] for n in nodes}
        assert len(blocks) == 1, f"height {h} committed differently: {blocks}"
