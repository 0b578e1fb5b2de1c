"""The service's own records, which DiskStorage keeps in the Raft WAL.

Raft itself needs none of this: it is the consensus service's state (cita-cloud.md),
kept in the same WAL only so that it is durable in the same fsync as the log and
checkpointed at the head of every segment:

* the *applied record* (`Kind.APPLIED`): an eraftpb Snapshot whose
  `metadata.index` is the last index the service applied, `metadata.conf_state`
  the conf state at that index, and `data` the service's ConsensusConfiguration
  bytes there. A snapshot install (a `Kind.SNAPSHOT` record, `apply_snapshot`)
  makes the snapshot itself the applied record;
* the *abort height* (`Kind.ABORT_HEIGHT`, u64 LE): the block height the
  service told the controller it would stop at.

`ServiceState` owns both in memory and makes their record payloads; it does no
I/O (DiskStorage writes the records and replays them, raft/recovery.py). The
applied record's conf state is Raft's (`DiskStorage.initial_state` answers with
the newest of it and the CONFSTATE records), so DiskStorage passes its conf
state in when it writes one.
"""

from __future__ import annotations

import struct

from cita_raft_pb import eraftpb_pb2 as pb
from raft.wal import Kind

__all__ = ["ServiceState", "checkpoint_records", "decode_abort_height", "encode_abort_height"]

_U64 = struct.Struct("<Q")


def encode_abort_height(height: int) -> bytes:
    return _U64.pack(height)


def decode_abort_height(payload: bytes) -> int:
    """struct.error when the payload is not 8 bytes (recovery refuses such a record)."""
    return _U64.unpack(payload)[0]


def checkpoint_records(applied: pb.Snapshot, abort_height: int) -> list[tuple[int, bytes]]:
    """The service's part of a segment head (after SEGMENT, HARDSTATE, CONFSTATE)."""
    return [
        (Kind.APPLIED, applied.SerializeToString()),
        (Kind.ABORT_HEIGHT, encode_abort_height(abort_height)),
    ]


class ServiceState:
    """The applied record and the abort height, as last written or recovered."""

    __slots__ = ("abort_height", "applied")

    def __init__(self, applied: pb.Snapshot | None = None, abort_height: int = 0) -> None:
        self.applied = applied if applied is not None else pb.Snapshot()
        self.abort_height = abort_height

    def applied_index(self) -> int:
        return self.applied.metadata.index

    def applied_data(self) -> bytes:
        return self.applied.data

    def applied_record(self, conf_state: pb.ConfState) -> pb.Snapshot:
        """The applied record to write, carrying Raft's current conf state."""
        applied = pb.Snapshot()
        applied.CopyFrom(self.applied)
        applied.metadata.conf_state.CopyFrom(conf_state)
        return applied

    def set_applied(self, index: int, data: bytes | None) -> bool:
        """Move the applied index (and data) forward; False, changing nothing, when
        `index` is below it (a snapshot installed meanwhile already moved it past)."""
        if index < self.applied.metadata.index:
            return False
        self.applied.metadata.index = index
        if data is not None:
            self.applied.data = data
        return True

    def snapshot_installed(self, snap: pb.Snapshot) -> None:
        """A snapshot replaced the log: it is the service's applied state now."""
        applied = pb.Snapshot()
        applied.CopyFrom(snap)
        self.applied = applied

    def checkpoint(self, conf_state: pb.ConfState) -> list[tuple[int, bytes]]:
        return checkpoint_records(self.applied_record(conf_state), self.abort_height)
