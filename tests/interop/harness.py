"""Mixed-implementation clusters: etcd `raftnode`s and Python adapters under one router.

Owns: starting a cluster from a layout string ("PEE": node 1 Python, 2 and 3
etcd), the deterministic round router (the oracle's `drive_cluster.Cluster`,
imported in place and extended here with partitions, raft-rs-style
re-encoding at delivery, and a record of conf states / hard states /
snapshots), a two-schema wire check of every message a Python node sends, and
small verbs the scenarios are written in (campaign, propose, tick, transfer,
compact, status).  It asserts nothing about Raft itself; tests do.
"""
from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cita_raft_pb import eraftpb_pb2 as E
from tests.interop import oracle as oracle_mod

ADAPTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adapter.py")
_dc = oracle_mod.import_drive_cluster()
frame = _dc.frame
Cluster = _dc.Cluster

# Message fields both schemas define (etcd name, raft-rs name).
COMMON_FIELDS = [("type", "msg_type"), ("to", "to"), ("from", "from"), ("term", "term"),
                 ("logTerm", "log_term"), ("index", "index"), ("commit", "commit"),
                 ("reject", "reject"), ("rejectHint", "reject_hint"), ("context", "context")]
VOTE_TYPES = (E.MsgRequestVote, E.MsgRequestPreVote)
VOTE_RESP_TYPES = (E.MsgRequestVoteResponse, E.MsgRequestPreVoteResponse)


def node_argv(kind: str, nid: int, peers: Sequence[int], oracle: oracle_mod.Oracle,
              extra: Sequence[str] = ()) -> list[str]:
    """The command line of one node: kind 'P' (this project) or 'E' (etcd).

    INTEROP_P_AS_E=1 runs every 'P' node as etcd too: the scenarios' own
    expectations are then checked against the oracle alone.
    """
    if kind == "P" and os.environ.get("INTEROP_P_AS_E") == "1":
        kind = "E"
    common = ["-id", str(nid), "-peers", ",".join(map(str, peers)), *extra]
    if kind == "E":
        return [str(oracle.raftnode), *common]
    if kind == "P":
        return [sys.executable, ADAPTER, *common]
    raise ValueError(f"unknown node kind {kind!r}")


@dataclass
class WireStats:
    """What the wire check saw: messages from Python nodes decoded with both schemas."""

    checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    delivered: int = 0
    dropped: int = 0
    reencoded: int = 0
    types_from_py: dict[int, int] = field(default_factory=dict)


