"""One simulated node: the host loop around a RawNode, as consensus.py runs it.

Per Ready (tests/ready_driver.py, docs/internals.md "Peer loop"): send
`messages`; write snapshot / entries / hard state; `sync()`; send
`persisted_messages`; hand committed entries to the applier; `advance()`.
The applier may run at once or later (`advance_apply_to`). Between every two of these steps the fault injector may
crash the node, which loses the RawNode, the applier queue, unsent messages
and every write after the last sync. The host also snapshots and compacts.

The host reports what it sees to the checker; it never judges Raft itself
beyond the host-side contracts (consecutive hand-out, apply order).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from cita_raft_pb import eraftpb_pb2 as pb
from raft.errors import ProposalDropped, RaftError, StepPeerNotFound
from tests import ready_driver

from .checkers import (
    BOOT_DIGEST,
    BOOT_INDEX,
    BOOT_TERM,
    InvariantViolation,
    chain_digest,
    decode_snapshot_data,
    encode_snapshot_data,
)

if TYPE_CHECKING:
    from .runner import Simulation


class NodeCrashed(Exception):
    """Raised at a step boundary chosen by the fault injector."""


def bootstrap_snapshot(voters: list[int]) -> pb.Snapshot:
    """The service's synthetic first snapshot: index 5, term 5, the initial voters."""
    snap = pb.Snapshot(data=encode_snapshot_data(BOOT_INDEX, BOOT_DIGEST))
    snap.metadata.index = BOOT_INDEX
    snap.metadata.term = BOOT_TERM
    snap.metadata.conf_state.voters.extend(voters)
    return snap


def _copy(msg: Any) -> Any:
    c = type(msg)()
    c.CopyFrom(msg)
    return c


