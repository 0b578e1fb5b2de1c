"""Validator-set changes on a 5-node devnet (nodes 0-3 start as validators,
node 4 as a sync node): 4 validators produce blocks, then remove a follower,
remove the leader, add a validator and replace all validators (by former
validators), at block_interval 1 and 0. A change scheduled at height H rides in
block H and takes effect from H+1 (§1.4)."""
from __future__ import annotations

import pytest

from devnet.chain import read_chain

from .conftest import WAIT, Waiter, make_devnet

ALL = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module", params=[1, 0], ids=["block_interval_1", "block_interval_0"])
def net5(tmp_module, request):
    """At block_interval 0 the chain runs hundreds of blocks ahead of the 3 s
    configuration ping: replace-all stalled there when the removed validators left
    raft before the configuration without them was committed (Hardening I, defect 6)."""
    dn = make_devnet(tmp_module / f"net5-{request.param}", nodes=5, validators=4, block_interval=request.param)
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
    # Blocks after the change are proposed only by members of the new set. (Three
    # blocks above the highest chain: at block_interval 0 a new validator that was
    # syncing may be far below it.)
    top = changed_at + 3
    w.until(lambda: min(w.heights(new)) >= top, f"nodes {new} to reach height {top}", WAIT * 1.5)
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


@pytest.fixture(scope="module")
def net4_fast(tmp_module):
    dn = make_devnet(tmp_module / "net4-fast", nodes=4, validators=4, block_interval=0)
    yield dn
    dn.down()


def test_replace_all_validators_at_block_interval_0(net4_fast):
    """Hardening I, defect 6, as reported: validators {A, C, D} replaced by {B}, B a
    former validator still running, at block_interval 0. The first step adds B; A, C
    and D, told by their controllers that they are no validators, left raft at once
    (their abort heights came from a ping seconds and hundreds of blocks old), before
    the second step removed them, and B stayed alone in a 4-voter configuration.
    Then back again to {A, C, D}, and once more."""
    dn, w = net4_fast, Waiter(net4_fast)
    w.leader()
    w.progress([0, 1, 2, 3], 3)
    change(dn, w, [0, 2, 3])            # B = node 1 becomes a former validator
    w.converge()
    for new in ([1], [0, 2, 3], [1]):
        change(dn, w, new)              # replace all
        w.converge()
