"""The Raft state machine: roles, terms, elections (pre-vote, check-quorum), replication,
commit, snapshots, leader transfer and membership, speaking raft-rs's eraftpb messages.

Theory of operation. `Raft` is deterministic and does no I/O: inputs are `tick()` and
`step(msg)`; outputs accumulate in `self.msgs` (every message through `send()`) and in
the log's unstable tail, which RawNode turns into Ready batches. Every field sent or read
has raft-rs's meaning, so a node of this project and a raft-rs node can sit in one group.
Randomness only comes from the injected rng (election timeouts). Protocol rules cite the
Raft paper ("§5.x") or Ongaro's thesis ("thesis §x").

Names follow etcd/raft-rs: become_* (role changes), step_* (per-role message handling),
maybe_* (conditional, returns bool), send_*/bcast_* (queue outgoing messages).
"""

from __future__ import annotations

import logging
import random
from enum import IntEnum

from google.protobuf.message import DecodeError

from cita_raft_pb import eraftpb_pb2 as pb

from . import confchange
from .config import NO_LIMIT, Config
from .errors import (
    Compacted,
    ConfChangeError,
    ProposalDropped,
    RaftError,
    RaftInvariantError,
    SnapshotTemporarilyUnavailable,
)
from .log import RaftLog
from .progress import Progress, ProgressState, ProgressTracker
from .quorum import VoteResult
from .storage import Storage, limit_size

INVALID_ID = 0
CAMPAIGN_PRE_ELECTION = b"CampaignPreElection"
CAMPAIGN_ELECTION = b"CampaignElection"
CAMPAIGN_TRANSFER = b"CampaignTransfer"

MT = pb.MessageType
MsgHup = pb.MsgHup
MsgBeat = pb.MsgBeat
MsgPropose = pb.MsgPropose
MsgAppend = pb.MsgAppend
MsgAppendResponse = pb.MsgAppendResponse
MsgRequestVote = pb.MsgRequestVote
MsgRequestVoteResponse = pb.MsgRequestVoteResponse
MsgSnapshot = pb.MsgSnapshot
MsgHeartbeat = pb.MsgHeartbeat
MsgHeartbeatResponse = pb.MsgHeartbeatResponse
MsgUnreachable = pb.MsgUnreachable
MsgSnapStatus = pb.MsgSnapStatus
MsgCheckQuorum = pb.MsgCheckQuorum
MsgTransferLeader = pb.MsgTransferLeader
MsgTimeoutNow = pb.MsgTimeoutNow
MsgReadIndex = pb.MsgReadIndex
MsgRequestPreVote = pb.MsgRequestPreVote
MsgRequestPreVoteResponse = pb.MsgRequestPreVoteResponse

LOCAL_MSGS = frozenset({MsgHup, MsgBeat, MsgUnreachable, MsgSnapStatus, MsgCheckQuorum})
RESPONSE_MSGS = frozenset(
    {MsgAppendResponse, MsgRequestVoteResponse, MsgHeartbeatResponse, MsgUnreachable, MsgRequestPreVoteResponse}
)
_VOTE_TYPES = frozenset({MsgRequestVote, MsgRequestPreVote, MsgRequestVoteResponse, MsgRequestPreVoteResponse})


class StateRole(IntEnum):
    """raft-rs's StateRole values."""

    Follower = 0
    Candidate = 1
    Leader = 2
    PreCandidate = 3


_KNOWN_TYPES = frozenset(MT.values())
# Terms and indexes this close to u64 max leave no room to count up (a campaign adds 1 to
# the term, appends add 1 to the index; protobuf refuses 2^64): a message carrying one is
# dropped, never adopted (docs/internals.md, "Messages the core drops").
VALUE_LIMIT = (1 << 64) - (1 << 32)
# Lost state: a vote request counts as a witnessed election only this many election
# timeouts after the start: two of the longest randomized ones (one for any candidacy
# open at the loss to end, one for its messages to drain).
WITNESS_AFTER_ELECTION_TIMEOUTS = 4
_LIMITED_FIELDS = ("term", "index", "log_term", "commit", "commit_term", "reject_hint", "request_snapshot")


def msg_name(t: int) -> str:
    """The MessageType name, or the number for a value outside the enum (never raises)."""
    return MT.Name(t) if t in _KNOWN_TYPES else f"MessageType({t})"


def message_fault(m: pb.Message) -> str | None:
    """Why the core must drop `m` unread, or None. Checked at the step boundary: an
    unknown type, any term/index field within 2^32 of u64 max (in the message, its
    entries or its snapshot), or entries that no leader sends (not contiguous after
    `index`, or of terms outside [log_term, term] in order)."""
    t = m.msg_type
    if t not in _KNOWN_TYPES:
        return f"unknown message type {t}"
    lim = VALUE_LIMIT
    if m.term >= lim or m.index >= lim or m.log_term >= lim or m.commit >= lim or m.commit_term >= lim \
            or m.reject_hint >= lim or m.request_snapshot >= lim:
        for f in _LIMITED_FIELDS:
            if getattr(m, f) >= lim:
                return f"{f} {getattr(m, f)} is within 2^32 of u64 max"
    if t == MsgAppend:
        prev_term = m.log_term
        if prev_term > m.term:
            return f"log_term {prev_term} above the message term {m.term}"
        i = m.index
        for e in m.entries:
            i += 1
            if e.index != i:
                return f"entries not contiguous after index {m.index}: {e.index} where {i} was due"
            if e.term < prev_term or e.term > m.term or e.term == 0:
                return f"entry {e.index} of term {e.term} out of order (previous {prev_term}, message term {m.term})"
            prev_term = e.term
        if i >= lim:
            return f"entry index {i} is within 2^32 of u64 max"
    elif t == MsgSnapshot and m.HasField("snapshot"):
        meta = m.snapshot.metadata
        if meta.index >= lim or meta.term >= lim:
            return f"snapshot ({meta.index}, {meta.term}) is within 2^32 of u64 max"
        if meta.term > m.term:
            return f"snapshot term {meta.term} above the message term {m.term}"
        if meta.index and not meta.term:
            return f"snapshot at index {meta.index} without a term"
    elif (t == MsgRequestVote or t == MsgRequestPreVote) and m.log_term > m.term:
        return f"log_term {m.log_term} above the campaign term {m.term}"
    return None


def _vote_resp_type(t: int) -> int:
    return MsgRequestVoteResponse if t == MsgRequestVote else MsgRequestPreVoteResponse


_CHANGE_TYPES = frozenset(pb.ConfChangeType.values())
_TRANSITIONS = frozenset(pb.ConfChangeTransition.values())


def _parse_conf_change(data: bytes) -> pb.ConfChangeV2:
    """A proposed ConfChangeV2 (maybe forwarded by a peer); ProposalDropped if it does not
    parse or names a change type or transition outside the enums: committed, it could
    not be applied on any node."""
    cc = pb.ConfChangeV2()
    try:
        cc.ParseFromString(data)
    except DecodeError as e:
        raise ProposalDropped(f"undecodable ConfChangeV2: {e}") from None
    if cc.transition not in _TRANSITIONS or any(c.change_type not in _CHANGE_TYPES for c in cc.changes):
        raise ProposalDropped(f"ConfChangeV2 with an unknown change type or transition: {cc}")
    return cc


def _conf_key(cs: pb.ConfState) -> tuple:
    return (sorted(cs.voters), sorted(cs.learners), sorted(cs.voters_outgoing), sorted(cs.learners_next),
            bool(cs.auto_leave))


def snapshot_is_empty(snap: pb.Snapshot | None) -> bool:
    """An absent snapshot and one with metadata.index 0 mean the same (etcd sends the latter)."""
    return snap is None or snap.metadata.index == 0


