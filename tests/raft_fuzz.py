"""A seeded, structure-aware fuzzer of raft messages into `RawNode.step` of an in-memory
3-node cluster (issue 14 §2, first bullet). No dependency: a `random.Random(seed)` drives
everything, so a failure prints a seed and an input number that replay it exactly
(`python -m tests.raft_fuzz --seed S --inputs N [--hostile]`).

Each input is one of: a cluster action (tick, proposal, a conf change, delivery with
drops, duplicates and reordering, a crash and restart from storage, compaction), a
replay of a real message sent earlier (stale or duplicated delivery), or a generated
message: every type including values outside the enum and negative ones, terms and
indexes around the node's own and at the extremes (u64 max, the drop limit), entries
with random data, types and (non-)contiguous indexes, conf change entries with garbage
data, snapshots with random metadata, senders 0, self, members and unknown peers; half
of them pass through the wire again (serialized, sometimes with a byte flipped).

Two modes:
* honest (default): generated messages always carry a fault the core must drop or
  refuse (so the cluster stays a non-Byzantine one); checked after every input: only
  RaftError answers from step(), a dropped/refused input changes no hard state, and
  election safety, log matching, commit never going back and committed entries never
  changing, on every node and across nodes;
* hostile: generated messages are also well-formed forgeries (a peer claiming anything).
  Raft does not survive Byzantine peers, so only per-node rules are checked: step()
  answers with RaftError, or stops the node with RaftInvariantError before it would
  break its own committed log (the fuzzer then restarts it, as an orchestrator would);
  commit never goes back and committed entries never change on any node.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Config, MemoryStorage, RawNode, StateRole
from raft.core import VALUE_LIMIT, message_fault
from raft.errors import RaftError, RaftInvariantError
from tests.ready_driver import StorageHost, drain

U64_MAX = (1 << 64) - 1
IDS = (1, 2, 3)
ALL_TYPES = sorted(pb.MessageType.values())
ODD_TYPES = [19, 20, 100, 1 << 20, (1 << 31) - 1, -1, -2, -(1 << 31)]
LEADER_TYPES = (pb.MsgAppend, pb.MsgHeartbeat, pb.MsgSnapshot)


class FuzzFailure(AssertionError):
    pass


@dataclass
class FNode:
    id: int
    storage: MemoryStorage
    raw: RawNode
    data: list[bytes] = field(default_factory=list)


@dataclass
class Stats:
    inputs: int = 0
    generated: int = 0
    replays: int = 0
    actions: int = 0
    step_errors: dict[str, int] = field(default_factory=dict)
    invariant_stops: int = 0
    stop_reasons: list[str] = field(default_factory=list)
    undecodable: int = 0
    leaders: int = 0
    max_commit: int = 0


class _FuzzHost(StorageHost):
    """One node's Readies (tests/ready_driver.py): MemoryStorage, every message to the
    fuzzer's queue (through the wire) and history, node checks after each Ready."""

    def __init__(self, fuzzer: Fuzzer, n: FNode) -> None:
        super().__init__(n.storage)
        self.fuzzer = fuzzer
        self.n = n

    def send(self, msgs: list[pb.Message]) -> None:
        f = self.fuzzer
        for m in msgs:
            f.history.append(m)
            f.queue.append(pb.Message.FromString(m.SerializeToString()))

    def apply(self, entries: list[pb.Entry]) -> int:
        n = self.n
        for e in entries:
            if e.entry_type == pb.EntryConfChangeV2:
                try:
                    cc = pb.ConfChangeV2.FromString(e.data)
                    cs = n.raw.apply_conf_change(cc)
                    n.storage.set_conf_state(cs)
                except (RaftError, DecodeError):
                    pass  # what the service does: log it and keep the old config
            elif e.data:
                n.data.append(e.data)
        return entries[-1].index

    def after_advance(self) -> None:
        self.fuzzer.check_node(self.n)


