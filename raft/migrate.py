"""Import of the Rust `consensus_raft` service's files (cita-cloud.md section 4.6).

This module owns reading the Rust layout in `raft_data_path`:

* `raft-snapshot`: a varint-length-delimited eraftpb Snapshot at the applied
  index whose data is a `common.ConsensusConfiguration`;
* `raft-entry`: a varint-length-delimited eraftpb Entry (often empty);
* `abort_height`: decimal text.

It only reads: the originals are never modified or removed, so an operator
can roll back to the Rust binary. `import_rust_files` is the one entry point
DiskStorage uses (when it creates a new store): it turns what the Rust service
would have restarted with into a `StoreSeed`, which DiskStorage writes as the
first WAL segment and snapshot file without knowing the Rust layout.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from cita_raft_pb import eraftpb_pb2 as pb
from raft.errors import CorruptLog
from raft.wal import Kind

__all__ = [
    "RUST_FILES",
    "RustState",
    "StoreSeed",
    "decode_length_delimited",
    "has_rust_files",
    "import_rust_files",
    "log_import",
    "read_rust_state",
    "seed_from_rust",
]

RUST_SNAPSHOT = "raft-snapshot"
RUST_ENTRY = "raft-entry"
RUST_ABORT_HEIGHT = "abort_height"
RUST_FILES = (RUST_SNAPSHOT, RUST_ENTRY, RUST_ABORT_HEIGHT)


@dataclass
class RustState:
    """What the Rust service would recover from its files."""

    snapshot: pb.Snapshot | None  # None: absent or empty (the node was never initialized)
    entry: pb.Entry | None  # re-appended only when it directly follows the snapshot
    abort_height: int


def has_rust_files(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in RUST_FILES)


def decode_length_delimited(data: bytes) -> bytes:
    """The body of a prost `encode_length_delimited` buffer (varint length prefix).

    Raises ValueError when the prefix is malformed or the body is shorter than
    announced (a partial write by the Rust service, which never fsynced).
    """
    length = 0
    shift = 0
    pos = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated length prefix")
        byte = data[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 63:
            raise ValueError("length prefix longer than 10 bytes")
    if pos + length > len(data):
        raise ValueError(f"body of {length} bytes announced, only {len(data) - pos} present")
    return data[pos : pos + length]


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_rust_state(path: str, logger: logging.Logger) -> RustState:
    """Read the Rust files in `path`; CorruptLog if `raft-snapshot` is unreadable."""
    snapshot = None
    snap_path = os.path.join(path, RUST_SNAPSHOT)
    raw = _read(snap_path)
    if raw:
        try:
            snapshot = pb.Snapshot.FromString(decode_length_delimited(raw))
        except Exception as err:  # protobuf raises its own DecodeError
            raise CorruptLog(
                f"cannot import {snap_path} ({len(raw)} bytes): {err}. The Rust service rewrites this "
                "file in place without fsync, so a crash can leave it partial. Restore it from a "
                "backup, or move it away to let this node re-bootstrap and catch up from its peers."
            ) from err
    elif raw is not None:
        logger.warning("migrate: %s is empty; the Rust node had no state to import", snap_path)

    entry = None
    entry_path = os.path.join(path, RUST_ENTRY)
    raw = _read(entry_path)
    if raw:
        try:
            entry = pb.Entry.FromString(decode_length_delimited(raw))
        except Exception as err:
            # The Rust service itself treats this file as a best-effort hint.
            logger.warning("migrate: ignoring unreadable %s (%d bytes): %s", entry_path, len(raw), err)

    abort_height = 0
    abort_path = os.path.join(path, RUST_ABORT_HEIGHT)
    raw = _read(abort_path)
    if raw is not None and raw.strip():
        try:
            abort_height = int(raw.decode("ascii").strip())
            if not 0 <= abort_height < 2**64:
                raise ValueError("not a u64")
        except (UnicodeDecodeError, ValueError):
            abort_height = 0
            logger.warning("migrate: ignoring unreadable %s: %r", abort_path, raw[:40])
    return RustState(snapshot=snapshot, entry=entry, abort_height=abort_height)


@dataclass
class StoreSeed:
    """What a new DiskStorage starts from: the first segment's checkpoint and the
    records after it, and the snapshot file to write (if any)."""

    snapshot: pb.Snapshot | None = None  # written as the first snapshot file
    prev_index: int = 0  # the log position before the first segment
    prev_term: int = 0
    hard_state: pb.HardState = field(default_factory=pb.HardState)
    conf_state: pb.ConfState = field(default_factory=pb.ConfState)
    applied: pb.Snapshot = field(default_factory=pb.Snapshot)  # the service's applied record
    abort_height: int = 0
    records: list[tuple[int, bytes]] = field(default_factory=list)  # (kind, payload) after the head
    imported: RustState | None = None  # what it was made from, for log_import


def seed_from_rust(imported: RustState) -> StoreSeed:
    """The store the Rust service would have restarted with (cita-cloud.md 4.6, 4.7)."""
    seed = StoreSeed(abort_height=imported.abort_height, imported=imported)
    snap = imported.snapshot
    if snap is not None:
        meta = snap.metadata
        seed.snapshot = snap
        seed.prev_index, seed.prev_term = meta.index, meta.term
        seed.conf_state.CopyFrom(meta.conf_state)
        seed.applied.CopyFrom(snap)
        # The Rust service never persisted term/vote (cita-cloud.md 4.7): start from
        # what it would have restarted with.
        seed.hard_state.term, seed.hard_state.commit = meta.term, meta.index
        seed.records.append((Kind.SNAPSHOT, snap.SerializeToString()))
        entry = imported.entry
        if entry is not None and entry.index == meta.index + 1:
            seed.hard_state.term = max(seed.hard_state.term, entry.term)
            seed.records.append((Kind.ENTRY, entry.SerializeToString()))
    return seed


def import_rust_files(path: str, logger: logging.Logger) -> StoreSeed | None:
    """The seed of a new store in `path` from the Rust service's files there, or None
    when there are none; CorruptLog if `raft-snapshot` is unreadable. The caller
    says what was imported (`log_import`) once the new store is in place."""
    if not has_rust_files(path):
        return None
    return seed_from_rust(read_rust_state(path, logger))


def log_import(path: str, seed: StoreSeed, logger: logging.Logger) -> None:
    """Say what was imported (once the new store is in place)."""
    imported = seed.imported
    if imported is None:
        return
    snap = imported.snapshot
    logger.warning(
        "migrate: imported the Rust consensus_raft files in %s: snapshot index=%s term=%s "
        "voters=%s, entry index=%s, abort_height=%d; originals kept untouched",
        path,
        snap.metadata.index if snap else None,
        snap.metadata.term if snap else None,
        list(snap.metadata.conf_state.voters) if snap else None,
        imported.entry.index if imported.entry else None,
        imported.abort_height,
    )