class Raft:
    """One node's Raft state machine (raft-rs `Raft`, etcd `raft`). Its fields follow, one
    comment each: what it means, and which methods change it."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        config.validate()
        # ---- set here, never changed
        # This node's id (Config.id); send() makes it the sender of messages that name none.
        self.id = config.id
        # The Config it started with; _post_conf_change reads step_down_on_removal from it.
        self.config = config
        # Where the core logs (_info/_debug/_warn); logging is its only side effect.
        self.logger = logger or logging.getLogger("raft")
        # The only randomness: reset_randomized_election_timeout draws from it (paper §5.2).
        self.rng = rng or random.Random(config.id)
        # The host's durable store: the core reads it (through `log`), only the host writes it.
        self.storage = storage
        # Stored entries plus the unstable tail and the commit/persisted/applied marks; RaftLog moves them.
        self.log = RaftLog(storage, self.logger)
        # Config, a Progress per member, votes: _start/restore/apply_conf_change, _reset, poll, step_leader.
        self.prs = ProgressTracker(config.max_inflight_msgs)
        # Config.check_quorum: a leader no quorum heard for an election timeout steps down (thesis §6.2).
        self.check_quorum = config.check_quorum
        # Config.pre_vote: campaign with a pre-vote round first (thesis §9.6).
        self.pre_vote = config.pre_vote
        # Config.election_tick: ticks without a leader before a campaign; also check-quorum's period.
        self.election_timeout = config.election_tick
        # Config.heartbeat_tick: ticks between a leader's heartbeats.
        self.heartbeat_timeout = config.heartbeat_tick
        # Range [min, max) of randomized_election_timeout (Config.min_election/max_election).
        self.min_election_timeout = config.min_election()
        self.max_election_timeout = config.max_election()
        # Config.max_size_per_msg: byte budget of one append's entries (None: no limit).
        ms = config.max_size_per_msg
        self.max_msg_size: int | None = None if ms >= NO_LIMIT else ms
        # Config.max_committed_size_per_ready: byte budget of one Ready's committed entries (None: no limit).
        mc = config.max_committed_size_per_ready
        self.max_committed_size: int | None = None if mc == 0 or mc >= NO_LIMIT else mc
        # Config.lost_state: this node may have forgotten a vote; see the lost-state section below.
        self.lost_state = config.lost_state

        # ---- persistent state (paper Figure 2), reported in each Ready's hard state
        # Current term: _reset moves it up (become_*), _load_state and _start set it from the store.
        self.term = 0
        # Whom we voted for in `term` (0: nobody): become_candidate, _handle_vote_request; _reset clears it.
        self.vote = 0

        # ---- role and volatile state
        # Our role: only become_follower/become_candidate/become_pre_candidate/become_leader set it.
        self.state = StateRole.Follower
        # The leader of `term` we follow (0: none known): become_*, _reset, step_follower on a leader message.
        self.leader_id = INVALID_ID
        # Leader: whom leadership is handed to (0: none): _handle_transfer_leader, abort_leader_transfer.
        self.lead_transferee = INVALID_ID
        # Leader: last conf change appended, none new until applied: become_leader, _propose, commit_apply, _reset.
        self.pending_conf_index = 0
        # Follower: index it asked the leader a snapshot for (0: none): request_snapshot sets, restore clears.
        self.pending_request_snapshot = 0
        # A voter of the current configuration, so it may campaign: _post_conf_change.
        self.promotable = False
        # Messages for the next Ready: only send() appends, RawNode.ready() takes, _reset drops stale acks.
        self.msgs: list[pb.Message] = []
        # Leader: followers are due an append: bcast_append sets, flush_appends (each Ready) and _reset clear.
        self._bcast_pending = False
        # Config.skip_bcast_commit: no append only to tell a commit; RawNode.skip_bcast_commit switches it.
        self.skip_bcast_commit = config.skip_bcast_commit

        # ---- timers, in ticks
        # This term's election timeout, drawn by reset_randomized_election_timeout (each _reset).
        self.randomized_election_timeout = self.election_timeout
        # Ticks since a reset: tick_* count; _reset, a leader's message, a granted vote, a transfer zero it.
        self.election_elapsed = 0
        # Leader: ticks since the last heartbeat: tick_heartbeat counts and zeroes it, _reset zeroes it.
        self.heartbeat_elapsed = 0

        # ---- counters and warn-once marks, for the host and the simulations
        # (term, leader) last told our log lost acknowledged entries: _report_lost_log warns once each.
        self._lost_log_reported: tuple[int, int] | None = None
        # Messages dropped by message_fault() or RawNode.step's checks: _drop_message counts them.
        self.dropped_messages = 0
        # Leader messages of our term from a node that is not its leader: _conflicting_leader counts them.
        self.conflicting_leaders = 0

        # ---- lost state (Config.lost_state; docs/internals.md, "Lost state")
        # Refusing all votes and campaigns: from Config, _lost_state_tick/_may_campaign_after_loss clear it.
        self.withholding_votes = config.lost_state
        # No vote in a term at or below it: _start sets it, _note_term_while_withholding raises it.
        self.vote_floor = 0
        # Ticks since the start (the core has no clock): _lost_state_tick counts them.
        self._lost_ticks = 0
        # (term, leader commit) to catch up to: _note_term_while_withholding, from the leader's first append.
        self._lost_target: tuple[int, int] | None = None
        # Candidate -> top term it asked our vote for: _note_term_while_withholding; _lost_state_tick clears.
        self._witnessed: dict[int, int] = {}
        # (term, index): an append of that term matched our log to there: _lost_state_commit_guard.
        self._verified: tuple[int, int] = (0, 0)
        # _lost_ticks of the last handover request, and how many were sent: _ask_leader_to_hand_over.
        self._handover_at = 0
        self._handovers = 0
        # Votes and campaigns refused since the last log line: _vote_withheld, _may_campaign_after_loss.
        self._withheld = 0
        # _lost_ticks of that log line: _log_withheld.
        self._withheld_logged_at = -(1 << 30)

        self._start(config)

    def _start(self, config: Config) -> None:
        """Take up the configuration, hard state and applied index the store and config hold."""
        rs = self.storage.initial_state()
        confchange.restore(self.prs, self.log.last_index(), rs.conf_state)
        self._post_conf_change()
        hs = rs.hard_state
        if hs.term or hs.vote or hs.commit:
            self._load_state(hs)
        last_term = self.log.last_term()
        if self.term < last_term:
            # Every entry comes from a leader of a term <= ours; a store that lost the term
            # (e.g. a bootstrap snapshot without a hard state) would otherwise let us lead a
            # lower term than our log and break the up-to-date check (§5.4.1).
            self._warn("hard state term is below the last log term, raising it", term=self.term, last_term=last_term)
            self.term = last_term
            self.vote = INVALID_ID
        if config.applied > 0:
            self.log.applied_to(min(config.applied, self.log.committed))
            self.log.applying = max(self.log.applying, self.log.applied)
        self.become_follower(self.term, INVALID_ID)
        if self.lost_state:
            self.vote_floor = max(self.term, self.log.last_term())
            self._warn(
                "lost state: withholding votes until this node has seen a leader elected and been caught up by it",
                term=self.term,
                vote_floor=self.vote_floor,
                last_index=self.log.last_index(),
            )
        self._info(
            "newRaft",
            term=self.term,
            commit=self.log.committed,
            applied=self.log.applied,
            last_index=self.log.last_index(),
            last_term=self.log.last_term(),
            voters=sorted(self.prs.conf.incoming),
        )

    # ---- logging ------------------------------------------------------------------

    def _info(self, event: str, **kv: object) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info("%s id=%d %s", event, self.id, " ".join(f"{k}={v}" for k, v in kv.items()))

    def _debug(self, event: str, **kv: object) -> None:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("%s id=%d %s", event, self.id, " ".join(f"{k}={v}" for k, v in kv.items()))

    def _warn(self, event: str, **kv: object) -> None:
        self.logger.warning("%s id=%d %s", event, self.id, " ".join(f"{k}={v}" for k, v in kv.items()))

    # ---- state --------------------------------------------------------------------

    def _load_state(self, hs: pb.HardState) -> None:
        if hs.commit > self.log.last_index():
            raise RaftError(
                f"hard state commit {hs.commit} is out of range [{self.log.committed}, {self.log.last_index()}]"
            )
        # A commit below the snapshot index (a store that did not bump it on install) is
        # harmless: everything in the snapshot is committed.
        self.log.committed = max(hs.commit, self.log.committed)
        self.term = hs.term
        self.vote = hs.vote

    def hard_state(self) -> pb.HardState:
        return pb.HardState(term=self.term, vote=self.vote, commit=self.log.committed)

    def reset_randomized_election_timeout(self) -> None:
        # Paper §5.2: randomized timeouts make split votes rare.
        self.randomized_election_timeout = self.rng.randrange(self.min_election_timeout, self.max_election_timeout)

    def past_election_timeout(self) -> bool:
        return self.election_elapsed >= self.randomized_election_timeout

    def _reset(self, term: int) -> None:
        if term < self.term:
            raise RaftInvariantError(f"term going back from {self.term} to {term}")
        if self.term != term:
            # Append acks of an older term still waiting for their Ready may vouch for
            # entries the new term's leader overwrites before they are persisted; they
            # are stale for their leader anyway, so drop them (paper §5.3).
            self.msgs = [m for m in self.msgs if m.msg_type != MsgAppendResponse or m.term >= term]
            self.term = term
            self.vote = INVALID_ID
        self.leader_id = INVALID_ID
        self.reset_randomized_election_timeout()
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.abort_leader_transfer()
        self.prs.reset_votes()
        self.pending_conf_index = 0
        self._bcast_pending = False
        last = self.log.last_index()
        for pid, pr in self.prs.progress.items():
            pr.reset(last + 1)
            if pid == self.id:
                pr.matched = self.log.persisted

    def become_follower(self, term: int, leader_id: int) -> None:
        pending_request_snapshot = self.pending_request_snapshot
        self._reset(term)
        self.leader_id = leader_id
        self.state = StateRole.Follower
        self.pending_request_snapshot = pending_request_snapshot
        self._info("became follower", term=self.term, leader=leader_id)

    def become_candidate(self) -> None:
        if self.state == StateRole.Leader:
            raise RaftInvariantError("invalid transition [leader -> candidate]")
        self._reset(self.term + 1)
        self.vote = self.id
        self.state = StateRole.Candidate
        self._info("became candidate", term=self.term)

    def become_pre_candidate(self) -> None:
        if self.state == StateRole.Leader:
            raise RaftInvariantError("invalid transition [leader -> pre-candidate]")
        # Thesis §9.6: a pre-candidate changes neither its term nor its vote.
        self.state = StateRole.PreCandidate
        self.prs.reset_votes()
        self.leader_id = INVALID_ID
        self._info("became pre-candidate", term=self.term)

    def become_leader(self) -> None:
        if self.state == StateRole.Follower:
            raise RaftInvariantError("invalid transition [follower -> leader]")
        self._reset(self.term)
        self.leader_id = self.id
        self.state = StateRole.Leader
        me = self.prs.progress.get(self.id)
        if me is not None:
            me.become_replicate()
            me.recent_active = True
        # Any conf change in the log may be uncommitted: allow no new one until all is applied.
        self.pending_conf_index = self.log.last_index()
        # Paper §8 / thesis §6.4: a no-op entry of the new term lets earlier entries commit.
        self.append_entry([pb.Entry()])
        self._info("became leader", term=self.term, index=self.log.last_index())

    # ---- sending ------------------------------------------------------------------

    def send(self, m: pb.Message) -> None:
        """Queue `m` for the next Ready: every message the core emits leaves here (etcd
        raft.go send). A vote request or response carries the term it names (a pre-vote
        the term it asks for), a proposal keeps its own (0 when local), every other
        message gets our term; an unset sender becomes this node."""
        t = m.msg_type
        if t in _VOTE_TYPES:
            if m.term == 0:
                raise RaftError(f"term should be set when sending {msg_name(t)}")
        elif t != MsgPropose:
            m.term = self.term
        if getattr(m, "from") == 0:
            setattr(m, "from", self.id)
        self.msgs.append(m)

    def maybe_send_append(self, to: int, send_if_empty: bool) -> bool:
        """Send `to` the entries from its next index (or a snapshot if they are compacted)."""
        pr = self.prs.progress.get(to)
        if pr is None or pr.is_paused():
            return False
        if pr.pending_request_snapshot != 0:
            return self._prepare_send_snapshot(to, pr)
        lg = self.log
        u = lg.unstable
        off = u.offset
        ue = u.entries
        last = off + len(ue) - 1
        nxt = pr.next_idx
        prev = nxt - 1
        if prev >= off:
            term = ue[prev - off].term if prev - off < len(ue) else 0
        else:
            if prev < lg.first_index() - 1:
                # The entry before next is compacted away: only a snapshot helps (§7).
                return self._prepare_send_snapshot(to, pr)
            term = lg.term(prev)
        ms = self.max_msg_size
        if nxt > last:
            ents = []
        elif nxt >= off:
            # Hot path: everything to send is in the unstable tail.
            if ms == 0:
                ents = ue[nxt - off : nxt - off + 1]
            else:
                ents = limit_size(ue[nxt - off :], ms)
        else:
            try:
                ents = lg.slice(nxt, last + 1, ms)
            except Compacted:
                return self._prepare_send_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        # Field by field: upb's keyword constructor costs about twice as much (hot path).
        # send() sets the term and the sender.
        m = pb.Message()
        m.msg_type = MsgAppend
        m.to = to
        m.index = prev
        m.log_term = term
        m.commit = lg.committed
        if ents:
            m.entries.extend(ents)
            pr.update_state(ents[-1].index)
        self.send(m)
        return True

    def _prepare_send_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            self._debug("ignore sending snapshot since peer is not recently active", to=to)
            return False
        try:
            snap = self.log.snapshot(pr.pending_request_snapshot, to)
        except SnapshotTemporarilyUnavailable:
            self._debug("failed to send snapshot because snapshot is temporarily unavailable", to=to)
            return False
        if snapshot_is_empty(snap):
            raise RaftError("need non-empty snapshot")
        sindex, sterm = snap.metadata.index, snap.metadata.term
        self._info(
            "sent snapshot", to=to, snapshot_index=sindex, snapshot_term=sterm, first_index=self.log.first_index(), progress=pr
        )
        pr.become_snapshot(sindex)
        m = pb.Message(msg_type=MsgSnapshot, to=to)
        m.snapshot.CopyFrom(snap)
        self.send(m)
        return True

    def send_append(self, to: int) -> None:
        self.maybe_send_append(to, True)

    def bcast_append(self) -> None:
        """Mark every follower for an append; flush_appends() sends them (one batch each)."""
        self._bcast_pending = True

    def flush_appends(self) -> None:
        if not self._bcast_pending:
            return
        self._bcast_pending = False
        if self.state != StateRole.Leader:
            return
        last = self.log.last_index()
        for pid, pr in self.prs.progress.items():
            if pid != self.id:
                if self.maybe_send_append(pid, True):
                    # Size-capped batches: keep sending while the window is open and entries remain.
                    while pr.next_idx <= last and self.maybe_send_append(pid, False):
                        pass

    def send_heartbeat(self, to: int, pr: Progress) -> None:
        # Paper §5.3 / raft-rs: a follower may not have the leader's whole log, so only
        # commit what it provably matches.
        m = pb.Message()
        m.msg_type = MsgHeartbeat
        m.to = to
        m.commit = min(pr.matched, self.log.committed)
        self.send(m)

    def should_bcast_commit(self) -> bool:
        """Tell followers a new commit index at once, unless skip_bcast_commit is set
        (the next append or heartbeat carries it). A pending conf change is always
        broadcast (raft-rs), so the whole cluster moves to the new config promptly."""
        return not self.skip_bcast_commit or self.pending_conf_index > self.log.applied

    def bcast_heartbeat(self) -> None:
        for pid, pr in self.prs.progress.items():
            if pid != self.id:
                self.send_heartbeat(pid, pr)

    def send_timeout_now(self, to: int) -> None:
        self.send(pb.Message(msg_type=MsgTimeoutNow, to=to))

    # ---- leader bookkeeping ----------------------------------------------------------

    def maybe_commit(self) -> bool:
        return self.log.maybe_commit(self.prs.committed(), self.term)

    def append_entry(self, ents: list[pb.Entry]) -> None:
        li = self.log.last_index()
        term = self.term
        for i, e in enumerate(ents):
            e.term = term
            e.index = li + 1 + i
        self.log.append(ents)
        # The leader's own match advances only once the host persisted the entries (on_persist).

    def on_persist_entries(self, index: int, term: int) -> None:
        """The host persisted entries up to (index, term)."""
        if not self.log.stable_entries(index, term):
            return
        if self.state == StateRole.Leader:
            pr = self.prs.progress.get(self.id)
            if pr is not None and pr.maybe_update(self.log.persisted):
                if self.maybe_commit() and self.should_bcast_commit():
                    self.bcast_append()

    def on_persist_snap(self, index: int) -> None:
        self.log.stable_snap(index)
        if index > self.log.applied:
            self.log.applied = index
            if self.log.applying < index:
                self.log.applying = index

    def commit_apply(self, applied: int) -> None:
        """The host applied entries up to `applied` (advance_apply_to)."""
        old_applied = self.log.applied
        self.log.applied_to(applied)
        # Thesis §4.3 / raft-rs auto-leave: once the joint config is applied, the leader
        # proposes the empty ConfChangeV2 that leaves it.
        if (
            self.prs.conf.auto_leave
            and old_applied <= self.pending_conf_index <= applied
            and self.state == StateRole.Leader
        ):
            e = pb.Entry(entry_type=pb.EntryConfChangeV2, data=b"")
            self.append_entry([e])
            self.pending_conf_index = self.log.last_index()
            self.bcast_append()
            self._info("initiating automatic transition out of joint configuration", index=self.pending_conf_index)

    def abort_leader_transfer(self) -> None:
        self.lead_transferee = INVALID_ID

    def has_unapplied_conf_changes(self) -> bool:
        return self._has_conf_change_in(self.log.applied + 1, self.log.committed + 1)

    def _has_conf_change_in(self, lo: int, hi: int) -> bool:
        """Whether the log's entries [lo, hi) hold a conf change (compacted ones count as none)."""
        try:
            ents = self.log.slice(max(lo, self.log.first_index()), hi)
        except RaftError:
            return False
        return any(e.entry_type != pb.EntryNormal for e in ents)

    # ---- ticks --------------------------------------------------------------------

    def tick(self) -> None:
        if self.lost_state:
            self._lost_state_tick()
        if self.state == StateRole.Leader:
            self.tick_heartbeat()
        else:
            self.tick_election()

    def tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable and self.past_election_timeout():
            self.election_elapsed = 0
            self.step(pb.Message(msg_type=MsgHup, **{"from": self.id}))

    def tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.election_timeout:
            self.election_elapsed = 0
            if self.check_quorum:
                self.step(pb.Message(msg_type=MsgCheckQuorum, **{"from": self.id}))
            # Thesis §3.10: a transfer that did not finish within an election timeout is aborted.
            if self.state == StateRole.Leader and self.lead_transferee != INVALID_ID:
                self._info("abort leader transfer, timed out", transferee=self.lead_transferee)
                self.abort_leader_transfer()
        if self.state != StateRole.Leader:
            return
        if self.heartbeat_elapsed >= self.heartbeat_timeout:
            self.heartbeat_elapsed = 0
            self.step(pb.Message(msg_type=MsgBeat, **{"from": self.id}))

    # ---- elections ----------------------------------------------------------------

    def hup(self, transfer_leader: bool) -> None:
        if self.state == StateRole.Leader:
            self._debug("ignoring MsgHup because already leader")
            return
        if not self.promotable:
            self._warn("is unpromotable and can not campaign", term=self.term)
            return
        # Thesis §4.1: a node must not campaign with a committed but unapplied conf change.
        if self.has_unapplied_conf_changes():
            self._warn(
                "cannot campaign since there are still pending configuration changes to apply",
                term=self.term,
                applied=self.log.applied,
                committed=self.log.committed,
            )
            return
        if self.lost_state and not self._may_campaign_after_loss():
            return
        self._info("starting a new election", term=self.term)
        if transfer_leader:
            self.campaign(CAMPAIGN_TRANSFER)
        elif self.pre_vote:
            self.campaign(CAMPAIGN_PRE_ELECTION)
        else:
            self.campaign(CAMPAIGN_ELECTION)

    def campaign(self, campaign_type: bytes) -> None:
        if campaign_type == CAMPAIGN_PRE_ELECTION:
            self.become_pre_candidate()
            vote_msg = MsgRequestPreVote
            # Pre-vote asks for the next term without moving to it (thesis §9.6).
            term = self.term + 1
        else:
            self.become_candidate()
            vote_msg = MsgRequestVote
            term = self.term
        if self.poll(self.id, vote_msg, True) == VoteResult.Won:
            # Single-voter configuration: we won at once.
            if campaign_type == CAMPAIGN_PRE_ELECTION:
                self.campaign(CAMPAIGN_ELECTION)
            else:
                self.become_leader()
            return
        commit, commit_term = self.log.commit_info()
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        for pid in sorted(self.prs.conf.voter_ids()):
            if pid == self.id:
                continue
            self._info(
                "sent vote request",
                msg=msg_name(vote_msg),
                to=pid,
                term=term,
                log_term=last_term,
                index=last_index,
            )
            m = pb.Message(
                msg_type=vote_msg,
                to=pid,
                term=term,
                index=last_index,
                log_term=last_term,
                commit=commit,
                commit_term=commit_term,
            )
            if campaign_type == CAMPAIGN_TRANSFER:
                m.context = campaign_type
            self.send(m)

    def poll(self, pid: int, msg_type: int, granted: bool) -> VoteResult:
        self.prs.record_vote(pid, granted)
        g, r, result = self.prs.tally_votes()
        self._info(
            "received votes",
            msg=msg_name(msg_type),
            voter=pid,
            granted=granted,
            term=self.term,
            approvals=g,
            rejections=r,
        )
        return result

    # ---- step ---------------------------------------------------------------------

    def step(self, m: pb.Message) -> None:
        """Process one message (local or from a peer); raft-rs's Raft::step."""
        fault = message_fault(m)
        if fault is not None:
            self._drop_message(m, fault)
            return
        t = m.msg_type
        mt = m.term
        if self.withholding_votes and mt:
            self._note_term_while_withholding(m)
        if self.lost_state and t in (MsgAppend, MsgHeartbeat) and mt >= self.term:
            m = self._lost_state_commit_guard(m)
        if mt == self.term or mt == 0:
            pass  # the current term (the common case), or a local message
        elif mt > self.term:
            if t == MsgRequestVote or t == MsgRequestPreVote:
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self.check_quorum and self.leader_id != INVALID_ID and self.election_elapsed < self.election_timeout
                )
                if not force and in_lease:
                    # Thesis §4.2.3: while we hear from a leader, ignore disruptive vote requests.
                    self._info(
                        "ignored vote request, lease is not expired",
                        msg=msg_name(t),
                        **{"from": getattr(m, "from")},
                        term=self.term,
                        msg_term=m.term,
                        remaining_ticks=self.election_timeout - self.election_elapsed,
                    )
                    return
            if t == MsgRequestPreVote or (t == MsgRequestPreVoteResponse and not m.reject):
                # A pre-vote never moves terms; a granted pre-vote response carries the
                # future term and we only move there when we win (thesis §9.6).
                pass
            else:
                self._info(
                    "received a message with higher term",
                    msg=msg_name(t),
                    **{"from": getattr(m, "from")},
                    term=self.term,
                    msg_term=m.term,
                )
                if t in (MsgAppend, MsgHeartbeat, MsgSnapshot):
                    self.become_follower(m.term, getattr(m, "from"))
                else:
                    self.become_follower(m.term, INVALID_ID)
        else:  # a message from an older term
            frm = getattr(m, "from")
            if (self.check_quorum or self.pre_vote) and t in (MsgHeartbeat, MsgAppend):
                # A stale leader (e.g. after a partition) learns our term from this and
                # steps down; without it, pre-vote/check-quorum could leave it stuck.
                self.send(pb.Message(msg_type=MsgAppendResponse, to=frm))
            elif t == MsgRequestPreVote:
                self._info("rejected pre-vote from lower term", **{"from": frm}, term=self.term, msg_term=m.term)
                self.send(pb.Message(msg_type=MsgRequestPreVoteResponse, to=frm, term=self.term, reject=True))
            else:
                self._debug("ignored a message with lower term", msg=msg_name(t), **{"from": frm}, msg_term=m.term)
            return

        if t == MsgHup:
            self.hup(False)
        elif t == MsgRequestVote or t == MsgRequestPreVote:
            self._handle_vote_request(m)
        elif self.state == StateRole.Leader:
            self.step_leader(m)
        elif self.state == StateRole.Follower:
            self.step_follower(m)
        else:
            self.step_candidate(m)

    def _drop_message(self, m: pb.Message, why: str) -> None:
        """Drop a message the core cannot take; warn on the 1st, 2nd, 4th, 8th... drop
        (a count, since the core has no clock) so a flood cannot flood the log."""
        self.dropped_messages += 1
        n = self.dropped_messages
        if n & (n - 1) == 0:
            self._warn("dropped a malformed message", reason=why, msg=msg_name(m.msg_type),
                       **{"from": getattr(m, "from")}, term=m.term, dropped_so_far=n)

    def _conflicting_leader(self, m: pb.Message, leader: int) -> None:
        """A second node speaks as leader of our term (paper §5.2 allows one). Either
        election safety broke (e.g. a node that lost its vote voted twice) or the message
        is forged or corrupt: we cannot tell which from here, so we neither follow it nor
        stop on one unauthenticated message (issue 13: no single message may take a node
        out); we refuse it and log an error (1st, 2nd, 4th... time), counting it in
        `conflicting_leaders` for the host and the simulations to check."""
        self.conflicting_leaders += 1
        n = self.conflicting_leaders
        if n & (n - 1) == 0:
            self.logger.error("two leaders in one term: %d speaks as leader of term %d, which %d leads; "
                              "message refused id=%d msg=%s seen=%d", getattr(m, "from"), m.term, leader,
                              self.id, msg_name(m.msg_type), n)

    def _handle_vote_request(self, m: pb.Message) -> None:
        t = m.msg_type
        frm = getattr(m, "from")
        # Paper §5.2/§5.4: one vote per term, only for a log at least as up to date as ours.
        can_vote = (
            self.vote == frm
            or (self.vote == INVALID_ID and self.leader_id == INVALID_ID)
            or (t == MsgRequestPreVote and m.term > self.term)
        )
        if can_vote and self.lost_state and self._vote_withheld(m):
            can_vote = False
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._info(
                "cast vote",
                msg=msg_name(t),
                candidate=frm,
                term=self.term,
                msg_term=m.term,
                log_term=m.log_term,
                index=m.index,
            )
            self.send(pb.Message(msg_type=_vote_resp_type(t), to=frm, term=m.term, reject=False))
            if t == MsgRequestVote:
                self.election_elapsed = 0
                self.vote = frm
        else:
            self._info(
                "rejected vote",
                msg=msg_name(t),
                candidate=frm,
                term=self.term,
                msg_term=m.term,
                vote=self.vote,
                log_term=m.log_term,
                index=m.index,
                last_term=self.log.last_term(),
                last_index=self.log.last_index(),
            )
            if self.term == 0:
                # Only a node that started from an empty store (and lost state, or has no
                # log yet) can refuse at term 0; a response needs a term: stay silent.
                return
            commit, commit_term = self.log.commit_info()
            self.send(
                pb.Message(
                    msg_type=_vote_resp_type(t),
                    to=frm,
                    term=self.term,
                    reject=True,
                    commit=commit,
                    commit_term=commit_term,
                )
            )
            self.maybe_commit_by_vote(m)

    def maybe_commit_by_vote(self, m: pb.Message) -> None:
        """raft-rs: a peer's (commit, commit_term) lets us commit if our log has that entry (log matching, §5.3)."""
        if m.commit == 0 or m.commit_term == 0:
            return
        if m.commit <= self.log.committed or self.state == StateRole.Leader:
            return
        if m.commit > self.log.last_index():
            return
        last_commit = self.log.committed
        if not self.log.maybe_commit(m.commit, m.commit_term):
            return
        self._info("fast-forwarded commit by vote message", commit=self.log.committed, term=self.term)
        if self.state not in (StateRole.Candidate, StateRole.PreCandidate):
            return
        # A candidate must not win with a committed but unapplied conf change (thesis §4.1):
        # step down, as raft-rs does.
        if self._has_conf_change_in(last_commit + 1, self.log.committed + 1):
            self.become_follower(self.term, INVALID_ID)

    # ---- lost state (docs/internals.md, "Lost state") -------------------------------
    #
    # A node started with Config.lost_state may have voted, before the loss, in a term
    # it no longer remembers. It grants no vote or pre-vote and does not campaign (its
    # own vote counts too) until it follows a leader whose election it witnessed (it got
    # that leader's vote request for its term at least 4 election timeouts after the
    # restart, and refused it) and that leader has caught it up; every term it hears
    # meanwhile raises `vote_floor`.
    # Afterwards it votes (and campaigns) only in terms above the floor. A leader elected
    # before the restart is asked to hand over (MsgTransferLeader), so that a witnessed
    # election happens without waiting for the next failure.

    def _note_term_while_withholding(self, m: pb.Message) -> None:
        t = m.msg_type
        frm = getattr(m, "from")
        # A pre-vote request (or a granted pre-vote answer) names the sender's next term;
        # its sender is one below it. Any other message carries its sender's term.
        term = m.term - 1 if t == MsgRequestPreVote or (t == MsgRequestPreVoteResponse and not m.reject) else m.term
        if term > self.vote_floor:
            self.vote_floor = term
        if t == MsgRequestVote and self._may_witness():
            # Not sooner: a candidacy open when we lost our state (we may have voted
            # for it) may still be collecting votes, possibly at a term above this
            # one (soak seed 1669: we resumed under a leader of term 15 and voted
            # again in 16, where our lost vote went to another candidate).
            if m.term > self._witnessed.get(frm, 0):
                self._witnessed[frm] = m.term
        elif t == MsgAppend and m.term >= self.term:
            # The leader's commit index when it first reached us in its term: once our
            # log commits that far, the leader has caught us up (our log matches its).
            if self._lost_target is None or self._lost_target[0] != m.term:
                self._lost_target = (m.term, m.commit)

    def _lost_state_tick(self) -> None:
        self._lost_ticks += 1
        target = self._lost_target
        caught_up = (
            self.withholding_votes
            and self.state == StateRole.Follower
            and self.leader_id != INVALID_ID
            and target is not None
            and target[0] == self.term
            and self.log.committed >= target[1]
        )
        if caught_up and self._witnessed.get(self.leader_id) == self.term:
            self.withholding_votes = False
            self._witnessed.clear()
            self._info(
                "lost state: voting again, only in terms above the vote floor",
                vote_floor=self.vote_floor,
                term=self.term,
                leader=self.leader_id,
                commit=self.log.committed,
                refused=self._withheld,
            )
            self._withheld = 0
            return
        if caught_up and self._may_witness() and self._lost_ticks - self._handover_at >= self.election_timeout:
            self._ask_leader_to_hand_over()
        if self._withheld and self._lost_ticks - self._withheld_logged_at >= self.election_timeout:
            self._log_withheld("votes refused" if self.withholding_votes else "votes refused at or below the vote floor", None)

    def _may_witness(self) -> bool:
        """Long enough after the start that an election seen now began after any
        candidacy open at the loss had ended (WITNESS_AFTER_ELECTION_TIMEOUTS)."""
        return self._lost_ticks >= WITNESS_AFTER_ELECTION_TIMEOUTS * self.election_timeout

    def _lost_state_commit_guard(self, m: pb.Message) -> pb.Message:
        """A heartbeat's commit is min(the leader's match for us, its commit): it trusts
        that we still hold every entry we acknowledged. After a loss we may hold other,
        older entries at those indexes (a lost truncation), so a heartbeat may move our
        commit only as far as an append of the leader's term has matched our log
        (sim seed 2435: a follower committed a stale entry from a heartbeat)."""
        if m.msg_type == MsgAppend:
            if m.index >= self.log.committed and self.log.match_term(m.index, m.log_term):
                end = m.index + len(m.entries)
                if self._verified[0] != m.term or end > self._verified[1]:
                    self._verified = (m.term, end)
            return m
        limit = self._verified[1] if self._verified[0] == m.term else 0
        if m.commit <= max(limit, self.log.committed):
            return m
        c = pb.Message()
        c.CopyFrom(m)
        c.commit = max(limit, self.log.committed)
        return c

    def _ask_leader_to_hand_over(self) -> None:
        """We follow a leader whose election we did not see: it may date from before the
        loss. Ask it to transfer leadership to another voter (as a follower forwards a
        transfer request), one candidate after another, once per election timeout."""
        self._handover_at = self._lost_ticks
        voters = self.prs.conf.voter_ids()
        others = sorted(v for v in voters if v not in (self.id, self.leader_id))
        if self.id not in voters or not others:
            return  # a learner is never asked for a vote; a lone voter has nobody to hand to
        transferee = others[self._handovers % len(others)]
        self._handovers += 1
        self._info("lost state: asking the leader to hand over, to see an election", leader=self.leader_id,
                   to=transferee, term=self.term)
        m = pb.Message(msg_type=MsgTransferLeader, to=self.leader_id)
        setattr(m, "from", transferee)
        self.send(m)

    def _log_withheld(self, what: str, m: pb.Message | None) -> None:
        """Rate-limited: the first refusal, then a summary at most once per election timeout."""
        kv: dict[str, object] = {"term": self.term, "vote_floor": self.vote_floor, "refused": self._withheld}
        if m is not None:
            kv.update(msg=msg_name(m.msg_type), candidate=getattr(m, "from"), msg_term=m.term)
        if self.withholding_votes:
            target = self._lost_target
            kv.update(leader=self.leader_id, commit=self.log.committed, catch_up_to=target[1] if target else None)
        self._warn(f"lost state: {what}", **kv)
        self._withheld_logged_at = self._lost_ticks
        self._withheld = 0

    def _vote_withheld(self, m: pb.Message) -> bool:
        """True if the lost-state rule refuses this vote or pre-vote request. A pre-vote
        binds nothing, but granting it would predict a vote we would refuse."""
        if not (self.withholding_votes or m.term <= self.vote_floor):
            return False
        self._withheld += 1
        if self._lost_ticks - self._withheld_logged_at >= self.election_timeout:
            self._log_withheld("vote withheld", m)
        return True

    def _may_campaign_after_loss(self) -> bool:
        if self.withholding_votes and self.prs.conf.voter_ids() == {self.id}:
            # The only voter: no other candidate can collect a vote of ours, so a vote we
            # forgot cannot be cast twice against anyone; campaign above the floor.
            self.withholding_votes = False
            self._info("lost state: the only voter, voting again above the vote floor", vote_floor=self.vote_floor,
                       term=self.term)
        if self.withholding_votes:
            self._withheld += 1
            if self._lost_ticks - self._withheld_logged_at >= self.election_timeout:
                self._log_withheld("not campaigning (no vote, not even our own)", None)
            return False
        if self.term < self.vote_floor:
            # Our next term must lie above the floor: we may have voted for someone else
            # in any term up to it. Adopting a higher term is always allowed (§5.1).
            self.become_follower(self.vote_floor, INVALID_ID)
        return True

    # ---- leader -------------------------------------------------------------------

    def step_leader(self, m: pb.Message) -> None:
        t = m.msg_type
        if t == MsgBeat:
            self.bcast_heartbeat()
            return
        if t == MsgCheckQuorum:
            if not self.prs.quorum_recently_active(self.id):
                self._warn("stepped down to follower since quorum is not active", term=self.term)
                self.become_follower(self.term, INVALID_ID)
            return
        if t == MsgPropose:
            self._propose(m)
            return

        frm = getattr(m, "from")
        pr = self.prs.progress.get(frm)
        if pr is None:
            self._debug("no progress available", peer=frm)
            return
        if t == MsgAppendResponse:
            self._handle_append_response(m, pr)
        elif t == MsgHeartbeatResponse:
            pr.recent_active = True
            pr.resume()
            if pr.state == ProgressState.Replicate and pr.ins.full():
                pr.ins.free_first_one()
            if pr.matched < self.log.last_index() or pr.pending_request_snapshot != 0:
                self.send_append(frm)
        elif t == MsgSnapStatus:
            if pr.state != ProgressState.Snapshot:
                return
            if m.reject:
                pr.snapshot_failure()
                pr.become_probe()
                self._info("snapshot failed, resumed sending replication messages", to=frm, progress=pr)
            else:
                pr.become_probe()
                self._info("snapshot succeeded, resumed sending replication messages", to=frm, progress=pr)
            # Wait for the append response (or a heartbeat) before the next append.
            pr.pause()
            pr.pending_request_snapshot = 0
        elif t == MsgUnreachable:
            # The transport failed: stop streaming and probe instead.
            if pr.state == ProgressState.Replicate:
                pr.become_probe()
            self._debug("failed to send message, peer is unreachable", to=frm)
        elif t == MsgTransferLeader:
            self._handle_transfer_leader(m, pr)
        elif t == MsgAppend or t == MsgHeartbeat or t == MsgSnapshot:
            self._conflicting_leader(m, self.id)

    def _check_proposal(self) -> None:
        """ProposalDropped unless this leader may append proposals now: the rule of both
        MsgPropose and propose_normal (etcd stepLeader's order)."""
        if self.id not in self.prs.progress:
            # Removed from the config (thesis §4.2.2): do not accept proposals.
            raise ProposalDropped("this node is not in the configuration")
        if self.lead_transferee != INVALID_ID:
            self._debug("proposal dropped, leader transfer in progress", transferee=self.lead_transferee)
            raise ProposalDropped(f"leader transfer to {self.lead_transferee} in progress")

    def propose_normal(self, data: bytes, context: bytes = b"") -> None:
        """The leader's own normal entry: RawNode.propose's hot path, a MsgPropose of one
        normal entry without building the message (the caller checked we lead)."""
        self._check_proposal()
        lg = self.log
        u = lg.unstable
        if u.entries:
            index = u.offset + len(u.entries)
            if context:
                u.entries.append(pb.Entry(data=data, context=context, term=self.term, index=index))
            else:
                u.entries.append(pb.Entry(data=data, term=self.term, index=index))
        else:
            index = lg.last_index() + 1
            lg.append([pb.Entry(data=data, context=context, term=self.term, index=index)])
        self.bcast_append()

    def _propose(self, m: pb.Message) -> None:
        ents = list(m.entries)
        if not ents:
            raise RaftError("stepped empty MsgPropose")
        self._check_proposal()
        for i, e in enumerate(ents):
            if e.entry_type == pb.EntryConfChange:
                raise ProposalDropped("ConfChange v1 is not supported, use ConfChangeV2")
            if e.entry_type == pb.EntryConfChangeV2:
                cc = _parse_conf_change(e.data)
                already_pending = self.pending_conf_index > self.log.applied
                already_joint = self.prs.conf.is_joint()
                wants_leave = confchange.leave_joint(cc)
                refused = None
                if already_pending:
                    refused = f"possible unapplied conf change at index {self.pending_conf_index} (applied to {self.log.applied})"
                elif already_joint and not wants_leave:
                    refused = "must transition out of joint config first"
                elif not already_joint and wants_leave:
                    refused = "not in joint state; refusing empty conf change"
                if refused:
                    self._info("ignoring conf change", reason=refused)
                    # Thesis §4.1: one change at a time; the slot becomes an empty entry.
                    ents[i] = pb.Entry(entry_type=pb.EntryNormal)
                else:
                    self.pending_conf_index = self.log.last_index() + i + 1
        self.append_entry(ents)
        self.bcast_append()

    def _handle_append_response(self, m: pb.Message, pr: Progress) -> None:
        frm = getattr(m, "from")
        pr.recent_active = True
        if m.reject:
            # raft-rs fast back-off: the follower told us its term at reject_hint; skip every
            # index of ours whose term is larger (thesis §5.3 optimisation).
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if m.index <= pr.matched and m.request_snapshot == 0 and pr.state != ProgressState.Snapshot:
                # Below what it acknowledged in this term: the follower lost entries (a wiped
                # data dir, a cut WAL tail) and would otherwise be ignored as stale forever
                # (issue 13 #4). Probe from its hint; a stale duplicate costs one probe.
                self._info("follower's log ends below its match, probing from its hint", **{"from": frm},
                           index=m.index, reject_hint=m.reject_hint, matched=pr.matched)
                pr.lost_log(min(m.index, next_probe + 1))
                self.send_append(frm)
                return
            if pr.maybe_decr_to(m.index, next_probe, m.request_snapshot):
                self._debug(
                    "received append rejection",
                    **{"from": frm},
                    index=m.index,
                    reject_hint=m.reject_hint,
                    log_term=m.log_term,
                    progress=pr,
                )
                if pr.state == ProgressState.Replicate:
                    pr.become_probe()
                self.send_append(frm)
            return

        if m.index > self.log.last_index():
            # An acknowledgement of entries we never had (a confused or stale peer): ignore.
            self._warn("append response beyond last index", **{"from": frm}, index=m.index, last_index=self.log.last_index())
            return
        old_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.Probe:
            pr.become_replicate()
        elif pr.state == ProgressState.Snapshot:
            if pr.matched + 1 >= self.log.first_index() or pr.is_snapshot_caught_up():
                self._debug("snapshot caught up, resumed replication", to=frm, progress=pr)
                pr.become_probe()
                pr.become_replicate()
        else:
            pr.ins.free_to(m.index)

        if self.maybe_commit():
            if self.should_bcast_commit():
                self.bcast_append()
        elif old_paused and not self._bcast_pending:
            self.send_append(frm)
        # The window may have opened for several batches at once. A broadcast due at this
        # Ready (flush_appends) already refills it; sending here too would hand frm the
        # same append twice (etcd/raft-rs broadcast at once, so they send it once).
        while not self._bcast_pending and self.maybe_send_append(frm, False):
            pass
        if frm == self.lead_transferee and pr.matched == self.log.last_index():
            self._info("sent MsgTimeoutNow after received MsgAppResp", to=frm)
            self.send_timeout_now(frm)

    def _handle_transfer_leader(self, m: pb.Message, pr: Progress) -> None:
        transferee = getattr(m, "from")
        if pr.is_learner:
            self._debug("ignored transferring leadership to a learner", to=transferee)
            return
        last = self.lead_transferee
        if last != INVALID_ID:
            if last == transferee:
                self._info("transfer leadership already in progress", to=transferee)
                return
            self.abort_leader_transfer()
            self._info("abort previous transferring leadership", previous=last)
        if transferee == self.id:
            self._debug("already leader, ignored transferring leadership to self")
            return
        self._info("starts to transfer leadership", to=transferee, term=self.term)
        # Thesis §3.10: the transfer must finish within one election timeout.
        self.election_elapsed = 0
        self.lead_transferee = transferee
        if pr.matched == self.log.last_index():
            self.send_timeout_now(transferee)
            self._info("sends MsgTimeoutNow immediately as transferee already has up-to-date log", to=transferee)
        else:
            self.send_append(transferee)

    # ---- candidate ----------------------------------------------------------------

    def step_candidate(self, m: pb.Message) -> None:
        t = m.msg_type
        frm = getattr(m, "from")
        if t == MsgPropose:
            self._debug("no leader, dropping proposal", term=self.term)
            raise ProposalDropped("no leader")
        if t == MsgAppend:
            self.become_follower(m.term, frm)
            self.handle_append_entries(m)
        elif t == MsgHeartbeat:
            self.become_follower(m.term, frm)
            self.handle_heartbeat(m)
        elif t == MsgSnapshot:
            self.become_follower(m.term, frm)
            self.handle_snapshot(m)
        elif (self.state == StateRole.PreCandidate and t == MsgRequestPreVoteResponse) or (
            self.state == StateRole.Candidate and t == MsgRequestVoteResponse
        ):
            # Only responses to this candidacy count (a candidate may still get stale pre-vote answers).
            result = self.poll(frm, t, not m.reject)
            if result == VoteResult.Won:
                if self.state == StateRole.PreCandidate:
                    self.campaign(CAMPAIGN_ELECTION)
                else:
                    self.become_leader()
                    self.bcast_append()
            elif result == VoteResult.Lost:
                # Pre-vote may lose against a peer at our own term: go back to its term as follower.
                self.become_follower(self.term, INVALID_ID)
            if m.reject:
                self.maybe_commit_by_vote(m)
        elif t == MsgTimeoutNow:
            self._debug("ignored MsgTimeoutNow", term=self.term, state=self.state.name, **{"from": frm})

    # ---- follower -----------------------------------------------------------------

    def step_follower(self, m: pb.Message) -> None:
        t = m.msg_type
        frm = getattr(m, "from")
        if t == MsgPropose:
            if self.leader_id == INVALID_ID:
                self._debug("no leader, dropping proposal", term=self.term)
                raise ProposalDropped("no leader")
            m.to = self.leader_id
            self.send(m)
        elif t == MsgAppend or t == MsgHeartbeat or t == MsgSnapshot:
            if self.leader_id != frm and self.leader_id != INVALID_ID:
                self._conflicting_leader(m, self.leader_id)
                return
            self.election_elapsed = 0
            self.leader_id = frm
            if t == MsgAppend:
                self.handle_append_entries(m)
            elif t == MsgHeartbeat:
                self.handle_heartbeat(m)
            else:
                self.handle_snapshot(m)
        elif t == MsgTransferLeader:
            if self.leader_id == INVALID_ID:
                self._info("no leader, dropping leader transfer", term=self.term)
                return
            m.to = self.leader_id
            self.send(m)
        elif t == MsgTimeoutNow:
            if self.promotable:
                self._info("received MsgTimeoutNow, starts an election to get leadership", **{"from": frm}, term=self.term)
                # Leadership transfer (thesis §3.10): campaign at once, bypassing lease checks.
                self.hup(True)
            else:
                self._info("received MsgTimeoutNow but is not promotable", **{"from": frm})

    def _send_request_snapshot(self) -> None:
        m = pb.Message(msg_type=MsgAppendResponse, to=self.leader_id)
        m.index = self.log.committed
        m.reject = True
        m.reject_hint = self.log.last_index()
        m.log_term = self.log.term(m.reject_hint)
        m.request_snapshot = self.pending_request_snapshot
        self.send(m)

    def request_snapshot(self, request_index: int) -> None:
        if self.state == StateRole.Leader:
            raise RaftError("can not request snapshot on leader")
        if self.leader_id == INVALID_ID:
            raise RaftError("drop request snapshot because of no leader")
        if self.pending_request_snapshot != 0:
            raise RaftError("there is a pending snapshot request")
        self.pending_request_snapshot = request_index
        self._send_request_snapshot()

    def handle_append_entries(self, m: pb.Message) -> None:
        if self.pending_request_snapshot != 0:
            self._send_request_snapshot()
            return
        frm = getattr(m, "from")
        committed = self.log.committed
        if m.index < committed:
            # Already committed here: tell the leader where we are so it skips ahead.
            self.send(pb.Message(msg_type=MsgAppendResponse, to=frm, index=committed, commit=committed))
            return
        res = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if res is not None:
            r = pb.Message()
            r.msg_type = MsgAppendResponse
            r.to = frm
            r.index = res[1]
            r.commit = self.log.committed
            self.send(r)
            return
        # Paper §5.3 consistency check failed. Tell the leader the largest index at or
        # below the probe whose term is <= the probe's term, and that term (raft-rs hint).
        hint_index = min(m.index, self.log.last_index())
        hint_index, hint_term = self.log.find_conflict_by_term(hint_index, m.log_term)
        if hint_term is None:
            hint_term = 0
        self._debug(
            "rejected msgApp",
            log_term=self.log.term(m.index),
            index=m.index,
            msg_log_term=m.log_term,
            reject_hint=hint_index,
            hint_term=hint_term,
            **{"from": frm},
        )
        r = pb.Message(
            msg_type=MsgAppendResponse,
            to=frm,
            index=m.index,
            reject=True,
            reject_hint=hint_index,
            log_term=hint_term,
            commit=self.log.committed,
        )
        self.send(r)

    def handle_heartbeat(self, m: pb.Message) -> None:
        lost = m.commit > self.log.committed and m.commit > self.log.last_index()
        if m.commit > self.log.committed and not lost:
            self.log.commit_to(m.commit)
        if self.pending_request_snapshot != 0:
            self._send_request_snapshot()
            return
        if lost:
            self._report_lost_log(m)
        # raft-rs reports our commit index on the response.
        r = pb.Message()
        r.msg_type = MsgHeartbeatResponse
        r.to = getattr(m, "from")
        r.commit = self.log.committed
        if m.context:
            r.context = m.context
        self.send(r)

    def _report_lost_log(self, m: pb.Message) -> None:
        """A heartbeat commits min(match, commit) of the leader, so a commit beyond our last
        index means we lost entries we acknowledged. raft-rs and etcd followers panic here;
        we tell the leader where our log ends instead, as the rejection of an append at
        that index (raft-rs field meanings: index rejected, reject_hint and log_term our
        last entry), and it re-sends from there (or a snapshot)."""
        last = self.log.last_index()
        if self._lost_log_reported != (self.term, getattr(m, "from")):
            self._lost_log_reported = (self.term, getattr(m, "from"))
            self._warn("heartbeat commit beyond last index: this node lost log entries it had acknowledged, "
                       "asking the leader to resend", commit=m.commit, last_index=last)
        else:
            self._debug("heartbeat commit beyond last index", commit=m.commit, last_index=last)
        r = pb.Message()
        r.msg_type = MsgAppendResponse
        r.to = getattr(m, "from")
        r.index = m.commit
        r.reject = True
        r.reject_hint = last
        r.log_term = self.log.term(last)
        r.commit = self.log.committed
        self.send(r)

    def handle_snapshot(self, m: pb.Message) -> None:
        frm = getattr(m, "from")
        if not m.HasField("snapshot") or snapshot_is_empty(m.snapshot):
            self._warn("ignored empty snapshot", **{"from": frm})
            return
        sindex, sterm = m.snapshot.metadata.index, m.snapshot.metadata.term
        if self.restore(m.snapshot):
            self._info("restored snapshot", snapshot_index=sindex, snapshot_term=sterm, commit=self.log.committed)
            index = self.log.last_index()
        else:
            self._info("ignored snapshot", snapshot_index=sindex, snapshot_term=sterm, commit=self.log.committed)
            index = self.log.committed
        self.send(pb.Message(msg_type=MsgAppendResponse, to=frm, index=index))

    def restore(self, snap: pb.Snapshot) -> bool:
        """Install a leader's snapshot (paper §7); False if it is stale or already covered."""
        meta = snap.metadata
        if meta.index < self.log.committed:
            return False
        if self.log.applying > self.log.applied:
            # Committed entries are still with the applier: restoring now would switch
            # the config under conf changes it has yet to apply (apply_conf_change would
            # then compute them on the snapshot's config). The leader retries later.
            self._info("ignored snapshot while committed entries are being applied",
                       applying=self.log.applying, applied=self.log.applied, snapshot_index=meta.index)
            return False
        if self.state != StateRole.Follower:
            # Only a follower installs a snapshot: step() makes a candidate follow first and a
            # leader never takes one of its own term (raft-rs warns and bumps its term here).
            raise RaftInvariantError(f"a {self.state.name} attempted to restore a snapshot")
        cs = meta.conf_state
        if self.id not in cs.voters and self.id not in cs.learners and self.id not in cs.voters_outgoing:
            self._warn("attempted to restore snapshot but it is not in the ConfState", conf_state=list(cs.voters))
            return False
        try:
            # A ConfState no configuration change can produce (no voters, a voter that is
            # also a learner...) is refused before anything is installed: installed, it
            # would be persisted and the node could never start from it again.
            if not cs.voters:
                raise ConfChangeError("no voters")
            scratch = ProgressTracker(self.prs.max_inflight)
            confchange.restore(scratch, meta.index, cs)
            got = scratch.conf.to_conf_state()
            if _conf_key(got) != _conf_key(cs):
                # raft-rs: "invalid restore" (a node listed as voter and learner...)
                raise ConfChangeError(f"it restores as {_conf_key(got)}")
        except ConfChangeError as e:
            self._warn("ignored snapshot with an impossible ConfState", reason=e, snapshot_index=meta.index)
            return False
        if self.pending_request_snapshot == 0 and self.log.match_term(meta.index, meta.term):
            # Our log already has the snapshot's last entry: just move commit (log matching).
            self._info("fast-forwarded commit to snapshot", commit=self.log.committed, snapshot_index=meta.index)
            self.log.commit_to(meta.index)
            return False
        snap_copy = pb.Snapshot()
        snap_copy.CopyFrom(snap)
        self.log.restore(snap_copy)
        confchange.restore(self.prs, self.log.last_index(), cs)
        self._post_conf_change()
        self.pending_request_snapshot = 0
        return True

    # ---- membership ---------------------------------------------------------------

    def apply_conf_change(self, cc: pb.ConfChangeV2) -> pb.ConfState:
        """Apply a committed ConfChangeV2 (thesis §4.3), as the host applies its entry."""
        try:
            cfg, prs = confchange.apply_change(self.prs, self.log.last_index(), cc)
        except ConfChangeError:
            raise
        self.prs.apply_conf(cfg, prs)
        return self._post_conf_change()

    def _post_conf_change(self) -> pb.ConfState:
        cs = self.prs.conf.to_conf_state()
        is_voter = self.id in self.prs.conf.incoming or self.id in self.prs.conf.outgoing
        self.promotable = is_voter
        if not is_voter and self.state == StateRole.Leader:
            if self.config.step_down_on_removal:
                # Thesis §4.2.2: a leader that is no longer part of the config steps down.
                self._info("stepping down, removed from the configuration", term=self.term)
                self.become_follower(self.term, INVALID_ID)
            return cs
        if self.state != StateRole.Leader or not cs.voters:
            return cs
        if self.maybe_commit():
            self.bcast_append()
        else:
            for pid in self.prs.progress:
                if pid != self.id:
                    self.maybe_send_append(pid, False)
        if self.lead_transferee != INVALID_ID and self.lead_transferee not in self.prs.conf.voter_ids():
            self.abort_leader_transfer()
        return cs
