"""One validator alone: it elects itself, produces blocks, restarts from its WAL."""
from __future__ import annotations

import pytest

from devnet.chain import read_chain

from .conftest import Waiter, make_devnet


@pytest.fixture(scope="module")
def net1(tmp_module):
    dn = make_devnet(tmp_module / "net1", nodes=1, block_interval=0)
    yield dn
    dn.down()


def test_single_node_produces_blocks_and_restarts_from_its_wal(net1):
    w = Waiter(net1)
    assert w.leader() == 0
    w.progress([0], 10)
    # kill -9, then restart: the node recovers from its WAL and keeps the chain going.
    assert net1.kill(0)
    before = net1.heights()[0]
    net1.start(0)
    w.progress([0], 5)
    # SIGTERM: a clean stop, then restart.
    assert net1.stop(0)
    net1.start(0)
    w.progress([0], 5)
    blocks = read_chain(net1.spec.chain_file(0))
    assert len(blocks) > before
    assert all(b.proposer == net1.spec.address(0) for b in blocks)
    w.converge()