class Fuzzer:
    def __init__(self, seed: int, hostile: bool = False) -> None:
        self.seed = seed
        self.hostile = hostile
        self.rng = random.Random(seed)
        r = self.rng
        self.cfg = dict(
            election_tick=r.choice([5, 10]),
            heartbeat_tick=1,
            pre_vote=r.random() < 0.5,
            check_quorum=r.random() < 0.5,
            max_size_per_msg=r.choice([0, 1 << 20]),
            max_inflight_msgs=r.choice([2, 256]),
        )
        self.logger = logging.getLogger("raft.fuzz")
        self.logger.disabled = True
        self.nodes: dict[int, FNode] = {}
        for nid in IDS:
            st = MemoryStorage.new_with_conf_state(list(IDS))
            self.nodes[nid] = FNode(nid, st, self._rawnode(nid, st, 0))
        self.queue: deque[pb.Message] = deque()
        self.history: deque[pb.Message] = deque(maxlen=400)
        self.stats = Stats()
        # invariants
        self.leader_of_term: dict[int, int] = {}
        self.committed_terms: dict[int, int] = {}          # across nodes (honest mode)
        self.node_committed: dict[int, dict[int, int]] = {nid: {} for nid in IDS}
        self.last_commit: dict[int, int] = {nid: 0 for nid in IDS}
        self.current = ""

    # ---- host ---------------------------------------------------------------------

    def _rawnode(self, nid: int, st: MemoryStorage, applied: int) -> RawNode:
        cfg = Config(id=nid, applied=applied, **self.cfg)
        return RawNode(cfg, st, rng=random.Random(self.rng.random()), logger=self.logger)

    def restart(self, nid: int) -> None:
        n = self.nodes[nid]
        n.raw = self._rawnode(nid, n.storage, n.raw.raft.log.applied)
        self.queue = deque(m for m in self.queue if m.to != nid)

    def handle_ready(self, n: FNode) -> None:
        drain(n.raw, _FuzzHost(self, n))

    def step(self, n: FNode, m: pb.Message) -> bool:
        """Step `m` into `n`; False if the node stopped (RaftInvariantError, hostile only)."""
        try:
            n.raw.step(m)
        except RaftInvariantError as e:
            if not self.hostile:
                raise
            self.stats.invariant_stops += 1
            if len(self.stats.stop_reasons) < 5:
                self.stats.stop_reasons.append(f"{e} <- {self.current[:200]}")
            self.restart(n.id)
            return False
        except RaftError as e:
            k = type(e).__name__
            self.stats.step_errors[k] = self.stats.step_errors.get(k, 0) + 1
        return True

    def deliver(self, budget: int) -> None:
        r = self.rng
        for _ in range(budget):
            if not self.queue:
                return
            if r.random() < 0.1 and len(self.queue) > 1:
                self.queue.rotate(-r.randrange(1, len(self.queue)))  # reorder
            m = self.queue.popleft()
            x = r.random()
            if x < 0.05:
                continue  # dropped
            if x < 0.08:
                self.queue.append(m)  # duplicated, later
            n = self.nodes.get(m.to)
            if n is None:
                continue
            if m.msg_type == pb.MsgSnapshot and getattr(m, "from") in self.nodes:
                try:
                    self.nodes[getattr(m, "from")].raw.report_snapshot(m.to, True)
                except RaftError:
                    pass
            if self.step(n, m):
                self.handle_ready(n)
            else:
                self.handle_ready(self.nodes[n.id])
        while len(self.queue) > 600:
            self.queue.popleft()

    def flush_all(self) -> None:
        for n in self.nodes.values():
            self.handle_ready(n)

    # ---- invariants ---------------------------------------------------------------

    def fail(self, what: str) -> None:
        raise FuzzFailure(f"seed {self.seed} ({'hostile' if self.hostile else 'honest'}) input "
                          f"{self.stats.inputs}: {what}\n  input: {self.current}\n  replay: python -m "
                          f"tests.raft_fuzz --seed {self.seed} --inputs {self.stats.inputs + 1}"
                          f"{' --hostile' if self.hostile else ''}")

    def check_node(self, n: FNode) -> None:
        r = n.raw.raft
        lg = r.log
        nid = n.id
        if lg.committed < self.last_commit[nid]:
            # a restart may come back with an older commit index only if the storage lost it: never here
            self.fail(f"node {nid} commit went back {self.last_commit[nid]} -> {lg.committed}")
        if not (lg.applied <= lg.committed <= lg.last_index()):
            self.fail(f"node {nid} applied {lg.applied} committed {lg.committed} last {lg.last_index()}")
        if lg.persisted > lg.last_index():
            self.fail(f"node {nid} persisted {lg.persisted} beyond last {lg.last_index()}")
        first = lg.first_index()
        mine = self.node_committed[nid]
        lo = max(self.last_commit[nid] + 1, first)
        for i in range(lo, lg.committed + 1):
            t = lg.term(i)
            if i in mine and mine[i] != t:
                self.fail(f"node {nid} committed entry {i} changed term {mine[i]} -> {t}")
            mine[i] = t
            if not self.hostile:
                g = self.committed_terms.setdefault(i, t)
                if g != t:
                    self.fail(f"state machine safety: entry {i} committed with term {g} elsewhere, {t} on node {nid}")
        self.last_commit[nid] = lg.committed
        if not self.hostile:  # a forged snapshot may put a hostile node's log anywhere
            self.stats.max_commit = max(self.stats.max_commit, lg.committed)
        # committed entries still in the log keep their term (sampled)
        if mine:
            for i in self.rng.sample(sorted(k for k in mine if k >= first) or [0], 1):
                if i and lg.term(i) != mine[i]:
                    self.fail(f"node {nid} committed entry {i} now has term {lg.term(i)}, was {mine[i]}")
        if r.state == StateRole.Leader and not self.hostile:
            prev = self.leader_of_term.setdefault(r.term, nid)
            if prev != nid:
                self.fail(f"election safety: {prev} and {nid} both lead term {r.term}")
            self.stats.leaders = len(self.leader_of_term)

    def check_log_matching(self) -> None:
        if self.hostile:
            return
        logs = {}
        for nid, n in self.nodes.items():
            lg = n.raw.raft.log
            first = lg.first_index()
            logs[nid] = {i: lg.term(i) for i in range(first, lg.last_index() + 1)}
        ids = list(logs)
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                la, lb = logs[ids[a]], logs[ids[b]]
                common = sorted(set(la) & set(lb))
                # log matching (§5.3): same (index, term) means identical prefixes
                same = [i for i in common if la[i] == lb[i]]
                if same:
                    top = same[-1]
                    for i in common:
                        if i <= top and la[i] != lb[i]:
                            self.fail(f"log matching: nodes {ids[a]}, {ids[b]} agree at {top} but differ at {i}")

    # ---- generators ---------------------------------------------------------------

    def _num(self, around: int) -> int:
        r = self.rng
        x = r.random()
        if x < 0.55:
            return min(U64_MAX, max(0, around + r.randint(-3, 3)))
        if x < 0.7:
            return r.randint(0, min(U64_MAX, around + 10))
        if x < 0.78:
            return 0
        return r.choice([VALUE_LIMIT - 1, VALUE_LIMIT, VALUE_LIMIT + 1, U64_MAX - 1, U64_MAX,
                         r.getrandbits(64), r.getrandbits(32), 1 << 63])

    def _entries(self, index: int, term: int, log_term: int) -> list[pb.Entry]:
        r = self.rng
        out = []
        k = r.choice([0, 0, 1, 1, 2, 3, 5])
        contiguous = r.random() < 0.7
        t = log_term
        for j in range(k):
            e = pb.Entry()
            e.index = min(U64_MAX, index + 1 + j) if contiguous else self._num(index + 1 + j)
            if r.random() < 0.8:
                t = r.randint(min(t, term), max(t, term)) if term >= t else t
                e.term = t
            else:
                e.term = self._num(term)
            x = r.random()
            if x < 0.1:
                e.entry_type = pb.EntryConfChangeV2
                e.data = self._confchange_bytes()
            elif x < 0.13:
                e.entry_type = r.choice([pb.EntryConfChange, 7, -1])
                e.data = r.randbytes(r.randint(0, 20))
            else:
                e.data = r.randbytes(r.randint(0, 40))
            if r.random() < 0.1:
                e.context = r.randbytes(r.randint(1, 8))
            out.append(e)
        return out

    def _confchange_bytes(self) -> bytes:
        r = self.rng
        if r.random() < 0.3:
            return r.randbytes(r.randint(0, 30))  # garbage
        cc = pb.ConfChangeV2(transition=r.choice([0, 1, 2, 5, -1]))
        for _ in range(r.randint(0, 3)):
            cc.changes.add(change_type=r.choice([0, 1, 2, 3, 9, -1]), node_id=r.choice([1, 2, 3, 4, 0, 99]))
        return cc.SerializeToString()

    def _snapshot(self, around: int, term: int) -> pb.Snapshot:
        r = self.rng
        s = pb.Snapshot(data=r.randbytes(r.randint(0, 30)))
        s.metadata.index = self._num(around)
        s.metadata.term = self._num(term) if r.random() < 0.3 else r.randint(0, max(term, 0))
        s.metadata.conf_state.voters.extend(r.sample([1, 2, 3, 4, 99], r.randint(0, 4)))
        if r.random() < 0.2:
            s.metadata.conf_state.voters_outgoing.extend(r.sample([1, 2, 3, 4], r.randint(1, 3)))
        if r.random() < 0.1:
            s.metadata.conf_state.learners.extend(r.sample([1, 2, 3, 4, 5], r.randint(1, 2)))
        return s

    def generate(self, target: FNode) -> pb.Message:
        """A message of any type with fields in plausible and extreme ranges."""
        r = self.rng
        raft = target.raw.raft
        lg = raft.log
        m = pb.Message()
        m.msg_type = r.choice(ODD_TYPES) if r.random() < 0.08 else r.choice(ALL_TYPES)
        m.to = target.id if r.random() < 0.95 else r.choice([0, 4, 99])
        setattr(m, "from", r.choice([1, 2, 3, 1, 2, 3, 0, 4, 99, U64_MAX]))
        term = self._num(raft.term)
        m.term = term
        m.log_term = self._num(lg.last_term())
        m.index = self._num(lg.last_index())
        m.commit = self._num(lg.committed)
        if r.random() < 0.3:
            m.commit_term = self._num(raft.term)
        m.reject = r.random() < 0.3
        if r.random() < 0.3:
            m.reject_hint = self._num(lg.last_index())
        if r.random() < 0.05:
            m.request_snapshot = self._num(lg.committed)
        if r.random() < 0.1:
            m.context = r.choice([b"CampaignTransfer", b"CampaignElection", r.randbytes(4)])
        if r.random() < 0.05:
            m.priority = r.randint(-5, 5)
        if m.msg_type in (pb.MsgAppend, pb.MsgPropose) or r.random() < 0.05:
            m.entries.extend(self._entries(m.index, m.term, m.log_term))
        if m.msg_type == pb.MsgSnapshot or r.random() < 0.03:
            m.snapshot.CopyFrom(self._snapshot(lg.last_index(), term))
        return m

    def junk(self, target: FNode) -> pb.Message:
        """A generated message with a fault the core must drop or refuse (honest mode)."""
        r = self.rng
        m = self.generate(target)
        kind = r.randrange(6)
        if kind == 0:
            m.msg_type = r.choice(ODD_TYPES)
        elif kind == 1:
            f = r.choice(["term", "index", "log_term", "commit", "commit_term", "reject_hint", "request_snapshot"])
            setattr(m, f, r.choice([VALUE_LIMIT, U64_MAX, VALUE_LIMIT + r.getrandbits(31)]))
        elif kind == 2:
            m.msg_type = pb.MsgAppend
            m.term = max(m.term, 1) % VALUE_LIMIT
            m.index = m.index % VALUE_LIMIT
            m.log_term = m.log_term % VALUE_LIMIT
            m.ClearField("entries")
            m.entries.add(index=m.index + 2, term=m.term)  # not contiguous
        elif kind == 3:
            setattr(m, "from", r.choice([0, target.id]))
        elif kind == 4:
            m.msg_type = r.choice([pb.MsgHup, pb.MsgBeat, pb.MsgUnreachable, pb.MsgSnapStatus, pb.MsgCheckQuorum])
        else:
            m.msg_type = r.choice([pb.MsgAppendResponse, pb.MsgHeartbeatResponse, pb.MsgRequestVoteResponse,
                                   pb.MsgRequestPreVoteResponse])
            setattr(m, "from", r.choice([4, 99, 12345]))
            m.term = r.randint(0, 3)  # unknown peers' responses: StepPeerNotFound
        return m

    def maybe_rewire(self, m: pb.Message) -> pb.Message | None:
        r = self.rng
        if r.random() < 0.5:
            return m
        b = bytearray(m.SerializeToString())
        if b and r.random() < 0.3:
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        try:
            return pb.Message.FromString(bytes(b))
        except DecodeError:
            self.stats.undecodable += 1
            return None  # the host's decode error, never reaches the core

    # ---- the loop -----------------------------------------------------------------

    def leader(self) -> FNode | None:
        ls = [n for n in self.nodes.values() if n.raw.raft.state == StateRole.Leader]
        return max(ls, key=lambda n: n.raw.raft.term) if ls else None

    def one_input(self) -> None:
        r = self.rng
        x = r.random()
        n = self.nodes[r.choice(IDS)]
        if x < 0.22:
            self.stats.actions += 1
            self.current = "tick"
            for node in self.nodes.values():
                node.raw.tick()
            self.flush_all()
        elif x < 0.32:
            self.stats.actions += 1
            lead = self.leader()
            self.current = "propose"
            if lead is not None:
                try:
                    lead.raw.propose(b"p%d" % self.stats.inputs)
                except RaftError:
                    pass
                self.handle_ready(lead)
        elif x < 0.34:
            self.stats.actions += 1
            self.current = f"restart {n.id}"
            self.restart(n.id)
            self.handle_ready(self.nodes[n.id])
        elif x < 0.35:
            self.stats.actions += 1
            lg = n.raw.raft.log
            self.current = f"compact {n.id} at {lg.applied}"
            if lg.applied > n.storage.first_index():
                try:
                    n.storage.create_snapshot(lg.applied, n.raw.raft.prs.conf.to_conf_state(), b"".join(n.data)[-64:])
                except RaftError:
                    pass
                n.storage.compact(lg.applied)
        elif x < 0.36 and not self.hostile:
            self.stats.actions += 1
            lead = self.leader()
            self.current = "conf change (no-op re-add)"
            if lead is not None:
                cc = pb.ConfChangeV2(changes=[pb.ConfChangeSingle(change_type=pb.AddNode, node_id=r.choice(IDS))])
                try:
                    lead.raw.propose_conf_change(cc)
                except RaftError:
                    pass
                self.handle_ready(lead)
        elif x < 0.5 and self.history:
            self.stats.replays += 1
            m = pb.Message()
            m.CopyFrom(r.choice(self.history))
            self.current = f"replay {pb.MessageType.Name(m.msg_type)} {getattr(m, 'from')}->{m.to} t{m.term} i{m.index}"
            target = self.nodes.get(m.to)
            if target is not None and self.step(target, m):
                self.handle_ready(target)
        elif x < 0.75:
            self.stats.generated += 1
            lead = self.leader()
            if lead is not None and r.random() < 0.3:
                n = lead
            self.current = f"generating a message for {n.id}"
            if self.hostile and r.random() < 0.7:
                m = self.generate(n)
                junk = message_fault(m) is not None
            else:
                m = self.junk(n)
                junk = True
            m2 = self.maybe_rewire(m)
            self.current = f"to {n.id}: {m!r}".replace("\n", " ")[:600]
            if m2 is None:
                return
            if not self.hostile:
                junk = junk and (m2.msg_type != m.msg_type or message_fault(m2) is not None
                                 or getattr(m2, "from") in (0, n.id))
            raft = n.raw.raft
            before = (raft.term, raft.vote, raft.log.committed, raft.log.last_index())
            alive = self.step(n, m2)
            if alive and junk and message_fault(m2) is not None:
                after = (raft.term, raft.vote, raft.log.committed, raft.log.last_index())
                if after != before:
                    self.fail(f"a message the core must drop changed node {n.id}: {before} -> {after}")
            self.handle_ready(self.nodes[n.id])
        else:
            self.stats.actions += 1
            self.current = "deliver"
            self.deliver(r.randint(1, 30))

    def run(self, inputs: int) -> Stats:
        for i in range(inputs):
            self.stats.inputs = i
            try:
                self.one_input()
            except FuzzFailure:
                raise
            except Exception as e:  # anything else is a crasher
                self.fail(f"{type(e).__name__}: {e}")
            if i % 250 == 249:
                self.check_log_matching()
        self.stats.inputs = inputs
        return self.stats


def run_many(total: int, seeds: int, hostile_share: float = 0.3, first_seed: int = 1) -> tuple[int, list[Stats]]:
    """`total` inputs spread over `seeds` clusters; a share of them hostile."""
    per = max(1, total // seeds)
    out = []
    done = 0
    for k in range(seeds):
        hostile = k < int(seeds * hostile_share)
        f = Fuzzer(first_seed + k, hostile=hostile)
        out.append(f.run(per))
        done += per
    return done, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=None, help="replay one seed")
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--hostile", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    if a.seed is not None:
        st = Fuzzer(a.seed, hostile=a.hostile).run(a.inputs)
        print(st)
        return 0
    done, stats = run_many(a.inputs, a.seeds)
    print(f"{done} inputs over {a.seeds} seeds in {time.monotonic() - t0:.1f} s; "
          f"max commit {max(s.max_commit for s in stats)}; "
          f"invariant stops (hostile) {sum(s.invariant_stops for s in stats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
