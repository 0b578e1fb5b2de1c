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
from dataclasses import dataclass

from cita_raft_pb import eraftpb_pb2 as pb

from .config import Config
from .core import (
    INVALID_ID,
    LOCAL_MSGS,
    RESPONSE_MSGS,
    MsgAppend,
    MsgHeartbeat,
    MsgHup,
    MsgPropose,
    MsgReadIndex,
    MsgRequestPreVote,
    MsgSnapshot,
    MsgSnapStatus,
    MsgTimeoutNow,
    MsgTransferLeader,
    MsgUnreachable,
    Raft,
    StateRole,
    msg_name,
)
from .errors import ProposalDropped, RaftError, RaftInvariantError, StepLocalMsg, StepPeerNotFound
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


class Ready:
    """One batch of work for the host (raft-rs field meanings, see docs/internals.md)."""

    __slots__ = (
        "number",
        "soft_state",
        "hard_state",
        "entries",
        "snapshot",
        "messages",
        "persisted_messages",
        "committed_entries",
        "must_sync",
    )

    def __init__(self, number: int = 0) -> None:
        self.number = number
        self.soft_state: SoftState | None = None
        self.hard_state: pb.HardState | None = None
        self.entries: list[pb.Entry] = []
        self.snapshot: pb.Snapshot | None = None
        self.messages: list[pb.Message] = []
        self.persisted_messages: list[pb.Message] = []
        self.committed_entries: list[pb.Entry] = []
        self.must_sync = False

    def __repr__(self) -> str:
        return (
            f"Ready(number={self.number} soft_state={self.soft_state} hard_state={self.hard_state is not None} "
            f"entries={len(self.entries)} snapshot={self.snapshot is not None} messages={len(self.messages)} "
            f"persisted_messages={len(self.persisted_messages)} committed_entries={len(self.committed_entries)})"
        )


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
    # Config.lost_state (docs/internals.md, "Lost state"): votes withheld until caught up,
    # then none in terms <= vote_floor. The host may drop its lost-state marker once
    # voting_withheld is False and a hard state with term > vote_floor is durable.
    voting_withheld: bool = False
    vote_floor: int = 0


def _check_hard_state(prev: tuple[int, int, int], new: tuple[int, int, int]) -> None:
    """Raft never moves the term or the commit index back, nor changes a vote within a
    term (paper §5.1, §5.2, §5.4): a Ready that would persist such a hard state means the
    core is broken, and the host must stop before writing it."""
    if new[0] < prev[0]:
        raise RaftInvariantError(f"term going back from {prev[0]} to {new[0]}")
    if new[0] == prev[0] and prev[1] != 0 and new[1] != prev[1]:
        raise RaftInvariantError(f"vote changing from {prev[1]} to {new[1]} within term {new[0]}")
    if new[2] < prev[2]:
        raise RaftInvariantError(f"commit index going back from {prev[2]} to {new[2]}")


class RawNode:
    def __init__(
        self,
        config: Config,
        storage: Storage,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.raft = Raft(config, storage, rng, logger)
        r = self.raft
        # What the host last got: (leader_id, role) and (term, vote, commit).
        self._prev_ss_key = (r.leader_id, r.state)
        self._prev_hs_key = (r.term, r.vote, r.log.committed)
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
        r = self.raft
        if r.state == StateRole.Leader:
            # Fast path (the hot one): no MsgPropose object for our own proposals.
            r.propose_normal(data, context)
            return
        m = pb.Message(msg_type=MsgPropose, entries=[pb.Entry(data=data, context=context)])
        setattr(m, "from", r.id)
        r.step(m)

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

    def skip_bcast_commit(self, skip: bool) -> None:
        """Switch Config.skip_bcast_commit at run time (raft-rs RawNode::skip_bcast_commit)."""
        self.raft.skip_bcast_commit = skip

    def step(self, msg: pb.Message) -> None:
        """Feed a message from a peer. Local-only types raise StepLocalMsg; responses from
        unknown peers raise StepPeerNotFound (raft-rs)."""
        t = msg.msg_type
        if t in LOCAL_MSGS:
            raise StepLocalMsg(f"{msg_name(t)} is a local message")
        frm = getattr(msg, "from")
        if frm == INVALID_ID or frm == self.raft.id:
            # Nobody (0 means "no vote" on the wire) or ourselves: a forged or looped message
            # could vote twice or count our unpersisted entries; drop it.
            self.raft._drop_message(msg, f"message from {'nobody' if frm == INVALID_ID else 'this node itself'}")
            return
        if msg.term == 0 and t != MsgPropose and t != MsgReadIndex:
            # Term 0 means "local" to the core (raft-rs too); from a peer it would pass the
            # term checks and could move our term back to 0 (every peer message has a term,
            # but forwarded proposals and read requests).
            self.raft._drop_message(msg, "message without a term")
            return
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
        if r._bcast_pending:
            r.flush_appends()
        lg = r.log
        u = lg.unstable
        if r.msgs or u.entries or u.snapshot is not None:
            return True
        if (r.leader_id, r.state) != self._prev_ss_key:
            return True
        if (r.term, r.vote, lg.committed) != self._prev_hs_key:
            return True
        return lg.has_next_entries()

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise RaftError("ready() called again before advance() of the previous Ready")
        r = self.raft
        if r._bcast_pending:
            r.flush_appends()
        self._number += 1
        rd = Ready(self._number)
        lg = r.log
        if (r.leader_id, r.state) != self._prev_ss_key:
            rd.soft_state = self._soft_state()
        hs_key = (r.term, r.vote, lg.committed)
        prev = self._prev_hs_key
        if hs_key != prev:
            _check_hard_state(prev, hs_key)
            hs = rd.hard_state = pb.HardState()
            hs.term, hs.vote, hs.commit = hs_key
            if hs_key[0] != prev[0] or hs_key[1] != prev[1]:
                rd.must_sync = True
        u = lg.unstable
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
        if min(lg.committed, lg.persisted) > lg.applying:
            rd.committed_entries = lg.next_entries(r.max_committed_size)
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """Everything in `rd` was persisted, sent and handed to the applier."""
        if rd is not self._outstanding:
            raise RaftError(f"advance() of Ready {rd.number} which is not the outstanding one")
        self._outstanding = None
        r = self.raft
        if rd.soft_state is not None:
            self._prev_ss_key = (rd.soft_state.leader_id, rd.soft_state.role)
        if rd.hard_state is not None:
            hs = rd.hard_state
            self._prev_hs_key = (hs.term, hs.vote, hs.commit)
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
            voting_withheld=r.withholding_votes,
            vote_floor=r.vote_floor,
        )


__all__ = ["RawNode", "Ready", "SoftState", "Status", "MsgHup"]
