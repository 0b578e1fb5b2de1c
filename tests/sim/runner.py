"""The simulation runner: builds a cluster from a seed, runs the chaos phase,
heals everything and checks that the cluster commits again.

Everything is drawn from one `random.Random(seed)`, time is a step counter
(a Raft tick every `tick_every` steps), so a seed replays exactly:
`.venv/bin/python -m tests.sim --seed N [--storage disk] [-v]`.

Phases:
1. chaos: faults (faults.py) and clients (workload.py) act every step while
   the checker (checkers.py) watches every Ready;
2. heal: the network is made perfect, every crashed node restarts, pauses
   and slow disks end; within `heal_ticks` a new proposal must commit and
   every member must apply all of the committed sequence (paper §5.4.1 +
   liveness once a quorum can talk, thesis §3.4);
3. sometimes: every node crashes at once and restarts from disk, and again a
   new proposal must commit (nothing acknowledged may be lost).
"""

from __future__ import annotations

import logging
import os
import random
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cita_raft_pb import eraftpb_pb2 as pb

from .checkers import Checker, InvariantViolation
from .faults import FaultInjector
from .host import SimNode
from .network import Packet, SimNetwork
from .stores import BACKENDS
from .workload import Workload

MAX_NODES = 24

# Issue 13 §1.4: a follower that lost log entries the leader recorded as matched was never
# caught up while that leader stayed. The core now catches it up, so the heal check is
# strict; SIM_TOLERATE_LOST_LOG_STALL=1 accepts (and counts) that state again, to compare.
TOLERATE_LOST_LOG_STALL = os.environ.get("SIM_TOLERATE_LOST_LOG_STALL") == "1"


class SimFailure(AssertionError):
    """A seed broke an invariant, stalled, or made the core raise."""


@dataclass
class Params:
    """One run's shape, drawn from its seed."""

    n_nodes: int = 3
    election_tick: int = 10
    heartbeat_tick: int = 1
    tick_every: int = 4
    check_quorum: bool = False
    pre_vote: bool = False
    max_size_per_msg: int = 0
    max_inflight_msgs: int = 256
    max_committed_size_per_ready: int = 0
    apply_defer: float = 0.0
    compact_every: int = 0
    chaos_steps: int = 800
    heal_ticks: int = 300
    intensity: float = 1.0
    reshape_rate: float = 0.0
    crash_rate: float = 0.0
    boundary_crash_rate: float = 0.0
    pause_rate: float = 0.0
    slow_rate: float = 0.0
    rate_change: float = 0.0
    stale_rate: float = 0.0
    propose_rate: float = 0.0
    confchange_rate: float = 0.0
    transfer_rate: float = 0.0
    campaign_rate: float = 0.0
    compact_rate: float = 0.0
    crash_all_at_end: bool = False
    wipe_rate: float = 0.0
    synced_loss_rate: float = 0.0
    wipe_after_vote_rate: float = 0.0
    fsync_shortcut: bool = False

    @classmethod
    def draw(cls, rng: random.Random) -> Params:
        k = rng.choice([0.5, 1.0, 1.0, 2.0])
        return cls(
            n_nodes=rng.randint(3, 7),
            election_tick=rng.choice([5, 10, 10]),
            heartbeat_tick=rng.choice([1, 1, 2]),
            tick_every=rng.choice([2, 4, 4]),
            check_quorum=rng.random() < 0.5,
            pre_vote=rng.random() < 0.5,
            max_size_per_msg=rng.choice([0, 0, 64, 1 << 20]),
            max_inflight_msgs=rng.choice([1, 4, 256]),
            max_committed_size_per_ready=rng.choice([0, 0, 1, 200]),
            apply_defer=rng.choice([0.0, 0.3, 0.8]),
            compact_every=rng.choice([0, 5, 20, 50]),
            chaos_steps=rng.choice([400, 600, 800]),
            intensity=k,
            reshape_rate=0.01 * k,
            crash_rate=0.004 * k,
            boundary_crash_rate=0.0004 * k,
            pause_rate=0.003 * k,
            slow_rate=0.004 * k,
            rate_change=0.01,
            stale_rate=0.02 * k,
            propose_rate=rng.choice([0.05, 0.2, 0.5]),
            confchange_rate=rng.choice([0.0, 0.005, 0.02]),
            transfer_rate=rng.choice([0.0, 0.005, 0.02]),
            campaign_rate=rng.choice([0.0, 0.002]),
            compact_rate=0.01,
            crash_all_at_end=rng.random() < 0.5,
            # Lost state (drawn last, so the draws above keep their meaning).
            wipe_rate=rng.choice([0.0, 0.0005, 0.002]) * k,
            synced_loss_rate=rng.choice([0.0, 0.0005, 0.002]) * k,
            wipe_after_vote_rate=rng.choice([0.0, 0.0, 0.05, 0.3]),
            fsync_shortcut=rng.random() < 0.75,
        )


