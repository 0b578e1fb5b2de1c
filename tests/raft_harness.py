"""A tiny deterministic in-memory network of RawNodes for the raft unit tests.

Each node has a MemoryStorage; `Network.settle()` plays the host loop (each Ready through
tests/ready_driver.py: send, persist, apply committed entries, advance) and delivers
messages until nothing moves. Messages travel as bytes (serialized and parsed again) so the wire format is
exercised. Faults: drop(from, to, p), cut(a, b), isolate(id), recover(). No clock, no I/O.
"""

from __future__ import annotations

import logging
import random
from collections import deque

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Config, MemoryStorage, RawNode, StateRole
from raft.errors import RaftError
from tests.ready_driver import StorageHost, handle_ready


def msg(msg_type: int, frm: int, to: int, term: int, **kw) -> pb.Message:
    """A raft message from `frm` (a Python keyword, so set after construction)."""
    m = pb.Message(msg_type=msg_type, to=to, term=term, **kw)
    setattr(m, "from", frm)
    return m


def bootstrapped_storage(voters: list[int], index: int = 5, term: int = 5) -> MemoryStorage:
    """A MemoryStorage holding only a snapshot at (index, term) with these voters:
    how consensus_raft bootstraps every node of a chain (index 5, term 5)."""
    s = MemoryStorage()
    snap = pb.Snapshot()
    snap.metadata.index = index
    snap.metadata.term = term
    snap.metadata.conf_state.voters.extend(voters)
    s.apply_snapshot(snap)
    return s


def conf_change(*changes: tuple[str, int], transition: int = pb.Auto) -> pb.ConfChangeV2:
    """conf_change(("add", 4), ("remove", 1), ("learner", 5))."""
    kinds = {"add": pb.AddNode, "remove": pb.RemoveNode, "learner": pb.AddLearnerNode}
    cc = pb.ConfChangeV2(transition=transition)
    for kind, nid in changes:
        cc.changes.add(change_type=kinds[kind], node_id=nid)
    return cc


class Node(StorageHost):
    def __init__(self, nid: int, storage: MemoryStorage, config: Config, seed: int, logger: logging.Logger) -> None:
        super().__init__(storage)
        self.id = nid
        self.net: Network | None = None  # set by the Network that runs this node
        self.config = config
        self.raw = RawNode(config, storage, rng=random.Random(seed), logger=logger)
        self.applied: list[pb.Entry] = []  # every committed entry handed out, in order
        self.conf_states: list[pb.ConfState] = []
        # The replicated "state machine": data of applied normal entries (restored from snapshots).
        self.data: list[tuple[int, bytes]] = []
        self.snapshots_installed = 0
        self.to_apply: list[pb.Entry] = []  # handed out, not yet applied (deferred applier)

    @property
    def raft(self):
        return self.raw.raft

    def normal_data(self) -> list[bytes]:
        return [d for _, d in self.data]

    # ---- the Ready hooks (tests/ready_driver.py) ---------------------------------------

    def send(self, msgs: list[pb.Message]) -> None:
        self.net.send(msgs)

    def persist_snapshot(self, snap: pb.Snapshot) -> None:
        self.storage.apply_snapshot(snap)
        self.data = decode_state(snap.data)
        self.snapshots_installed += 1

    def apply(self, entries: list[pb.Entry]) -> int:
        if self.id in self.net.deferred_apply:
            # Asynchronous applier: entries are handed out now, applied when the test says so.
            self.to_apply.extend(entries)
            return 0
        self.apply_now(entries)
        return entries[-1].index

    def apply_now(self, entries: list[pb.Entry]) -> None:
        for e in entries:
            self.applied.append(e)
            if e.entry_type == pb.EntryNormal and e.data:
                self.data.append((e.index, e.data))
            if e.entry_type == pb.EntryConfChangeV2:
                cc = pb.ConfChangeV2.FromString(e.data)
                cs = self.raw.apply_conf_change(cc)
                self.storage.set_conf_state(cs)
                self.conf_states.append(cs)