class SimNode(ready_driver.ReadyHost):
    """A node id with its storage backend, across crashes and restarts; the host of its
    RawNode's Readies (the hooks of tests/ready_driver.ReadyHost)."""

    def __init__(self, sim: Simulation, node_id: int, backend: Any, voters: list[int] | None) -> None:
        self.sim = sim
        self.id = node_id
        self.backend = backend
        self.raw: Any = None
        self.alive = False
        self.decommissioned = False
        self.ever_member = voters is not None
        self.paused_until = 0
        self.io_delay = 0.0  # chance that a pending Ready waits for a later step (slow disk)
        self.tick_phase = sim.rng.randrange(sim.params.tick_every)
        self.incarnation = 0
        self.role_term: tuple[int, int] = (0, 0)
        self.boot_voters = voters
        # Lost state (faults.py): `pending_loss` names the loss the next start finds;
        # `lost_marker` is the node's durable "I lost state" mark (the service keeps it in
        # a file): every start with it set runs raft with Config.lost_state, until raft
        # votes again and a hard state above its vote floor is durable.
        self.pending_loss: str | None = None
        self.lost_marker = False
        if voters is not None:
            self._bootstrap()
        self.start()

    def _bootstrap(self) -> None:
        """The service's first start on an empty data dir: the synthetic snapshot."""
        snap = bootstrap_snapshot(self.boot_voters)
        st = self.backend.storage
        st.apply_snapshot(snap)
        self.backend.record_applied(BOOT_INDEX, snap.metadata.conf_state, BOOT_DIGEST)
        st.sync()

    def had_state(self) -> bool:
        """Whether a wipe now loses anything (the service: the chain is past genesis)."""
        return self.durable_hs.term > 0 or self.durable_last > 0 or self.durable_applied > 0

    # ---- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        from raft import Config, RawNode

        p = self.sim.params
        loss = self.pending_loss
        self.pending_loss = None
        storage = self._open_storage(loss)
        if loss is not None and self.pending_loss == "wipe":
            loss, self.pending_loss = "wipe", None
        if loss == "wipe" and self.boot_voters is not None:
            # An original validator's service re-bootstraps an empty data dir (same
            # snapshot at index 5 as every node: the validators never changed here).
            self._bootstrap()
            storage = self.backend.storage
        if self.backend.name == "disk" and getattr(storage, "recovery_lost_synced", False):
            # DiskStorage's own verdict: recovery cut damaged data that may have been synced.
            self.sim.faults._count("recovery_lost_synced")
            self.lost_marker = True
        if loss is not None:
            self.lost_marker = True
        state = storage.initial_state()
        rec = self.backend.durable_applied()
        self.applied = rec.index if rec else 0
        self.digest: bytes | None = rec.digest if rec else None
        self.conf_state = _copy(rec.conf_state) if rec else _copy(state.conf_state)
        if self.digest is not None:
            self.sim.checker.on_applied(self.id, self.applied, self.digest)
        self.handed = self.applied
        self.reported_applied = self.applied
        self.recorded_applied = self.applied
        self.durable_applied = self.applied
        self.apply_queue: list[pb.Entry] = []
        self.snapshot_reports: list[tuple[int, bool]] = []
        restarted_hs = _copy(state.hard_state)
        restarted_last = storage.last_index()
        if self.incarnation and loss is None:
            # What the last sync() made durable must all be there after the crash
            # (more is fine: a torn tail may keep some unsynced writes).
            before = self.durable_hs
            if (restarted_hs.term, restarted_hs.commit) < (before.term, before.commit) or (
                restarted_hs.term == before.term and before.vote and restarted_hs.vote != before.vote
            ):
                raise InvariantViolation(
                    f"node {self.id} restarted with hard state term={restarted_hs.term} vote={restarted_hs.vote} "
                    f"commit={restarted_hs.commit}, but term={before.term} vote={before.vote} "
                    f"commit={before.commit} was synced"
                )
            if restarted_last < self.durable_last:
                raise InvariantViolation(
                    f"node {self.id} restarted with its log ending at {restarted_last}, "
                    f"but entries up to {self.durable_last} were synced"
                )
        self.durable_hs = restarted_hs
        self.durable_last = restarted_last
        self.written_hs = _copy(self.durable_hs)
        self.written_last = self.durable_last
        self.sim.checker.on_vote(self.id, self.durable_hs.term, self.durable_hs.vote, "durable at restart")
        cfg = Config(
            id=self.id,
            election_tick=p.election_tick,
            heartbeat_tick=p.heartbeat_tick,
            applied=self.applied,
            max_size_per_msg=p.max_size_per_msg,
            max_inflight_msgs=p.max_inflight_msgs,
            max_committed_size_per_ready=p.max_committed_size_per_ready,
            check_quorum=p.check_quorum,
            pre_vote=p.pre_vote,
            lost_state=self.lost_marker,
        )
        logger = logging.getLogger(f"sim.node{self.id}")
        self.raw = RawNode(cfg, storage, rng=random.Random(self.sim.rng.getrandbits(64)), logger=logger)
        if self.lost_marker and not self.sim.protect:
            # Protection switched off (to show what it prevents): the rule's bookkeeping
            # runs, so the fault budget still sees when the node would vote again, but it
            # refuses nothing and asks no leader to hand over: plain Raft.
            r = self.raw.raft
            r._vote_withheld = lambda m: False
            r._may_campaign_after_loss = lambda: True
            r._ask_leader_to_hand_over = lambda: None
        self.alive = True
        self.incarnation += 1
        self.role_term = (0, 0)
        self.sim.trace("start", self.id, f"incarnation={self.incarnation} applied={self.applied} "
                       f"term={self.durable_hs.term} vote={self.durable_hs.vote} last={self.durable_last}"
                       + (f" LOST STATE ({loss or 'marker'})" if self.lost_marker else ""))

    def _open_storage(self, loss: str | None) -> Any:
        from raft.errors import CorruptLog

        try:
            return self.backend.restart()
        except CorruptLog as e:
            if loss is None:
                raise
            # Damage recovery refuses to cut: the operator moves the data dir away.
            self.sim.faults._count("corrupt log, wiped")
            self.sim.trace("corrupt", self.id, f"{e}; the operator wipes the node")
            self.backend.wipe()
            self.pending_loss = "wipe"
            return self.backend.restart()

    def crash(self, where: str) -> None:
        self.sim.trace("crash", self.id, where)
        if self.written_last != self.durable_last or self.written_hs != self.durable_hs:
            self.sim.faults._count("power cut lost unsynced writes")
            if self.written_hs.commit > self.durable_hs.commit and (self.written_hs.term, self.written_hs.vote) == (
                self.durable_hs.term, self.durable_hs.vote
            ):
                self.sim.faults._count("power cut lost a commit-only hard state")
        self.raw = None
        self.alive = False
        self.apply_queue = []
        self.backend.crash()
        self.sim.faults.on_crash(self)

    def decommission(self) -> None:
        self.sim.trace("decommission", self.id, "removed from the configuration")
        if self.alive:
            self.raw = None
            self.alive = False
            self.backend.crash()
        self.decommissioned = True

    def paused(self) -> bool:
        return self.sim.now < self.paused_until

    # ---- inputs --------------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run one core input. The documented refusals (ProposalDropped, StepPeerNotFound:
        a response from a peer no longer in the config) are answers; any other error,
        even a plain RaftError ("conflicts with committed entry", "commit index out of
        range"), is the core detecting an impossible state, so the run fails."""
        try:
            return fn(*args)
        except (ProposalDropped, StepPeerNotFound) as e:
            self.sim.trace("refused", self.id, f"{what}: {type(e).__name__}: {e}")
            return e

    def tick(self) -> None:
        self._call("tick", self.raw.tick)
        self.process()

    def step(self, m: pb.Message) -> None:
        self._call(f"step {pb.MessageType.Name(m.msg_type)} from {getattr(m, 'from')}", self.raw.step, m)
        self.process()

    def propose(self, data: bytes) -> bool:
        r = self._call("propose", self.raw.propose, data)
        self.process()
        return not isinstance(r, RaftError)

    def propose_conf_change(self, cc: pb.ConfChangeV2) -> bool:
        r = self._call("propose_conf_change", self.raw.propose_conf_change, cc)
        self.process()
        return not isinstance(r, RaftError)

    def transfer_leader(self, target: int) -> None:
        self._call("transfer_leader", self.raw.transfer_leader, target)
        self.process()

    def campaign(self) -> None:
        self._call("campaign", self.raw.campaign)
        self.process()

    def report_unreachable(self, to: int) -> None:
        self._call("report_unreachable", self.raw.report_unreachable, to)
        self.process()

    # ---- the Ready loop ------------------------------------------------------------

    def _boundary(self, stage: str) -> None:
        if self.sim.faults.crash_at_boundary(self, stage):
            raise NodeCrashed(stage)

    def process(self, force: bool = False) -> None:
        """Handle Readies until none is pending (or the slow disk defers one)."""
        if not self.alive:
            return
        try:
            idle = 0   # Readies in a row that handed out no committed entry
            while self.raw.has_ready():
                if not force and self.io_delay and self.sim.rng.random() < self.io_delay:
                    self.sim.deferred.add(self.id)
                    return
                handed = self.handed
                self._handle_ready()
                if not self.alive:
                    return
                self._flush_snapshot_reports()
                # A backlog of committed entries with max_committed_size_per_ready=1 takes
                # one Ready per entry (seed 2687: 200 of them); only Readies that move
                # nothing count towards the bound.
                idle = 0 if self.handed > handed else idle + 1
                if idle >= 50:
                    raise InvariantViolation(f"node {self.id} still has a Ready after 50 rounds without new input")
            self._after_ready()
        except NodeCrashed as e:
            self.crash(f"at boundary '{e}'")

    def _handle_ready(self) -> None:
        """One Ready through the shared driver (tests/ready_driver.py); the hooks below are
        this host's part of each step, `_boundary` its crash points."""
        ready_driver.run_ready(self.raw, self)

    # Hooks of tests/ready_driver.ReadyHost (called in the driver's order).

    def boundary(self, stage: str) -> None:
        self._boundary(stage)

    def on_soft_state(self, rd: Any) -> None:
        role = rd.soft_state.role
        if role.name == "Leader":
            term = rd.hard_state.term if rd.hard_state is not None else self.raw.status().term
            self.sim.checker.on_leader(self.id, term)
            self.role_term = (1, term)
            self.sim.trace("leader", self.id, f"term={term}")
        else:
            self.role_term = (0, 0)

    def send(self, msgs: list[pb.Message]) -> None:
        # 1. messages that may leave before persisting (the leader's appends)
        self._send_all(msgs)

    def send_persisted(self, msgs: list[pb.Message]) -> None:
        # 3. messages that needed the persisted state
        self._send_all(msgs)

    def persist_snapshot(self, snap: pb.Snapshot) -> None:
        self._install_snapshot(self.backend.storage, snap)

    def persist_entries(self, entries: list[pb.Entry]) -> None:
        st = self.backend.storage
        st.append(list(entries))
        for e in entries:
            prev = BOOT_TERM if e.index - 1 == BOOT_INDEX else self._term_or_none(st, e.index - 1)
            if prev is not None:
                self.sim.checker.on_log_entry(self.id, e, prev)
        self.written_last = entries[-1].index

    def persist_hard_state(self, hs: pb.HardState) -> None:
        prev = self.written_hs
        if hs.term < prev.term or hs.commit < prev.commit or (hs.term == prev.term and prev.vote and hs.vote != prev.vote):
            raise InvariantViolation(
                f"node {self.id} hard state goes back: term={hs.term} vote={hs.vote} commit={hs.commit} "
                f"after term={prev.term} vote={prev.vote} commit={prev.commit}"
            )
        self.backend.storage.set_hardstate(hs)
        self.written_hs = _copy(hs)

    def sync(self, rd: Any) -> None:
        sim = self.sim
        if rd.must_sync or not sim.params.fsync_shortcut:
            self._sync()
            self.durable_hs = _copy(self.written_hs)
            self.durable_last = self.written_last
            sim.checker.on_vote(self.id, self.durable_hs.term, self.durable_hs.vote, "persisted hard state")
        else:
            # The service's shortcut (consensus.py handle_ready, etcd's MustSync): a Ready
            # that only moves the commit index is written, not fsynced; it reaches the disk
            # with the next sync, or a power cut takes it.
            hs = rd.hard_state
            if rd.entries or rd.snapshot is not None or (
                hs is not None and (hs.term, hs.vote) != (self.durable_hs.term, self.durable_hs.vote)
            ):
                raise InvariantViolation(
                    f"node {self.id}: Ready {rd.number} says must_sync=False but carries entries, a snapshot "
                    f"or a new term/vote"
                )
            if rd.hard_state is not None:
                sim.faults._count("commit-only ready not synced")

    def apply(self, entries: list[pb.Entry]) -> int:
        # 4. hand committed entries to the applier, which applies them after `advance`
        term = self.raw.status().term
        for e in entries:
            self._hand_out(e, term)
        return 0

    def after_advance(self) -> None:
        sim = self.sim
        if self.apply_queue and sim.rng.random() >= sim.params.apply_defer:
            self.apply_pending()

    @staticmethod
    def _term_or_none(st: Any, index: int) -> int | None:
        try:
            return st.term(index)
        except RaftError:
            return None

    def _after_ready(self) -> None:
        """Checks that need the whole Ready persisted: leader completeness."""
        if self.lost_marker:
            r = self.raw.raft  # status() fields voting_withheld / vote_floor, without building a Status
            if not r.withholding_votes and self.durable_hs.term > r.vote_floor:
                self.lost_marker = False
                self.sim.faults._count("lost state settled")
                self.sim.trace("lost-state", self.id, f"votes again; durable term {self.durable_hs.term} "
                               f"> vote floor {r.vote_floor}: marker dropped")
        if self.role_term[0]:
            term = self.role_term[1]
            st = self.backend.storage
            self.sim.checker.check_leader_completeness(self.id, term, lambda i: self._term_or_none(st, i))

    def _flush_snapshot_reports(self) -> None:
        # Like the service's sender: the transport's local verdict on a MsgSnapshot,
        # reported once the Ready is done. A snapshot lost later in the network is
        # recovered by the leader's probe (its append gets rejected, so it resends).
        reports, self.snapshot_reports = self.snapshot_reports, []
        for to, ok in reports:
            self._call("report_snapshot", self.raw.report_snapshot, to, ok)

    def _send_all(self, msgs: list[pb.Message]) -> None:
        sim = self.sim
        for m in msgs:
            if m.msg_type == pb.MsgSnapshot:
                target = sim.nodes.get(m.to)
                ok = target is not None and target.alive and not sim.net.is_cut(self.id, m.to)
                self.snapshot_reports.append((m.to, ok))
            # A follower forwards a client's MsgPropose with the proposer's id, and a
            # MsgTransferLeader with the transferee's id (raft-rs does both).
            if getattr(m, "from") != self.id and m.msg_type not in (pb.MsgPropose, pb.MsgTransferLeader):
                raise InvariantViolation(f"node {self.id} emitted a message with from={getattr(m, 'from')}")
            sim.checker.on_send(self.id, m, self.durable_hs, self.durable_last)
            sim.send(self.id, m)
            if m.msg_type == pb.MsgRequestVoteResponse and not m.reject:
                sim.faults.after_vote(self)

    def _install_snapshot(self, st: Any, snap: pb.Snapshot) -> None:
        meta = snap.metadata
        self.sim.checker.on_snapshot_restored(self.id, snap)
        if meta.index <= self.applied:
            raise InvariantViolation(
                f"node {self.id} was handed snapshot index={meta.index} at or below its applied index={self.applied}"
            )
        st.apply_snapshot(snap)
        _, digest = decode_snapshot_data(snap.data)
        self.apply_queue = [e for e in self.apply_queue if e.index > meta.index]
        if self.apply_queue:
            raise InvariantViolation(f"node {self.id} has committed entries above a newer snapshot index={meta.index}")
        self.applied = meta.index
        self.handed = max(self.handed, meta.index)
        self.digest = digest
        self.conf_state = _copy(meta.conf_state)
        self.written_last = meta.index
        if self.written_hs.commit < meta.index:
            self.written_hs.commit = meta.index
        self.written_hs.term = max(self.written_hs.term, meta.term)
        self.backend.record_applied(meta.index, meta.conf_state, digest)
        self.recorded_applied = meta.index
        self.sim.trace("snapshot", self.id, f"installed index={meta.index} term={meta.term}")

    # ---- apply ---------------------------------------------------------------------

    def _hand_out(self, e: pb.Entry, term: int) -> None:
        if e.index != self.handed + 1:
            what = "twice" if e.index <= self.handed else "with a gap"
            raise InvariantViolation(
                f"node {self.id} handed out committed index={e.index} {what} (last handed {self.handed})"
            )
        self.handed = e.index
        self.sim.checker.on_committed(self.id, e, term)
        self.apply_queue.append(_copy(e))

    def apply_pending(self, limit: int | None = None) -> None:
        if not self.alive or not self.apply_queue:
            return
        batch = self.apply_queue if limit is None else self.apply_queue[:limit]
        self.apply_queue = self.apply_queue[len(batch):]
        for e in batch:
            self._apply(e)
        if self.applied > self.reported_applied:
            self.reported_applied = self.applied
            self._call("advance_apply_to", self.raw.advance_apply_to, self.applied)
        self.maybe_compact()
        self.process()

    def _apply(self, e: pb.Entry) -> None:
        if e.index != self.applied + 1:
            raise InvariantViolation(f"node {self.id} applies index={e.index} after applied={self.applied}")
        if self.digest is None:
            raise InvariantViolation(f"node {self.id} applies index={e.index} without any state (no snapshot)")
        changed = None
        if e.entry_type == pb.EntryConfChangeV2:
            cc = pb.ConfChangeV2()
            cc.ParseFromString(e.data)
            try:
                cs = self.raw.apply_conf_change(cc)
            except RaftError as err:
                raise InvariantViolation(
                    f"node {self.id} cannot apply the committed conf change at index={e.index}: {err}"
                ) from err
            self.conf_state = _copy(cs)
            changed = self.conf_state
            self.sim.checker.on_conf_applied(self.id, e.index, cs)
            self.sim.trace("conf", self.id, f"applied index={e.index} voters={list(cs.voters)} "
                           f"outgoing={list(cs.voters_outgoing)} auto_leave={cs.auto_leave}")
        elif e.entry_type == pb.EntryConfChange:
            raise InvariantViolation(f"node {self.id}: a V1 EntryConfChange at index={e.index}; we only propose V2")
        self.digest = chain_digest(self.digest, e)
        self.applied = e.index
        self.sim.checker.on_applied(self.id, e.index, self.digest)
        self.backend.record_applied(e.index, changed, self.digest)
        self.recorded_applied = e.index
        if changed is not None:
            # A joining node can only restore a snapshot whose conf state lists it
            # (raft-rs refuses others), so snapshot right at every conf change.
            self.snapshot_now(compact=False)

    def snapshot_now(self, compact: bool) -> None:
        if not self.alive or self.digest is None:
            return
        st = self.backend.storage
        try:
            snap = st.create_snapshot(self.applied, self.conf_state, encode_snapshot_data(self.applied, self.digest))
        except RaftError:
            return
        if compact:
            # Keep a random tail behind the snapshot so both catch-up paths (entries
            # and snapshot) stay in use.
            keep = self.sim.rng.choice([0, 0, 1, 3, 10])
            to = max(snap.metadata.index + 1 - keep, st.first_index())
            try:
                st.compact(to)
            except RaftError:
                pass
        self.sim.trace("compact" if compact else "snapshot", self.id, f"snapshot index={snap.metadata.index}")

    def maybe_compact(self) -> None:
        p = self.sim.params
        if p.compact_every and self.applied - self._snap_index() >= p.compact_every:
            self.snapshot_now(compact=True)

    def _snap_index(self) -> int:
        return self.backend.storage.first_index() - 1

    def _sync(self) -> None:
        self.backend.storage.sync()
        self.durable_applied = self.recorded_applied

    def idle_sync(self) -> None:
        """Make pending writes (applied records, compaction) durable outside a Ready."""
        if self.alive:
            self._sync()
