"""Snapshot files: one eraftpb Snapshot per file, written atomically.

This module owns the `snap/` directory: writing a snapshot durably (temp
file, fsync, rename, directory fsync), loading the valid ones newest first,
setting damaged ones aside, and pruning to the newest `keep` (2). It never
decides whether an older snapshot may stand in for a damaged newer one: that
needs the WAL, so `raft/disk.py` decides.

File name `<index:016x>-<term:016x>.snap`; content is one WAL-framed record
(length, CRC-32, kind SNAPSHOT, payload = eraftpb Snapshot) whose metadata
must match the name.
"""

from __future__ import annotations

import logging
import os
import re

from google.protobuf.message import DecodeError

from cita_raft_pb import eraftpb_pb2 as pb
from raft.errors import DiskFailure
from raft.wal import Kind, SegmentScan, encode_record, fsync_dir, read_records

__all__ = ["SnapshotStore", "snapshot_name"]

_NAME_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.snap$")


def snapshot_name(index: int, term: int) -> str:
    return f"{index:016x}-{term:016x}.snap"


def decode_snapshot_file(data: bytes, index: int, term: int) -> pb.Snapshot:
    """Parse and verify one snapshot file's bytes; ValueError says what is wrong."""
    scan = SegmentScan(seq=0, path="")
    read_records(data, scan)
    if scan.damage is not None:
        raise ValueError(f"{scan.damage} at offset {scan.good_end}")
    if len(scan.records) != 1 or scan.records[0][0] != Kind.SNAPSHOT:
        raise ValueError(f"expected one SNAPSHOT record, found {len(scan.records)} record(s)")
    try:
        snap = pb.Snapshot.FromString(scan.records[0][1])
    except DecodeError as err:  # a valid checksum around bytes that are no Snapshot
        raise ValueError(f"undecodable snapshot with a valid checksum: {err}") from err
    meta = snap.metadata
    if (meta.index, meta.term) != (index, term):
        raise ValueError(f"metadata index={meta.index} term={meta.term} does not match the file name")
    return snap


class SnapshotStore:
    """The snapshot files of one node (single writer)."""

    def __init__(self, dirpath: str, logger: logging.Logger, keep: int = 2) -> None:
        self.dirpath = dirpath
        self.log = logger
        self.keep = keep

    def _files(self) -> list[tuple[int, int, str]]:
        """(index, term, name) of every snapshot file, newest first."""
        found = []
        for name in os.listdir(self.dirpath):
            m = _NAME_RE.match(name)
            if m:
                found.append((int(m.group(1), 16), int(m.group(2), 16), name))
        found.sort(reverse=True)
        return found

    def load(self) -> list[pb.Snapshot]:
        """Every valid snapshot, newest first. Damaged files are renamed to
        `*.corrupt` (kept for the operator) with a warning; leftover temp files
        from an interrupted save are removed."""
        for name in os.listdir(self.dirpath):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.dirpath, name))
                self.log.warning("snapshot: removed leftover temp file %s (interrupted save)", name)
        valid = []
        for index, term, name in self._files():
            path = os.path.join(self.dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            try:
                valid.append(decode_snapshot_file(data, index, term))
            except ValueError as err:  # the file is unusable
                os.replace(path, path + ".corrupt")
                fsync_dir(self.dirpath)
                self.log.warning("snapshot: %s is damaged (%s), set aside as %s.corrupt", path, err, name)
        return valid

    def save(self, snap: pb.Snapshot) -> str:
        """Write `snap` durably and prune to the newest `keep`; returns its path.

        Order matters for crash safety: the data is fsynced under a temp name
        before the rename, so the final name only ever holds a whole snapshot;
        the directory fsync makes the rename itself survive a power cut.
        """
        meta = snap.metadata
        name = snapshot_name(meta.index, meta.term)
        path = os.path.join(self.dirpath, name)
        tmp = path + ".tmp"
        data = encode_record(Kind.SNAPSHOT, snap.SerializeToString())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(self.dirpath)
            self._prune()
        except OSError as err:
            raise DiskFailure(f"saving snapshot {path} failed: {err}; the node must stop") from err
        self.log.info("snapshot: saved %s index=%d term=%d bytes=%d", name, meta.index, meta.term, len(data))
        return path

    def _prune(self) -> None:
        files = self._files()
        for _index, _term, name in files[self.keep :]:
            os.unlink(os.path.join(self.dirpath, name))
        if len(files) > self.keep:
            fsync_dir(self.dirpath)

    def indexes(self) -> list[int]:
        """Indexes of the snapshot files present, newest first (not verified)."""
        return [index for index, _term, _name in self._files()]
