"""What the leader knows about each peer: match/next indexes, replication state and the
in-flight window, plus the tracker holding the configuration and the votes.

States (etcd/raft-rs): Probe sends one append per heartbeat until the follower's log
position is found; Replicate streams appends optimistically, bounded by `Inflights`;
Snapshot waits for a snapshot to be applied. Invariant: matched < next_idx.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

from cita_raft_pb import eraftpb_pb2 as pb

from . import quorum
from .errors import RaftInvariantError
from .quorum import VoteResult


class ProgressState(IntEnum):
    Probe = 0
    Replicate = 1
    Snapshot = 2


class Inflights:
    """Last indexes of the appends in flight to one peer, oldest first, at most `cap`."""

    __slots__ = ("cap", "_q")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._q: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def full(self) -> bool:
        return len(self._q) >= self.cap

    def add(self, last_index: int) -> None:
        if len(self._q) >= self.cap:
            raise RaftInvariantError("cannot add into a full inflights window")
        self._q.append(last_index)

    def free_to(self, index: int) -> None:
        """Everything up to `index` was acknowledged."""
        q = self._q
        while q and q[0] <= index:
            q.popleft()

    def free_first_one(self) -> None:
        if self._q:
            self._q.popleft()

    def reset(self) -> None:
        self._q.clear()


class Progress:
    __slots__ = (
        "matched",
        "next_idx",
        "state",
        "paused",
        "pending_snapshot",
        "pending_request_snapshot",
        "recent_active",
        "ins",
        "is_learner",
    )

    def __init__(self, next_idx: int, ins_size: int) -> None:
        self.ins = Inflights(ins_size)
        self.is_learner = False
        self.reset(next_idx)

    def __repr__(self) -> str:
        return f"Progress(match={self.matched} next={self.next_idx} state={self.state.name} paused={self.paused})"

    def _reset_state(self, state: ProgressState) -> None:
        self.paused = False
        self.pending_snapshot = 0
        self.state = state
        self.ins.reset()

    def reset(self, next_idx: int) -> None:
        self.matched = 0
        self.next_idx = next_idx
        self.state = ProgressState.Probe
        # In Probe: one append was sent and we wait for its answer (or a heartbeat response).
        self.paused = False
        self.pending_snapshot = 0
        self.pending_request_snapshot = 0
        self.recent_active = False
        self.ins.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.Snapshot:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.Probe)
            self.next_idx = max(self.matched + 1, pending + 1)
        else:
            self._reset_state(ProgressState.Probe)
            self.next_idx = self.matched + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.Replicate)
        self.next_idx = self.matched + 1

    def become_snapshot(self, snapshot_idx: int) -> None:
        self._reset_state(ProgressState.Snapshot)
        self.pending_snapshot = snapshot_idx
        self.pending_request_snapshot = 0

    def snapshot_failure(self) -> None:
        self.pending_snapshot = 0

    def is_snapshot_caught_up(self) -> bool:
        return self.state == ProgressState.Snapshot and self.matched >= self.pending_snapshot

    def maybe_update(self, n: int) -> bool:
        """An append up to `n` was acknowledged; False if it was stale."""
        updated = False
        if self.matched < n:
            self.matched = n
            updated = True
            self.paused = False
        if self.next_idx < n + 1:
            self.next_idx = n + 1
        return updated

    def optimistic_update(self, n: int) -> None:
        self.next_idx = n + 1

    def maybe_decr_to(self, rejected: int, match_hint: int, request_snapshot: int) -> bool:
        """An append at `rejected` was refused; move next_idx back. False if the rejection is stale."""
        if self.state == ProgressState.Replicate:
            if rejected < self.matched or (rejected == self.matched and request_snapshot == 0):
                return False
            if request_snapshot == 0:
                self.next_idx = self.matched + 1
            else:
                self.pending_request_snapshot = request_snapshot
            return True
        if (self.next_idx == 0 or self.next_idx - 1 != rejected) and request_snapshot == 0:
            return False
        if request_snapshot == 0:
            self.next_idx = max(min(rejected, match_hint + 1), self.matched + 1)
        elif self.pending_request_snapshot == 0:
            self.pending_request_snapshot = request_snapshot
        self.paused = False
        return True

    def lost_log(self, next_idx: int) -> None:
        """The follower rejected an append at or below `matched`: its log no longer holds
        entries it acknowledged (a wiped or cut store; or the rejection is a stale
        duplicate). Forget the match, which only an acknowledgement may establish again,
        and probe from `next_idx`. Lowering `matched` is safe: the leader never lowers its
        commit index, and an underestimate only delays counting this follower."""
        self.matched = 0
        self._reset_state(ProgressState.Probe)
        self.next_idx = max(next_idx, 1)

    def is_paused(self) -> bool:
        s = self.state
        if s == ProgressState.Probe:
            return self.paused
        if s == ProgressState.Replicate:
            return self.ins.full()
        return True

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def update_state(self, last: int) -> None:
        """An append ending at `last` was just sent."""
        if self.state == ProgressState.Replicate:
            self.optimistic_update(last)
            self.ins.add(last)
        elif self.state == ProgressState.Probe:
            self.pause()
        else:
            raise RaftInvariantError(f"sending append in unhandled state {self.state.name}")


@dataclass
class Configuration:
    """Voters (incoming, and outgoing while joint) and learners; thesis §4.3."""

    incoming: set[int] = field(default_factory=set)
    outgoing: set[int] = field(default_factory=set)
    learners: set[int] = field(default_factory=set)
    # Learners to add once the joint config is left (they are still voters in outgoing).
    learners_next: set[int] = field(default_factory=set)
    auto_leave: bool = False

    def copy(self) -> Configuration:
        return Configuration(
            set(self.incoming), set(self.outgoing), set(self.learners), set(self.learners_next), self.auto_leave
        )

    def is_joint(self) -> bool:
        return bool(self.outgoing)

    def voter_ids(self) -> set[int]:
        return self.incoming | self.outgoing

    def to_conf_state(self) -> pb.ConfState:
        return pb.ConfState(
            voters=sorted(self.incoming),
            voters_outgoing=sorted(self.outgoing),
            learners=sorted(self.learners),
            learners_next=sorted(self.learners_next),
            auto_leave=self.auto_leave,
        )


class ProgressTracker:
    """The configuration, a Progress per member and the votes of the current election."""

    def __init__(self, max_inflight: int) -> None:
        self.conf = Configuration()
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.max_inflight = max_inflight

    def apply_conf(self, conf: Configuration, progress: dict[int, Progress]) -> None:
        self.conf = conf
        self.progress = progress
        for pid, pr in progress.items():
            pr.is_learner = pid in conf.learners or pid in conf.learners_next

    def committed(self) -> int:
        """The largest index a (joint) majority of voters has matched (paper §5.3)."""
        prs = self.progress
        c = self.conf
        if not c.outgoing:
            # Hot path: one majority config, no dict of matches to build.
            return quorum.majority_index([prs[v].matched for v in c.incoming])
        matched = {pid: pr.matched for pid, pr in prs.items()}
        return quorum.joint_committed_index(c.incoming, c.outgoing, matched)

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, pid: int, granted: bool) -> None:
        self.votes.setdefault(pid, granted)

    def tally_votes(self) -> tuple[int, int, VoteResult]:
        granted = rejected = 0
        for pid, v in self.votes.items():
            if pid in self.progress and not self.progress[pid].is_learner:
                if v:
                    granted += 1
                else:
                    rejected += 1
        return granted, rejected, quorum.joint_vote_result(self.conf.incoming, self.conf.outgoing, self.votes)

    def quorum_recently_active(self, self_id: int) -> bool:
        """Check-quorum (thesis §6.2): did a quorum talk to us since the last check? Resets the marks."""
        active = set()
        for pid, pr in self.progress.items():
            if pid == self_id:
                active.add(pid)
            elif pr.recent_active:
                active.add(pid)
                pr.recent_active = False
        return quorum.has_quorum(self.conf.incoming, self.conf.outgoing, active)

    def has_quorum(self, ids: set[int]) -> bool:
        return quorum.has_quorum(self.conf.incoming, self.conf.outgoing, ids)
