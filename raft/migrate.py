"""Import of the Rust `consensus_raft` service's files (cita-cloud.md section 4.6).

This module owns reading the Rust layout in `raft_data_path`:

* `raft-snapshot`: a varint-length-delimited eraftpb Snapshot at the applied
  index whose data is a `common.ConsensusConfiguration`;
* `raft-entry`: a varint-length-delimited eraftpb Entry (often empty);
* `abort_height`: decimal text.

It only reads: the originals are never modified or removed, so an operator
can roll back to the Rust binary. `raft/disk.py` turns the result into the
first WAL segment and snapshot file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from cita_raft_pb import eraftpb_pb2 as pb
from raft.errors import CorruptLog

__all__ = ["RUST_FILES", "RustState", "decode_length_delimited", "has_rust_files", "read_rust_state"]

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
