"""A compact, sans-I/O Raft that speaks raft-rs's wire format (package eraftpb).

Public API (docs/internals.md): peer_id, Config, RawNode, Ready, SoftState, Status,
StateRole, Storage, MemoryStorage, RaftState and the errors of raft.errors.
"""

from .config import Config
from .core import StateRole
from .errors import (
    Compacted,
    ConfChangeError,
    ConfigInvalid,
    CorruptLog,
    DiskFailure,
    ProposalDropped,
    RaftError,
    RaftInvariantError,
    SnapshotTemporarilyUnavailable,
    StepLocalMsg,
    StepPeerNotFound,
    StorageError,
    Unavailable,
)
from .peer_id import peer_id
from .rawnode import RawNode, Ready, SoftState, Status
from .storage import MemoryStorage, RaftState, Storage

__all__ = [
    "Compacted",
    "ConfChangeError",
    "Config",
    "ConfigInvalid",
    "CorruptLog",
    "DiskFailure",
    "MemoryStorage",
    "ProposalDropped",
    "RaftError",
    "RaftInvariantError",
    "RaftState",
    "RawNode",
    "Ready",
    "SnapshotTemporarilyUnavailable",
    "SoftState",
    "StateRole",
    "Status",
    "StepLocalMsg",
    "StepPeerNotFound",
    "Storage",
    "StorageError",
    "Unavailable",
    "peer_id",
]
