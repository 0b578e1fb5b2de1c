"""Behaviour differences between this core and etcd raft / raft-rs found by the interop tests
(tests/test_interop.py), each shrunk to a unit test on bare RawNodes.

Every test names the difference it pins and how the oracle behaves.  The nodes here are
driven by hand, one batch of messages per Ready, because several differences only show when
a node handles more than one message before its next Ready (as a real host loop does).
"""
from __future__ import annotations

import random

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Config, MemoryStorage, RawNode, StateRole
from tests import ready_driver
from tests.ready_driver import StorageHost


class _Collect(StorageHost):
    """Persist to `st`, collect every message, apply conf changes."""

    def __init__(self, node: RawNode, st: MemoryStorage) -> None:
        super().__init__(st)
        self.node = node
        self.out: list[pb.Message] = []

    def send(self, msgs: list[pb.Message]) -> None:
        self.out += msgs

    def apply(self, entries: list[pb.Entry]) -> int:
        for e in entries:
            if e.entry_type == pb.EntryConfChangeV2:
                self.node.apply_conf_change(pb.ConfChangeV2.FromString(e.data))
        return entries[-1].index


def drain(node: RawNode, st: MemoryStorage) -> list[pb.Message]:
    """Play the host for one node until it has no Ready (tests/ready_driver.py): persist,
    collect messages, apply."""
    host = _Collect(node, st)
    ready_driver.drain(node, host)
    return host.out


class Batches:
    """A round-based network: every node handles all messages addressed to it, then one drain."""

    def __init__(self, ids=(1, 2, 3), **cfg) -> None:
        self.storages = {i: MemoryStorage.new_with_conf_state(list(ids)) for i in ids}
        self.nodes = {i: RawNode(Config(id=i, **cfg), self.storages[i], rng=random.Random(i)) for i in ids}
        self.inbox: dict[int, list[pb.Message]] = {i: [] for i in ids}
        self.sent: list[list[pb.Message]] = []   # messages sent, per round

    def round(self) -> list[pb.Message]:
        sent: list[pb.Message] = []
        for i, node in self.nodes.items():
            msgs, self.inbox[i] = self.inbox[i], []
            for m in msgs:
                node.step(pb.Message.FromString(m.SerializeToString()))
            sent += drain(node, self.storages[i])
        for m in sent:
            self.inbox[m.to].append(m)
        self.sent.append(sent)
        return sent

    def settle(self, max_rounds: int = 100) -> None:
        for _ in range(max_rounds):
            if not any(self.inbox.values()):
                return
            self.round()
        raise AssertionError("did not settle")


def test_first_commit_after_election_sends_one_append_per_follower():
    """Found by the interop message traces (EEE vs PPP, campaign then propose): when the new
    leader's first entry commits, etcd and raft-rs send each follower exactly one MsgAppend
    carrying the new commit.  This core sent a follower two: an immediate one because its
    progress had been paused in Probe, and the coalesced broadcast flushed at the same Ready."""
    net = Batches()
    leader = net.nodes[1]
    leader.campaign()
    for m in drain(leader, net.storages[1]):
        net.inbox[m.to].append(m)
    net.settle()
    assert leader.raft.state == StateRole.Leader
    # the empty entry of the new term was appended, acknowledged in one batch and committed
    commit_round = [r for r in net.sent if any(m.msg_type == pb.MsgAppend and m.commit == 1 for m in r)]
    assert commit_round, "the leader never announced commit 1"
    appends = [m for m in commit_round[0] if m.msg_type == pb.MsgAppend]
    per_follower = {to: sum(m.to == to for m in appends) for to in (2, 3)}
    assert per_follower == {2: 1, 3: 1}, f"MsgAppend per follower in the commit round: {per_follower}"
