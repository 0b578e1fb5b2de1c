"""Helpers of the service tests: node addresses, bounded waits, an in-process
node (consensus.Service against a fake controller and network) and chain checks.
The fixtures that use them (cluster, fast_loops) are in conftest.py."""
import os
import time

import gevent

import consensus
import raft

from .fakes import FakeController, FakeNetwork, free_port


def addr(i: int) -> bytes:
    return bytes([0x10 + i] * 8) + bytes(range(12))


# Every wait is a bounded wait on a condition: a passing test returns as soon as the
# condition holds, so only a failing one pays for the bound. The bounds are sized for a
# quiet machine and multiplied by WAIT_SCALE (default 4), so that a machine with both cores
# busy elsewhere (`make test-loaded`) does not turn slowness into failures.
WAIT_SCALE = float(os.environ.get("TEST_WAIT_SCALE", "4"))


def wait_for(pred, timeout=30.0, what="condition"):
    timeout *= WAIT_SCALE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        gevent.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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