class MixedCluster(Cluster):
    """A deterministic cluster of etcd and Python nodes (see module docstring).

    `reencode`: 'rs' delivers every message re-serialised the way raft-rs/prost
    sends it (proto3, zero fields omitted, no empty snapshot) with raft-rs-only
    fields set; 'raw' delivers each implementation's bytes untouched (etcd's
    proto2 with an empty snapshot in every message).
    """

    def __init__(self, oracle: oracle_mod.Oracle, layout: str, voters: Sequence[int] | None = None,
                 reencode: str = "rs", extra: dict[int, Sequence[str]] | None = None,
                 raftpb=None) -> None:
        self.layout = {i + 1: k for i, k in enumerate(layout)}
        voters = list(voters or self.layout)
        self.voters = voters
        extra = extra or {}
        argvs = {nid: node_argv(kind, nid, voters, oracle, extra.get(nid, ()))
                 for nid, kind in self.layout.items()}
        self.mode = reencode
        self.partitioned: set[int] = set()          # isolated nodes: nothing in or out
        self.groups: list[set[int]] = []           # if set, messages only flow within a group
        # seeded faults on delivery (drop / duplicate / reorder); None = a perfect network
        self.chaos: random.Random | None = None
        self.drop_p = self.dup_p = 0.0
        self.leaders_by_term: dict[int, set[int]] = {}
        self.wire = WireStats()
        self.R = raftpb
        self.conf_states: dict[int, list[E.ConfState]] = {nid: [] for nid in argvs}
        self.hard_states: dict[int, list[E.HardState]] = {nid: [] for nid in argvs}
        self.snap_metas: dict[int, list[E.SnapshotMetadata]] = {nid: [] for nid in argvs}
        # (applied index, ConfState) per node, from applied conf changes and installed snapshots
        self.conf_at: dict[int, list[tuple[int, E.ConfState]]] = {nid: [] for nid in argvs}
        self._from_of_pending: list[int] = []
        super().__init__(argvs, reencode=self._capture)

    # ------------------------------------------------------------- routing
    def _capture(self, b: bytes) -> bytes:
        """Called by the base router for every outgoing message, at send time."""
        m = E.Message()
        m.ParseFromString(b)
        sender = getattr(m, "from")
        if self.layout.get(sender) == "P":
            self._wire_check(b, m)
        return b

    def _wire_check(self, b: bytes, m: E.Message) -> None:
        """A Python node's message must read the same under etcd's schema (raftpb)."""
        w = self.wire
        w.checked += 1
        w.types_from_py[m.msg_type] = w.types_from_py.get(m.msg_type, 0) + 1
        if self.R is None:
            return
        r = self.R.Message()
        try:
            r.ParseFromString(b)
        except Exception as exc:
            w.mismatches.append(f"etcd cannot parse {E.MessageType.Name(m.msg_type)}: {exc!r}")
            return
        for fr, fe in COMMON_FIELDS:
            if getattr(r, fr) != getattr(m, fe):
                w.mismatches.append(f"{E.MessageType.Name(m.msg_type)} field {fe}: etcd reads "
                                    f"{getattr(r, fr)!r}, raft-rs reads {getattr(m, fe)!r}")
        if [(x.Type, x.Term, x.Index, x.Data) for x in r.entries] != \
                [(y.entry_type, y.term, y.index, y.data) for y in m.entries]:
            w.mismatches.append(f"{E.MessageType.Name(m.msg_type)} entries differ between schemas")
        if r.snapshot.metadata.index != m.snapshot.metadata.index or r.snapshot.data != m.snapshot.data \
                or sorted(r.snapshot.metadata.conf_state.voters) != sorted(m.snapshot.metadata.conf_state.voters):
            w.mismatches.append(f"{E.MessageType.Name(m.msg_type)} snapshot differs between schemas")

    def _last_commit(self, nid: int) -> tuple[int, int]:
        n = self.nodes[nid]
        if n.committed:
            idx, term, _, _ = n.committed[-1]
            return idx, term
        return 0, 0

    def _as_raft_rs(self, b: bytes) -> bytes:
        """Re-serialise one message as a raft-rs peer would send it (see raft-rs raft.rs:
        votes carry the candidate's commit and commit_term and a priority; prost omits
        zero fields and never sends an empty snapshot), plus an Entry.context."""
        m = E.Message()
        m.ParseFromString(b)
        if m.msg_type != E.MsgSnapshot and m.HasField("snapshot") and not m.snapshot.data \
                and m.snapshot.metadata.index == 0:
            m.ClearField("snapshot")
        sender = getattr(m, "from")
        if m.msg_type in VOTE_TYPES or (m.msg_type in VOTE_RESP_TYPES and m.reject):
            if m.commit_term == 0 and sender in self.nodes:
                # what the sender had applied when it spoke: a commit index it
                # really holds, with the term of that entry (never a guess)
                m.commit, m.commit_term = self._last_commit(sender)
        if m.msg_type in VOTE_TYPES:
            m.priority = 7
            m.deprecated_priority = 7
        for ent in m.entries:
            if ent.entry_type == E.EntryNormal and not ent.context:
                ent.context = b"rs-ctx"
        self.wire.reencoded += 1
        return m.SerializeToString()

    def step(self, extra=None):
        """One round; partitions and re-encoding apply at delivery time."""
        if not self.partitioned and not self.groups and self.chaos is None and self.mode != "rs":
            self.wire.delivered += sum(map(len, self.pending.values()))
            return super().step(extra)
        rng = self.chaos
        reports: dict[int, list[bytes]] = {}
        for nid, frames in self.pending.items():
            out = []
            for f in frames:
                payload = f[5:]
                m = E.Message()
                m.ParseFromString(payload)
                frm = getattr(m, "from")
                if self.blocked(frm, nid) or (rng is not None and rng.random() < self.drop_p):
                    self.wire.dropped += 1
                    if m.msg_type == E.MsgSnapshot and frm in self.nodes:
                        # what a host's transport does when a snapshot send fails
                        reports.setdefault(frm, []).append(frame(b"n", b"%d fail" % nid))
                    continue
                if m.msg_type == E.MsgSnapshot and frm in self.nodes:
                    # the transport handed it over: the host reports success (etcd/raft-rs
                    # leaders otherwise wait in Snapshot state if the answer is lost)
                    reports.setdefault(frm, []).append(frame(b"n", b"%d ok" % nid))
                if self.mode == "rs":
                    f = frame(b"s", self._as_raft_rs(payload))
                self.wire.delivered += 1
                out.append(f)
                if rng is not None and rng.random() < self.dup_p:
                    out.append(f)
            if rng is not None:
                rng.shuffle(out)
            self.pending[nid] = out
        if reports:
            extra = dict(extra or {})
            for nid, frames in reports.items():
                extra[nid] = list(extra.get(nid, [])) + frames
        return super().step(extra)

    def blocked(self, frm: int, to: int) -> bool:
        """Whether the network currently cuts frm -> to."""
        if frm in self.partitioned or to in self.partitioned:
            return True
        if self.groups:
            return not any(frm in g and to in g for g in self.groups)
        return False

    def heal(self) -> None:
        self.partitioned.clear()
        self.groups = []

    def process(self, outputs):
        super().process(outputs)
        for nid, frames in outputs.items():
            applied = 0
            for op, p in frames:
                if op == b"E":
                    applied = _dc.entry(p)[2]
                elif op == b"C":
                    cs = E.ConfState()
                    cs.ParseFromString(p)
                    self.conf_states[nid].append(cs)
                    self.conf_at[nid].append((applied, cs))
                elif op == b"H":
                    hs = E.HardState()
                    hs.ParseFromString(p)
                    self.hard_states[nid].append(hs)
                elif op == b"S":
                    sm = E.SnapshotMetadata()
                    sm.ParseFromString(p)
                    self.snap_metas[nid].append(sm)
                    self.conf_at[nid].append((sm.index, sm.conf_state))
            # Election safety bookkeeping (Raft §5.2): the term a node leads in is the
            # term of its latest persisted hard state once this batch is processed.
            if self.nodes[nid].state == "StateLeader" and any(op == b"L" for op, _ in frames):
                hs = self.hard_states[nid]
                self.leaders_by_term.setdefault(hs[-1].term if hs else 0, set()).add(nid)

    # ------------------------------------------------------------- verbs
    def wipe(self, nid: int) -> None:
        """Node `nid` loses its durable state: its process is ended and started again with
        the same command line, so it comes back with an empty log (term 0, the configured
        voters), as a host does after its data dir was wiped. Messages in flight to it are
        lost with the old process; the records of what it applied start afresh."""
        old = self.nodes[nid]
        old.close()
        self.nodes[nid] = _dc.Node(nid, old.argv)
        self.pending[nid] = []
        for rec in (self.conf_states, self.hard_states, self.snap_metas, self.conf_at):
            rec[nid] = []
        self.process(self.exchange({nid: []}))

    def ids(self, kind: str | None = None) -> list[int]:
        return [i for i, k in self.layout.items() if kind is None or k == kind]

    def run(self, inputs: dict[int, list[bytes]]) -> None:
        """Deliver inputs in one round, then route until no message is in flight."""
        self.step(inputs)
        self.settle()

    def campaign(self, nid: int) -> None:
        self.run({nid: [frame(b"c")]})

    def tick(self, ids: Iterable[int], rounds: int = 1) -> None:
        for _ in range(rounds):
            self.run({i: [frame(b"t")] for i in ids})

    def propose(self, leader: int, payloads: Sequence[bytes], window: int = 1) -> None:
        for i in range(0, len(payloads), window):
            self.run({leader: [frame(b"p", d) for d in payloads[i:i + window]]})

    def propose_cc(self, leader: int, cc: E.ConfChangeV2) -> None:
        self.run({leader: [frame(b"v", cc.SerializeToString())]})

    def transfer(self, leader: int, to: int) -> None:
        self.run({leader: [frame(b"x", str(to).encode())]})

    def compact(self, nid: int, index: int = 0) -> None:
        self.run({nid: [frame(b"k", str(index).encode() if index else b"")]})

    def status(self, nid: int) -> dict:
        out = self.exchange({nid: [frame(b"q")]})
        self.process(out)
        for op, p in out[nid]:
            if op == b"Q":
                return json.loads(p)
        raise AssertionError(f"node {nid} answered no status: {out[nid]}")

    def elect_by_ticks(
        self, ids: Iterable[int] | Callable[[], list[int]] | None = None, max_rounds: int = 500
    ) -> int:
        """Tick `ids` (default all) one tick per round until one leader is known to all of them.

        `ids` may be a function, asked again every round: the members can change while
        the cluster elects (a conf change already in the log commits meanwhile)."""
        fixed = None if callable(ids) else list(ids or self.nodes)
        now = fixed or []
        for _ in range(max_rounds):
            now = ids() if fixed is None else fixed
            self.tick(now)
            lead = self.leader_of(now)
            if lead:
                return lead
        raise AssertionError(f"no leader after {max_rounds} ticks among {now}: {self.roles()}\n{self.describe()}")

    def leader_of(self, ids: Iterable[int]) -> int:
        """The leader every node in `ids` follows, if that node says it leads; else 0."""
        leads = {self.nodes[i].lead for i in ids}
        if len(leads) == 1:
            lead = leads.pop()
            if lead and self.nodes[lead].state == "StateLeader":
                return lead
        return 0

    def latest_leader(self) -> int:
        """The node that says it leads at the highest term (0 if none does)."""
        leaders = [i for i, n in self.nodes.items() if n.state == "StateLeader"]
        return max(leaders, key=lambda i: self.hard_states[i][-1].term if self.hard_states[i] else 0, default=0)

    def latest_config(self) -> E.ConfState:
        """The configuration of the most advanced node (the last one it applied or installed)."""
        best = max(self.nodes, key=self.applied_index)
        if self.conf_at[best]:
            return max(self.conf_at[best], key=lambda ic: ic[0])[1]
        return E.ConfState(voters=self.voters)

    def roles(self) -> dict[int, tuple[str, int, str]]:
        return {i: (self.layout[i], n.lead, n.state) for i, n in self.nodes.items()}

    def describe(self) -> str:
        """Every node's status and last hard state: for failure messages."""
        lines = []
        for i in self.nodes:
            hs = self.hard_states[i][-1] if self.hard_states[i] else None
            lines.append(f"node {i} ({self.layout[i]}): {json.dumps(self.status(i))} "
                         f"hs=({hs.term if hs else 0},{hs.vote if hs else 0},{hs.commit if hs else 0}) "
                         f"snapshots={[(m.index, m.term) for m in self.snap_metas[i]]}")
        return "\n".join(lines)

    def errors(self) -> dict[int, list[str]]:
        return {i: n.errors for i, n in self.nodes.items() if n.errors}

    def committed(self, nid: int) -> list[tuple[int, int, int, bytes]]:
        """(index, term, type, data) of every entry node `nid` handed to its applier."""
        return list(self.nodes[nid].committed)

    def applied_index(self, nid: int) -> int:
        """The last index node `nid` applied, by entry or by installing a snapshot."""
        last = self.nodes[nid].committed[-1][0] if self.nodes[nid].committed else 0
        snaps = self.snap_metas[nid]
        return max(last, snaps[-1].index if snaps else 0)

    def data_log(self, nid: int) -> list[bytes]:
        """The non-empty normal entries node `nid` applied, in order."""
        return [d for _, _, t, d in self.nodes[nid].committed if t == E.EntryNormal and d]

    def assert_clean(self, allowed: Sequence[str] = ()) -> None:
        """No node reported an error (except ones containing an `allowed` text), and every
        Python message read alike in both schemas."""
        errors = {i: [e for e in errs if not any(a in e for a in allowed)] for i, errs in self.errors().items()}
        errors = {i: errs for i, errs in errors.items() if errs}
        assert not errors, f"nodes reported errors: {errors}"
        assert not self.wire.mismatches, f"wire mismatches: {self.wire.mismatches[:5]}"

    def __enter__(self) -> MixedCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