def encode_state(data: list[tuple[int, bytes]]) -> bytes:
    return b"\x00".join(b"%d:%s" % (i, d) for i, d in data)


def decode_state(blob: bytes) -> list[tuple[int, bytes]]:
    out = []
    for part in blob.split(b"\x00") if blob else []:
        i, d = part.split(b":", 1)
        out.append((int(i), d))
    return out


class Network:
    def __init__(
        self,
        ids: list[int] | int = 3,
        seed: int = 1,
        serialize: bool = True,
        logger: logging.Logger | None = None,
        **cfg,
    ) -> None:
        if isinstance(ids, int):
            ids = list(range(1, ids + 1))
        self.rng = random.Random(seed)
        self.seed = seed
        self.serialize = serialize
        self.logger = logger or logging.getLogger("raft.test")
        self.cfg = dict(election_tick=10, heartbeat_tick=1)
        self.cfg.update(cfg)
        self.nodes: dict[int, Node] = {}
        self.queue: deque[pb.Message] = deque()
        self.dropped: dict[tuple[int, int], float] = {}
        self.ignored_types: set[int] = set()
        self.sent: list[pb.Message] = []  # every message handed to the network (for assertions)
        self.report_snapshots = True
        self.on_deliver = None  # optional callback(msg) before each delivery (transcripts)
        self.deferred_apply: set[int] = set()  # nodes whose applier runs only on apply_pending()
        for nid in ids:
            self.add_node(nid, voters=ids)

    # ---- membership of the harness ---------------------------------------------------

    def add_node(self, nid: int, voters: list[int] | None = None, storage: MemoryStorage | None = None, **cfg) -> Node:
        if storage is None:
            storage = MemoryStorage.new_with_conf_state(list(voters) if voters else [])
        c = dict(self.cfg)
        c.update(cfg)
        node = self._new_node(nid, storage, c, seed=self.seed * 1000 + nid)
        self.nodes[nid] = node
        return node

    def _new_node(self, nid: int, storage: MemoryStorage, cfg: dict, seed: int) -> Node:
        node = Node(nid, storage, Config(id=nid, **cfg), seed=seed, logger=self.logger)
        node.net = self
        return node

    def restart(self, nid: int, **cfg) -> Node:
        """Crash and restart a node from what its storage holds (MemoryStorage is durable here)."""
        old = self.nodes[nid]
        c = dict(self.cfg)
        c.update(cfg)
        c["applied"] = old.raft.log.applied
        node = self._new_node(nid, old.storage, c, seed=self.seed * 1000 + nid + 7)
        node.applied = old.applied[: c["applied"] - (old.applied[0].index - 1) if old.applied else 0]
        self.nodes[nid] = node
        return node

    def wipe(self, nid: int, storage: MemoryStorage | None = None, **cfg) -> Node:
        """The host of `nid` restarts after losing its durable state: a fresh RawNode over
        `storage` (default: empty, with the configured voters, as a wiped data dir), with
        nothing applied. Messages in flight to it are lost with the process."""
        old = self.nodes[nid]
        if storage is None:
            storage = MemoryStorage.new_with_conf_state(sorted(old.raft.prs.conf.voter_ids()))
        c = dict(self.cfg)
        c.update(cfg)
        self.queue = deque(m for m in self.queue if m.to != nid)
        node = self._new_node(nid, storage, c, seed=self.seed * 1000 + nid + 13)
        self.nodes[nid] = node
        return node

    # ---- faults -------------------------------------------------------------------

    def drop(self, frm: int, to: int, p: float = 1.0) -> None:
        self.dropped[(frm, to)] = p

    def cut(self, a: int, b: int) -> None:
        self.drop(a, b)
        self.drop(b, a)

    def isolate(self, nid: int) -> None:
        for other in self.nodes:
            if other != nid:
                self.cut(nid, other)

    def recover(self) -> None:
        self.dropped.clear()
        self.ignored_types.clear()

    def ignore(self, msg_type: int) -> None:
        self.ignored_types.add(msg_type)

    # ---- driving ------------------------------------------------------------------

    def send(self, msgs: list[pb.Message]) -> None:
        for m in msgs:
            self.sent.append(m)
            frm = getattr(m, "from")
            lost = m.msg_type in self.ignored_types
            p = self.dropped.get((frm, m.to), 0.0)
            if p and (p >= 1.0 or self.rng.random() < p):
                lost = True
            if m.msg_type == pb.MsgSnapshot and self.report_snapshots and frm in self.nodes:
                # The host tells raft how the snapshot transfer went (MsgSnapStatus).
                self.nodes[frm].raw.report_snapshot(m.to, not lost)
            if lost:
                continue
            if self.serialize:
                m = pb.Message.FromString(m.SerializeToString())
            self.queue.append(m)

    def handle_ready(self, node: Node) -> bool:
        return handle_ready(node.raw, node)

    def apply_pending(self, nid: int) -> None:
        """The deferred applier of `nid` finishes everything handed out so far."""
        node = self.nodes[nid]
        entries, node.to_apply = node.to_apply, []
        node.apply_now(entries)
        if entries:
            node.raw.advance_apply_to(entries[-1].index)
        self.settle()

    def deliver_one(self) -> bool:
        if not self.queue:
            return False
        m = self.queue.popleft()
        node = self.nodes.get(m.to)
        if self.on_deliver is not None:
            self.on_deliver(m)
        if node is None:
            return True
        try:
            node.raw.step(m)
        except RaftError as e:  # e.g. a response from a removed peer
            self.logger.debug("step error at %d: %s", m.to, e)
        return True

    def settle(self, max_rounds: int = 10_000, max_deliveries: int = 200_000) -> None:
        """Run Readies and deliveries until no node has anything left to do. A message
        storm that never ends (two nodes answering each other forever) fails the test."""
        delivered = 0
        for _ in range(max_rounds):
            moved = False
            for node in list(self.nodes.values()):
                while self.handle_ready(node):
                    moved = True
            while self.deliver_one():
                moved = True
                delivered += 1
                if delivered > max_deliveries:
                    raise AssertionError(f"network did not settle: over {max_deliveries} messages delivered")
                for node in list(self.nodes.values()):
                    while self.handle_ready(node):
                        pass
            if not moved:
                return
        raise AssertionError(f"network did not settle within {max_rounds} rounds")

    def tick(self, n: int = 1, nodes: list[int] | None = None) -> None:
        for _ in range(n):
            for nid in nodes or list(self.nodes):
                self.nodes[nid].raw.tick()
            self.settle()

    def campaign(self, nid: int) -> None:
        self.nodes[nid].raw.campaign()
        self.settle()

    def propose(self, nid: int, data: bytes) -> None:
        self.nodes[nid].raw.propose(data)
        self.settle()

    def compact(self, nid: int, index: int | None = None) -> pb.Snapshot:
        """The host of `nid` snapshots its applied state at `index` (default: applied) and compacts."""
        node = self.nodes[nid]
        index = index or node.raft.log.applied
        cs = node.raft.prs.conf.to_conf_state()
        snap = node.storage.create_snapshot(index, cs, encode_state([(i, d) for i, d in node.data if i <= index]))
        node.storage.compact(index)
        return snap

    # ---- queries ------------------------------------------------------------------

    def leader(self) -> int | None:
        leaders = [n.id for n in self.nodes.values() if n.raft.state == StateRole.Leader]
        best = max(leaders, key=lambda i: self.nodes[i].raft.term, default=None)
        return best

    def elect(self, nid: int) -> None:
        self.campaign(nid)
        assert self.nodes[nid].raft.state == StateRole.Leader, f"node {nid} should have won the election"

    def state(self, nid: int) -> StateRole:
        return self.nodes[nid].raft.state

    def term(self, nid: int) -> int:
        return self.nodes[nid].raft.term
