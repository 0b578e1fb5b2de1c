"""Validator-set changes on a 5-node devnet (nodes 0-3 start as validators,
node 4 as a sync node): 4 validators produce blocks, then remove a follower,
remove the leader, add a validator and replace all validators. A change
scheduled at height H rides in block H and takes effect from H+1 (§1.4)."""
from __future__ import annotations

import pytest

from devnet.chain import read_chain

from .conftest import WAIT, Waiter, make_devnet

ALL = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def net5(tmp_module):
    dn = make_devnet(tmp_module / "net5", nodes=5, validators=4, block_interval=1)
    yield dn
    dn.down()


def validators_now(dn) -> list[int]:
    blocks = read_chain(dn.spec.chain_file(0))
    vals = blocks[-1].validators if blocks else dn.spec.validators
    return sorted(dn.spec.addresses.index(v) for v in vals)


def change(dn, w: Waiter, new: list[int]) -> int:
    """Schedule `new` two blocks ahead; wait until it is on every chain and the new set produces blocks."""
    at = max(dn.heights()) + 2
    entry = dn.schedule_validators(at, [str(i) for i in new])
    w.until(lambda: validators_now(dn) == sorted(new), f"validator change {entry} on chain", WAIT)
    changed_at = max(dn.heights())
    # Blocks after the change are proposed only by members of the new set.
    top = w.progress(new, 3, timeout=WAIT * 1.5)
    later = [b for b in read_chain(dn.spec.chain_file(new[0])) if changed_at + 1 < b.height <= top]
    proposers = {dn.spec.addresses.index(b.proposer.hex()) for b in later}
    assert proposers and proposers <= set(new), f"blocks proposed by {proposers}, validators {new}"
    return top


def test_membership_changes(net5):
    w = Waiter(net5)
    # Four validators produce blocks; the sync node follows through its controller.
    w.leader(among=[0, 1, 2, 3])
    w.progress(ALL, 3)
    w.converge()

    leader = w.leader(among=[0, 1, 2, 3])
    follower = next(i for i in (0, 1, 2, 3) if i != leader)
    vals = [i for i in (0, 1, 2, 3) if i != follower]
    change(net5, w, vals)                       # remove a follower
    w.converge()

    leader = w.leader(among=vals)
    vals = [i for i in vals if i != leader]
    change(net5, w, vals)                       # remove the leader
    assert w.leader(among=vals) != leader
    w.converge()

    vals = sorted(vals + [4])
    change(net5, w, vals)                       # add a validator (the sync node)
    w.converge()

    new = [i for i in ALL if i not in vals]
    change(net5, w, new)                        # replace all validators
    w.converge()
