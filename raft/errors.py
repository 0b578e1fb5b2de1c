"""Typed errors of the raft package (raft-rs names), so callers can tell
'retry later' from 'your request is wrong' from 'the disk is damaged'."""


class RaftError(Exception):
    """Base class of every error raised by the raft package."""


class ConfigInvalid(RaftError):
    """A Config that cannot work (id 0, heartbeat_tick >= election_tick, ...)."""


class ProposalDropped(RaftError):
    """The proposal was not appended: no leader known, a leader transfer is in
    progress, or a conf change is already pending."""


class Compacted(RaftError):
    """The requested index is below the first index still in the log."""


class Unavailable(RaftError):
    """The requested index is above the last index in the log."""


class SnapshotTemporarilyUnavailable(RaftError):
    """The storage has no snapshot recent enough yet; the leader retries later."""


class StepPeerNotFound(RaftError):
    """A response came from a peer that is not in the configuration."""


class StepLocalMsg(RaftError):
    """A local-only message type (MsgHup, MsgBeat, ...) was passed to step()."""


class ConfChangeError(RaftError):
    """A ConfChangeV2 that cannot be applied to the current configuration."""


class StorageError(RaftError):
    """Base class of durable-storage problems."""


class CorruptLog(StorageError):
    """Damage found in the WAL or snapshot files at start-up that cannot be
    repaired without losing acknowledged data. The message names the file, the
    offset and what the operator can do."""


class DiskFailure(StorageError):
    """The disk refused a write or an fsync (ENOSPC, EIO, ...). The node must
    stop: the data may not be durable, so it must never act as if it were."""


class RaftInvariantError(Exception):
    """A state the Raft algorithm forbids was reached inside the core (two
    leaders in one term, a commit index going back, a persisted entry
    overwritten below the commit index, ...). Deliberately not a RaftError:
    callers that catch RaftError as an expected answer must not swallow it.
    The host must stop (fail-stop) instead of carrying on."""
