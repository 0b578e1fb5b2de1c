"""Integration scenarios on real processes: consensus.py per node, a simulated
controller per node and the network hub (devnet). Run with `make integration`
(DEVNET_INTEGRATION=1); a plain `pytest tests` does not collect them, so the
unit suite stays fast.

Every scenario ends with `converge()`: faults healed, every node back, all
chains at one height and no height committed differently anywhere.
"""
from __future__ import annotations

import os

import pytest

from devnet.ops import Devnet
from tests import waiting

if not os.environ.get("DEVNET_INTEGRATION"):
    collect_ignore_glob = ["test_*.py"]

# Fast ticks keep elections short: tick 50 ms, heartbeat 2 ticks, election 10
# ticks (0.5-1 s randomised).
TICK_MS = int(os.environ.get("DEVNET_TICK_MS", "50"))
HEARTBEAT_TICK = int(os.environ.get("DEVNET_HEARTBEAT_TICK", "2"))
ELECTION_TICK = int(os.environ.get("DEVNET_ELECTION_TICK", "10"))
# Generous bounds on every wait (a loaded 2-core machine), never a timing assertion.
# TEST_WAIT_SCALE multiplies every bound here, as in tests/service (default 4
# there; 2 here, where the base bound is already 40 s). A passing wait returns
# as soon as its condition holds, so only a failing one takes longer.
WAIT_SCALE = waiting.wait_scale(2)
WAIT = float(os.environ.get("DEVNET_WAIT_S", "40"))
# DEVNET_CONSENSUS=stub runs the scenarios against devnet.stub_consensus (no Raft):
# a check that they do fail on a consensus that cannot survive faults.
CONSENSUS = os.environ.get("DEVNET_CONSENSUS", "real")


def make_devnet(path, nodes: int, validators: int | None = None, block_interval: int = 1, seed: int = 1) -> Devnet:
    dn = Devnet.create(str(path), nodes=nodes, validators=validators, block_interval=block_interval,
                       tick_ms=TICK_MS, heartbeat_tick=HEARTBEAT_TICK, election_tick=ELECTION_TICK, seed=seed,
                       consensus=CONSENSUS)
    dn.up(wait_serving=WAIT * WAIT_SCALE)
    return dn


def log_tails(dn: Devnet, lines: int = 25) -> str:
    out = []
    logs = os.path.join(dn.spec.dir, "logs")
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        with open(os.path.join(logs, name), errors="replace") as f:
            tail = f.readlines()[-lines:]
        out.append(f"---- {name} (last {len(tail)} lines)\n" + "".join(tail))
    return "\n".join(out)


class Waiter:
    """Bounded polling against one devnet, with failure messages that show its state."""

    def __init__(self, dn: Devnet):
        self.dn = dn

    def until(self, cond, what: str, timeout: float = WAIT):
        """tests/waiting.wait_for, scaled, with this devnet's state in the failure message."""
        return waiting.wait_for(cond, timeout, what, scale=WAIT_SCALE, interval=0.1, detail=self.state)

    def state(self) -> str:
        return f"heights={self.dn.heights()}\nstatus={self.dn.status()}\n{log_tails(self.dn)}"

    def heights(self, nodes=None) -> list[int]:
        hs = self.dn.heights()
        return [hs[i] for i in (nodes if nodes is not None else range(self.dn.spec.nodes))]

    def progress(self, nodes, blocks: int = 2, timeout: float = WAIT) -> int:
        """Wait until every node in `nodes` is `blocks` above the highest of them now."""
        target = max(self.heights(nodes)) + blocks
        self.until(lambda: min(self.heights(nodes)) >= target, f"nodes {list(nodes)} to reach height {target}",
                   timeout)
        return target

    def leader(self, among=None, exclude=(), timeout: float = WAIT) -> int:
        nodes = [i for i in (among if among is not None else range(self.dn.spec.nodes)) if i not in exclude]

        def find():
            best = None
            for i in nodes:
                m = self.dn.metrics(i)
                if m.get("consensus_raft_role") == 2:
                    t = m.get("consensus_raft_term", 0)
                    if best is None or t > best[1]:
                        best = (i, t)
            return best
        return self.until(find, f"a leader among nodes {nodes}", timeout)[0]

    def converge(self, nodes=None, timeout: float = WAIT) -> int:
        """Heal, restart what is down, then all chains reach one height and agree."""
        dn = self.dn
        dn.heal(all_faults=True)
        for i in range(dn.spec.nodes):
            dn.controller_fault(i, duration_s=0) if dn.running()[f"controller{i}"] else dn.start_controller(i)
            if dn.consensus_pid(i) is None:
                dn.start(i)
        nodes = list(nodes if nodes is not None else range(dn.spec.nodes))
        target = self.progress(nodes, 1, timeout)
        self.until(lambda: len(set(self.heights(nodes))) == 1 or min(self.heights(nodes)) > target,
                   "chains to converge", timeout)
        rows, problems = dn.chains()
        assert problems == [], "chains disagree:\n" + "\n".join(problems)
        # Healed means every node votes again: one restarted without its raft
        # state refuses votes until it has seen an election, and the next
        # scenario's failure would then leave no quorum (a wiped leader after a
        # wiped follower that had not yet seen one stalled the chain).
        self.until(lambda: not any(n["withholding_votes"] for n in dn.status()["nodes"] if n["node"] in nodes),
                   "every node voting again (none withholding votes after a lost state)", timeout)
        return target


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory, request):
    return tmp_path_factory.mktemp(request.module.__name__.split(".")[-1])