@dataclass
class Result:
    seed: int
    storage: str
    steps: int
    committed: int
    checks: int
    leaders: int
    heal_ticks_used: list[int] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    workload: dict[str, int] = field(default_factory=dict)
    messages: int = 0


def replay_command(seed: int, storage: str, protect: bool = True) -> str:
    extra = "" if storage == "memory" else f" --storage {storage}"
    if not protect:
        extra += " --no-protect"
    return f".venv/bin/python -m tests.sim --seed {seed}{extra} -v"


class Simulation:
    def __init__(
        self,
        seed: int,
        storage: str = "memory",
        verbose: bool = False,
        workdir: str | None = None,
        protect: bool = True,
    ) -> None:
        self.seed = seed
        self.storage_kind = storage
        self.verbose = verbose
        self.workdir = workdir
        # False: nodes that lost state vote as plain Raft would (Config.lost_state's rule
        # refuses nothing), to show the violations the rule prevents.
        self.protect = protect
        self.after_step: list = []
        self.rng = random.Random(seed)
        self.params = Params.draw(self.rng)
        self.now = 0
        self.net = SimNetwork(self.rng)
        self.checker = Checker()
        self.faults = FaultInjector(self)
        self.workload = Workload(self)
        self.nodes: dict[int, SimNode] = {}
        self.deferred: set[int] = set()
        self.recent: deque[tuple[int, str, int, str]] = deque(maxlen=60)
        self._next_id = 1
        self._backend_cls = BACKENDS[storage]
        # The core's and the disk's log lines only in a replay (-v); a CI run stays quiet.
        logging.getLogger("sim").setLevel(logging.DEBUG if verbose else logging.CRITICAL + 1)
        voters = list(range(1, self.params.n_nodes + 1))
        self._next_id = self.params.n_nodes + 1
        for nid in voters:
            self.nodes[nid] = SimNode(self, nid, self._new_backend(nid), voters)

    def _new_backend(self, nid: int) -> Any:
        return self._backend_cls(nid, self.workdir, random.Random(self.rng.getrandbits(64)))

    # ---- helpers used by faults / workload / host ----------------------------------

    def trace(self, kind: str, node: int, text: str) -> None:
        self.recent.append((self.now, kind, node, text))
        if self.verbose:
            print(f"[{self.now:5d}] {kind:<12} n{node:<3} {text}", flush=True)

    def live_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    def leader(self) -> SimNode | None:
        best = None
        for n in self.nodes.values():
            if n.alive and n.role_term[0] and (best is None or n.role_term[1] > best.role_term[1]):
                best = n
        return best

    def can_add(self, k: int) -> bool:
        return len(self.nodes) + k <= MAX_NODES

    def new_node(self) -> int:
        nid = self._next_id
        self._next_id += 1
        self.nodes[nid] = SimNode(self, nid, self._new_backend(nid), None)
        return nid

    def send(self, frm: int, m: pb.Message) -> None:
        if m.to == frm:
            raise InvariantViolation(f"node {frm} sent {pb.MessageType.Name(m.msg_type)} to itself")
        self.net.send(frm, m.to, m.msg_type, m.SerializeToString())

    def members(self) -> set[int]:
        lc = self.checker.latest_conf
        if lc is None:
            return set(range(1, self.params.n_nodes + 1))
        cs = lc[1]
        return set(cs.voters) | set(cs.voters_outgoing) | set(cs.learners) | set(cs.learners_next)

    # ---- one step ------------------------------------------------------------------

    def _deliver(self, pkt: Packet) -> None:
        node = self.nodes.get(pkt.to)
        sender = self.nodes.get(pkt.frm)
        if node is None or not node.alive or self.net.is_cut(pkt.frm, pkt.to):
            self.net.dropped += 1
            if sender is not None and sender.alive and self.net.is_cut(pkt.frm, pkt.to) and self.rng.random() < 0.3:
                sender.report_unreachable(pkt.to)
            return
        if node.paused():
            pkt.deliver_at = node.paused_until
            self.net.requeue(pkt)
            return
        m = pb.Message()
        m.ParseFromString(pkt.data)
        if self.verbose:
            self.trace("deliver", pkt.to, f"{pb.MessageType.Name(m.msg_type)} from {pkt.frm} term={m.term} "
                       f"index={m.index} log_term={m.log_term} commit={m.commit} n={len(m.entries)} "
                       f"reject={m.reject}")
        self.net.delivered_ok(pkt)
        node.step(m)

    def step(self, chaos: bool) -> None:
        self.now += 1
        self.net.now = self.now
        rng = self.rng
        if chaos:
            self.faults.before_step()
        for pkt in self.net.due():
            self._deliver(pkt)
        if chaos and rng.random() < self.params.stale_rate:
            pkt = self.net.stale_packet()
            if pkt is not None:
                self.faults._count("stale redelivery")
                self._deliver(Packet(self.now, 0, pkt.frm, pkt.to, pkt.msg_type, pkt.data))
        tick_every = self.params.tick_every
        for nid in sorted(self.nodes):
            node = self.nodes[nid]
            if node.alive and not node.paused() and self.now % tick_every == node.tick_phase:
                node.tick()
        if self.deferred:
            for nid in sorted(self.deferred):
                node = self.nodes[nid]
                if node.alive and not node.paused():
                    self.deferred.discard(nid)
                    node.process()
                elif not node.alive:
                    self.deferred.discard(nid)
        for nid in sorted(self.nodes):
            node = self.nodes[nid]
            if node.alive and node.apply_queue and not node.paused() and rng.random() < 0.4:
                node.apply_pending(limit=rng.randint(1, 8))
        if self.now % 8 == 0:
            for node in self.live_nodes():
                node.idle_sync()
        if chaos:
            self.workload.act()
        while self.after_step:
            self.after_step.pop(0)()
        if self.now % 16 == 0:
            self.maybe_decommission()

    def maybe_decommission(self) -> None:
        """Stop nodes the committed configuration no longer holds, once every member
        durably applied that configuration (the service's supervisor does the same from
        the validator set); earlier, a member restarting in the joint config might still
        need their votes."""
        lc = self.checker.latest_conf
        if lc is None:
            return
        members = self.members()
        for nid in members:
            if nid in self.nodes:
                self.nodes[nid].ever_member = True
        gone = [n for n in self.nodes.values() if n.ever_member and not n.decommissioned and n.id not in members]
        if not gone:
            return
        # Only voters can need the removed nodes' votes (a voter restarting in the joint config).
        voters = set(lc[1].voters) | set(lc[1].voters_outgoing)
        if all(self.nodes[m].durable_applied >= lc[0] for m in voters if m in self.nodes):
            for node in gone:
                node.decommission()

    # ---- phases --------------------------------------------------------------------

    def heal(self) -> None:
        self.faults.enabled = False
        self.net.clear_faults()
        self.faults.restart_at.clear()
        for node in self.nodes.values():
            node.paused_until = 0
            node.io_delay = 0.0
            if not node.alive and not node.decommissioned:
                node.start()
        self.trace("heal", 0, "network perfect, every node up")

    def commit_after_heal(self, label: str) -> int:
        """Propose until a new entry commits and every member applied everything; ticks used."""
        p = self.params
        # Catching up is one round trip per append (one entry each with
        # max_size_per_msg=0, and max_inflight_msgs may be 1), so the bound grows
        # with the longest log a member must receive.
        lag = max((n.raw.status().last_index for n in self.live_nodes()), default=0) - min(
            (self.nodes[m].applied for m in self.members() if m in self.nodes), default=0
        )
        heal_ticks = p.heal_ticks + 4 * max(lag, 0)
        if any(n.alive and n.raw.raft.withholding_votes for n in self.nodes.values()):
            # Nodes that lost state count for no election until they see one: for the
            # first election a withholding minority is a minority down, and a bare
            # majority where only the longest log can win may need many split rounds
            # (seed 2270: 3 of 7 withholding, ~330 ticks).
            heal_ticks += 2 * p.heal_ticks
            self.faults._count("heal with votes withheld")
        limit = heal_ticks * p.tick_every
        start = self.now
        proposed: list[bytes] = []
        last_try = -(10**9)
        while self.now - start < limit:
            self.step(chaos=False)
            committed = [self.checker.committed_data.get(d) for d in proposed]
            if any(i is not None for i in committed):
                last = self.checker.last_committed
                if all(self._caught_up(m, last) for m in self.members()):
                    return (self.now - start) // p.tick_every
            elif self.now - last_try >= 10 * p.tick_every:
                # Not committed yet (no leader, or lost with a leader change): propose again.
                last_try = self.now
                data = self.workload.propose(prefix=f"{label}-")
                if data is not None:
                    proposed.append(data)
        members = sorted(self.members())
        states = ", ".join(
            f"n{m}:{'up' if self.nodes[m].alive else 'down'}/applied={self.nodes[m].applied}"
            f"/role={'L' if self.nodes[m].role_term[0] else '-'}"
            for m in members
            if m in self.nodes
        )
        leader = self.leader()
        lead = "no leader"
        if leader is not None:
            st = leader.raw.status()
            lead = f"leader n{leader.id} term={st.term} commit={st.commit} last={st.last_index} progress={st.progress}"
        raise SimFailure(
            f"liveness: {label}: no new proposal committed and applied on all members within "
            f"{heal_ticks} ticks after healing (committed={self.checker.last_committed}; {states}; {lead})"
        )

    def _caught_up(self, nid: int, last: int) -> bool:
        node = self.nodes.get(nid)
        if node is None or not node.alive:
            return False
        if node.applied >= last:
            return True
        leader = self.leader()
        if TOLERATE_LOST_LOG_STALL and leader is not None and leader.id != nid:
            pr = leader.raw.status().progress.get(nid)
            if pr is not None and pr[0] > node.raw.status().last_index:
                self.faults._count("lost-log follower stalled (raftcore fix pending)")
                return True
        # Known limitation shared with raft-rs and etcd: a learner whose term a removed
        # node's vote request pushed above the leader's ignores the leader's lower-term
        # appends (without check_quorum/pre_vote nobody tells the leader), and a learner
        # never campaigns, so it stays behind until the next election. Not a safety issue.
        lc = self.checker.latest_conf
        if lc is not None and nid in set(lc[1].learners) | set(lc[1].learners_next) and leader is not None:
            if node.raw.status().term > leader.raw.status().term:
                self.faults._count("stranded learner")
                return True
        return False

    def crash_all(self) -> None:
        for node in self.live_nodes():
            node.crash("crash of every node at once")
        for node in self.nodes.values():
            if not node.decommissioned:
                node.start()
        self.faults.restart_at.clear()

    def run(self) -> Result:
        p = self.params
        self.trace("params", 0, repr(p))
        heal_used: list[int] = []
        try:
            # The service's first validator campaigns at once (cita-cloud.md §4.3).
            self.nodes[1].campaign()
            for _ in range(p.chaos_steps):
                self.step(chaos=True)
            self.heal()
            heal_used.append(self.commit_after_heal("healed"))
            if p.crash_all_at_end:
                self.crash_all()
                heal_used.append(self.commit_after_heal("after-crash-all"))
        except SimFailure as e:
            raise SimFailure(self._failure_text(str(e))) from None
        except InvariantViolation as e:
            raise SimFailure(self._failure_text(f"invariant: {e}")) from None
        except Exception as e:  # noqa: BLE001 -- the core raised: report with the seed
            tb = traceback.format_exc(limit=8)
            raise SimFailure(self._failure_text(f"core raised {type(e).__name__}: {e}\n{tb}")) from None
        finally:
            for node in self.nodes.values():
                node.backend.close()
        return Result(
            seed=self.seed,
            storage=self.storage_kind,
            steps=self.now,
            committed=self.checker.last_committed,
            checks=self.checker.checks,
            leaders=len(self.checker.leaders),
            heal_ticks_used=heal_used,
            faults=dict(self.faults.counts),
            workload=dict(self.workload.counts),
            messages=self.net.sent,
        )

    def _failure_text(self, what: str) -> str:
        lines = [f"seed {self.seed} ({self.storage_kind}) failed at step {self.now}: {what}",
                 f"replay: {replay_command(self.seed, self.storage_kind, self.protect)}", "last events:"]
        lines += [f"  [{t}] {k} n{n} {text}" for t, k, n, text in list(self.recent)[-25:]]
        return "\n".join(lines)


def run_seed(
    seed: int, storage: str = "memory", verbose: bool = False, workdir: str | None = None, protect: bool = True
) -> Result:
    """Run one seed; raises SimFailure (whose text starts with the replay command) on any failure."""
    return Simulation(seed, storage, verbose, workdir, protect).run()
