"""Config of one Raft node, with raft-rs defaults and meanings, and its validation."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigInvalid

NO_LIMIT = (1 << 64) - 1


@dataclass
class Config:
    # This node's id; never 0 (0 means "nobody" on the wire).
    id: int = 0
    # Ticks without hearing from a leader before a follower campaigns; randomized to
    # [election_tick, 2*election_tick) per term (paper §5.2).
    election_tick: int = 10
    # Ticks between leader heartbeats; must be < election_tick.
    heartbeat_tick: int = 1
    # The index the host has applied (restart); entries above it are handed out again.
    applied: int = 0
    # Byte cap of one MsgAppend's entries; 0 = one entry per append (raft-rs).
    max_size_per_msg: int = 0
    # Appends in flight per follower in Replicate state.
    max_inflight_msgs: int = 256
    # Leader steps down if a quorum was not active during an election timeout (thesis §6.2).
    check_quorum: bool = False
    # Pre-vote phase before bumping the term (thesis §9.6).
    pre_vote: bool = False
    # Byte cap of committed entries per Ready; 0 = no limit.
    max_committed_size_per_ready: int = 0
    # Overrides of the randomized election timeout range; 0 = defaults.
    min_election_tick: int = 0
    max_election_tick: int = 0
    # Do not broadcast an append just because the commit index moved.
    skip_bcast_commit: bool = False
    # Leader steps down once a config without it is applied (etcd's StepDownOnRemoval).
    step_down_on_removal: bool = True
    # The node restarted after losing durable state (an empty store while the chain is
    # past genesis, or a recovery that cut damaged synced WAL data): it may have voted in
    # a term it no longer remembers, so it withholds votes until the rule in
    # docs/internals.md ("Lost state") lets it vote again.
    lost_state: bool = False

    def min_election(self) -> int:
        return self.min_election_tick or self.election_tick

    def max_election(self) -> int:
        return self.max_election_tick or 2 * self.election_tick

    def validate(self) -> None:
        """Raise ConfigInvalid on a config that cannot work."""
        if self.id == 0:
            raise ConfigInvalid("invalid node id 0")
        if self.heartbeat_tick <= 0:
            raise ConfigInvalid("heartbeat tick must be greater than 0")
        if self.election_tick <= self.heartbeat_tick:
            raise ConfigInvalid("election tick must be greater than heartbeat tick")
        if self.min_election() < self.election_tick:
            raise ConfigInvalid(
                f"min election tick {self.min_election()} must not be less than election_tick {self.election_tick}"
            )
        if self.min_election() >= self.max_election():
            raise ConfigInvalid(
                f"min election tick {self.min_election()} should be less than max election tick {self.max_election()}"
            )
        if self.max_inflight_msgs <= 0:
            raise ConfigInvalid("max inflight messages must be greater than 0")
        if self.max_size_per_msg < 0 or self.max_committed_size_per_ready < 0 or self.applied < 0:
            raise ConfigInvalid("sizes and indexes must not be negative")
