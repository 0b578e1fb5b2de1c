"""RawNode: the host-facing API around the Raft core, and the Ready batches it produces.

Ready semantics follow raft-rs (docs/internals.md): `messages` may be sent at once (the
leader's appends, heartbeats, snapshots, MsgTimeoutNow, forwarded proposals), while
`persisted_messages` (vote requests and responses, append responses...) may only leave after
this Ready's entries, hard state and snapshot are durable (paper §5: a vote or an append
acknowledgement is a promise about durable state). Committed entries are handed out once,
only up to what is persisted locally; `advance_apply_to` reports asynchronous application.
One Ready is outstanding at a time: ready() again before advance() is an error.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from cita_raft_pb import eraftpb_pb2 as pb

from .config import Config
from .core import (
    LOCAL_MSGS,
    RESPONSE_MSGS,
    MsgAppend,
    MsgHeartbeat,
    MsgHup,
    MsgPropose,
    MsgRequestPreVote,
    MsgSnapshot,
    MsgSnapStatus,
    MsgTimeoutNow,
    MsgTransferLeader,
    MsgUnreachable,
    Raft,
    StateRole,
)
from .errors import ProposalDropped, RaftError, StepLocalMsg, StepPeerNotFound
from .storage import Storage

# Messages that promise nothing about this node's durable state, so they need not wait for fsync.
# The leader's appends may go out in parallel with its own fsync because it counts itself
# towards the commit quorum only once its entries are persisted (raft-rs on_persist_entries).
_IMMEDIATE = frozenset({MsgAppend, MsgHeartbeat, MsgSnapshot, MsgTimeoutNow, MsgTransferLeader, MsgPropose, MsgRequestPreVote})


@dataclass(frozen=True)
class SoftState:
    """Volatile state worth telling the host about: who leads, and our role."""

    leader_id: int
    role: StateRole


@dataclass
class Ready:
    number: int = 0
    soft_state: SoftState | None = None
    hard_state: pb.HardState | None = None
    entries: list[pb.Entry] = field(default_factory=list)
    snapshot: pb.Snapshot | None = None
    messages: list[pb.Message] = field(default_factory=list)
    persisted_messages: list[pb.Message] = field(default_factory=list)
    committed_entries: list[pb.Entry] = field(default_factory=list)
    must_sync: bool = False


@dataclass
class Status:
    id: int
    term: int
    vote: int
    commit: int
    applied: int
    leader_id: int
    role: StateRole
    conf_state: pb.ConfState
    progress: dict[int, tuple[int, int, str]]
    last_index: int
    persisted: int = 0
    lead_transferee: int = 0


class RawNode:
    def __init__(
        self,
        config: Config,
        storage: Storage,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.raft = Raft(config, storage, rng, logger)
        self._prev_ss = self._soft_state()
        self._prev_hs = self.raft.hard_state()
        self._number = 0
        self._outstanding: Ready | None = None

    # ---- inputs -------------------------------------------------------------------

    def tick(self) -> bool:
        """One logical clock tick; True if something may have happened that needs a Ready."""
        self.raft.tick()
        return self.has_ready()

    def campaign(self) -> None:
        self.raft.step(pb.Message(msg_type=MsgHup))

    def propose(self, data: bytes, context: bytes = b"") -> None:
        """Propose a normal entry; raises ProposalDropped when it cannot be appended."""
        m = pb.Message(msg_type=MsgPropose, entries=[pb.Entry(data=data, context=context)])
        setattr(m, "from", self.raft.id)
        self.raft.step(m)

    def propose_many(self, items: list[bytes]) -> None:
        """Propose several normal entries as one batch (one append per follower)."""
        m = pb.Message(msg_type=MsgPropose, entries=[pb.Entry(data=d) for d in items])
        setattr(m, "from", self.raft.id)
        self.raft.step(m)

    def propose_conf_change(self, cc: pb.ConfChangeV2, context: bytes = b"") -> None:
        m = pb.Message(
            msg_type=MsgPropose,
            entries=[pb.Entry(entry_type=pb.EntryConfChangeV2, data=cc.SerializeToString(), context=context)],
        )
        setattr(m, "from", self.raft.id)
        self.raft.step(m)

    def transfer_leader(self, transferee: int) -> None:
        m = pb.Message(msg_type=MsgTransferLeader)
        setattr(m, "from", transferee)
        self.raft.step(m)

    def step(self, msg: pb.Message) -> None:
        """Feed a message from a peer. Local-only types raise StepLocalMsg; responses from
        unknown peers raise StepPeerNotFound (raft-rs)."""
        t = msg.msg_type
        if t in LOCAL_MSGS:
            raise StepLocalMsg(f"{pb.MessageType.Name(t)} is a local message")
        if t in RESPONSE_MSGS and getattr(msg, "from") not in self.raft.prs.progress:
            raise StepPeerNotFound(f"no progress for peer {getattr(msg, 'from')}")
        if t == MsgPropose:
            # A proposal forwarded by a follower: if we cannot take it, the follower's
            # client times out and retries; it must not crash our host loop.
            try:
                self.raft.step(msg)
            except ProposalDropped:
                self.raft._debug("dropped forwarded proposal", **{"from": getattr(msg, "from")})
            return
        self.raft.step(msg)

    def report_unreachable(self, peer: int) -> None:
        m = pb.Message(msg_type=MsgUnreachable)
        setattr(m, "from", peer)
        self.raft.step(m)

    def report_snapshot(self, peer: int, ok: bool) -> None:
        m = pb.Message(msg_type=MsgSnapStatus, reject=not ok)
        setattr(m, "from", peer)
        self.raft.step(m)

    def request_snapshot(self, request_index: int = 0) -> None:
        self.raft.request_snapshot(request_index or self.raft.log.committed)

    def apply_conf_change(self, cc: pb.ConfChangeV2) -> pb.ConfState:
        return self.raft.apply_conf_change(cc)

    # ---- Ready --------------------------------------------------------------------

    def _soft_state(self) -> SoftState:
        return SoftState(self.raft.leader_id, self.raft.state)

    def has_ready(self) -> bool:
        r = self.raft
        r.flush_appends()
        if r.msgs or r.log.unstable.entries or r.log.unstable.snapshot is not None:
            return True
        if self._soft_state() != self._prev_ss:
            return True
        hs = self._prev_hs
        if r.term != hs.term or r.vote != hs.vote or r.log.committed != hs.commit:
            return True
        return r.log.has_next_entries()

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise RaftError("ready() called again before advance() of the previous Ready")
        r = self.raft
        r.flush_appends()
        self._number += 1
        rd = Ready(number=self._number)
        ss = self._soft_state()
        if ss != self._prev_ss:
            rd.soft_state = ss
        hs = self._prev_hs
        if r.term != hs.term or r.vote != hs.vote or r.log.committed != hs.commit:
            rd.hard_state = r.hard_state()
            if r.term != hs.term or r.vote != hs.vote:
                rd.must_sync = True
        u = r.log.unstable
        if u.snapshot is not None:
            rd.snapshot = u.snapshot
            rd.must_sync = True
        if u.entries:
            rd.entries = list(u.entries)
            rd.must_sync = True
        if r.msgs:
            imm = rd.messages
            per = rd.persisted_messages
            for m in r.msgs:
                (imm if m.msg_type in _IMMEDIATE else per).append(m)
            r.msgs = []
        rd.committed_entries = r.log.next_entries(r.max_committed_size)
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """Everything in `rd` was persisted, sent and handed to the applier."""
        if rd is not self._outstanding:
            raise RaftError(f"advance() of Ready {rd.number} which is not the outstanding one")
        self._outstanding = None
        r = self.raft
        if rd.soft_state is not None:
            self._prev_ss = rd.soft_state
        if rd.hard_state is not None:
            self._prev_hs = rd.hard_state
        if rd.snapshot is not None:
            r.on_persist_snap(rd.snapshot.metadata.index)
        if rd.entries:
            last = rd.entries[-1]
            r.on_persist_entries(last.index, last.term)
        if rd.committed_entries:
            r.log.handed_out(rd.committed_entries[-1].index)

    def advance_apply_to(self, index: int) -> None:
        """The host finished applying committed entries up to `index`."""
        self.raft.commit_apply(index)

    # ---- status -------------------------------------------------------------------

    def status(self) -> Status:
        r = self.raft
        progress: dict[int, tuple[int, int, str]] = {}
        if r.state == StateRole.Leader:
            progress = {pid: (pr.matched, pr.next_idx, pr.state.name) for pid, pr in r.prs.progress.items()}
        return Status(
            id=r.id,
            term=r.term,
            vote=r.vote,
            commit=r.log.committed,
            applied=r.log.applied,
            leader_id=r.leader_id,
            role=r.state,
            conf_state=r.prs.conf.to_conf_state(),
            progress=progress,
            last_index=r.log.last_index(),
            persisted=r.log.persisted,
            lead_transferee=r.lead_transferee,
        )


__all__ = ["RawNode", "Ready", "SoftState", "Status", "MsgHup"]
