"""Append-only, checksummed, segmented write-ahead log files.

This module owns the bytes on disk of the WAL: record framing, segment files,
write buffering, fsync, rotation, deletion of old segments and, at start-up,
reading segments back and cutting a torn tail. It knows record *kinds* but not
what they mean for Raft; `raft/disk.py` interprets them.

It must never report data as durable that was not fsynced, never retry a
failed write or fsync as if it had worked (fail closed), and never skip a
damaged record other than the torn tail of the last segment.

Layout: `<dir>/<seq:016x>.wal`, seq counting up from 1 without gaps, and
`<dir>/LAST` naming the newest seq (so a lost last segment is noticed). Every
record is framed as

    length: u32 LE | crc: u32 LE | kind: u8 | batch: u32 LE | payload

with `crc` = CRC-32 (zlib) over kind + batch + payload, and `batch` = the
offset in the file where the record's sync batch began (the end of the
previous sync). Payloads are eraftpb messages
(see `Kind`). Each segment starts with a SEGMENT record followed by a
checkpoint of the small state (hard state, conf state, applied state, abort
height) so that older segments can be deleted without losing it.

Torn tails: a crash during a write can leave a partial or zero-filled record
at the end of the last segment, or, after a power cut, a hole inside the last
unsynced batch. At open such a tail is cut (one warning naming the file and
offset) provided no valid record after the damage belongs to a later batch
(which would prove the damaged bytes had been fsynced); damage anywhere else
raises `CorruptLog`. `torn_append` tells a tail a crash can leave from one it
cannot (then the cut data may have been synced: DiskStorage reports it).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass, field

from raft.errors import DiskFailure

__all__ = [
    "Kind",
    "SegmentScan",
    "WalWriter",
    "encode_record",
    "fsync_dir",
    "list_segments",
    "read_last_seq",
    "write_last_seq",
    "read_records",
    "scan_segment",
    "segment_name",
]

HEADER = struct.Struct("<IIBI")
HEADER_SIZE = HEADER.size  # 13
_KIND_BATCH = struct.Struct("<BI")
# A record longer than this is treated as damage, not as a request to read
# gigabytes: the largest real payload is one entry (a block proposal).
MAX_RECORD = 256 * 1024 * 1024
SEGMENT_SUFFIX = ".wal"
_SEGMENT_RE = re.compile(r"^([0-9a-f]{16})\.wal$")


class Kind(enum.IntEnum):
    """Record kinds and their payloads (all eraftpb except ABORT_HEIGHT)."""

    SEGMENT = 1  # Entry(index=last index before this segment, term=its term, data=seq u64 LE)
    ENTRY = 2  # Entry: one log entry, index = last index + 1
    HARDSTATE = 3  # HardState
    CONFSTATE = 4  # ConfState
    APPLIED = 5  # Snapshot(data=service state, metadata{index=applied, conf_state})
    SNAPSHOT = 6  # Snapshot installed: the log restarts after metadata.index
    TRUNCATE = 7  # Entry(index=i): entries >= i are dropped (conflicting tail)
    ABORT_HEIGHT = 8  # u64 LE


_VALID_KINDS = frozenset(int(k) for k in Kind)
# Candidate kind bytes when searching for a valid record after damage.
_KIND_BYTE_RE = re.compile(b"[" + b"".join(re.escape(bytes([int(k)])) for k in Kind) + b"]")


def encode_record(kind: int, payload: bytes, batch: int = 0) -> bytes:
    """Frame one record; `batch` = offset in its file where its sync batch began."""
    crc = zlib.crc32(payload, zlib.crc32(_KIND_BATCH.pack(kind, batch)))
    return HEADER.pack(len(payload), crc, kind, batch) + payload


def segment_name(seq: int) -> str:
    return f"{seq:016x}{SEGMENT_SUFFIX}"


def list_segments(dirpath: str) -> list[tuple[int, str]]:
    """(seq, path) of every segment file in `dirpath`, by seq."""
    found = []
    for name in os.listdir(dirpath):
        m = _SEGMENT_RE.match(name)
        if m:
            found.append((int(m.group(1), 16), os.path.join(dirpath, name)))
    found.sort()
    return found


LAST_FILE = "LAST"


def write_last_seq(dirpath: str, seq: int) -> None:
    """Record durably (temp, fsync, rename, dir fsync) the newest segment's seq, so
    that losing the last segment file is detected instead of silently replaying less."""
    path = os.path.join(dirpath, LAST_FILE)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, f"{seq}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(path + ".tmp", path)
    fsync_dir(dirpath)


def read_last_seq(dirpath: str) -> int | None:
    """The seq recorded by write_last_seq, or None when the file is missing or unreadable."""
    try:
        with open(os.path.join(dirpath, LAST_FILE), "rb") as f:
            return int(f.read().decode("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def fsync_dir(dirpath: str) -> None:
    """fsync a directory so that file creations/renames/unlinks in it are durable."""
    fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class SegmentScan:
    """What was read from one segment file."""

    seq: int
    path: str
    records: list[tuple[int, bytes, int]] = field(default_factory=list)  # (kind, payload, offset)
    good_end: int = 0  # offset just after the last valid record
    size: int = 0
    damage: str | None = None  # why reading stopped before the end of file
    acknowledged_after: int | None = None  # a record proving the damage was fsynced (see acknowledged_after)
    # Damage only: does it look like an append interrupted by a crash (see torn_append)?
    plausible_torn: bool = False


def read_records(data: bytes, scan: SegmentScan) -> None:
    """Parse consecutive records from offset 0; stop at the first damaged one."""
    n = len(data)
    view = memoryview(data)
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    valid = _VALID_KINDS
    append = scan.records.append
    off = 0
    # Hot loop of recovery (one pass per record): the cheap checks first, the
    # reason for a failure is worked out only once, in _damage().
    while off < n:
        if n - off < HEADER_SIZE:
            scan.damage = f"incomplete record header ({n - off} bytes)"
            break
        length, crc, kind, _batch = unpack(data, off)
        end = off + HEADER_SIZE + length
        if end > n or crc32(view[off + 8 : end]) != crc or kind not in valid:
            scan.damage = _damage(data, off)
            break
        append((kind, data[off + HEADER_SIZE : end], off))
        off = end
    scan.good_end = off


def _damage(data: bytes, off: int) -> str:
    length, crc, kind, _batch = HEADER.unpack_from(data, off)
    end = off + HEADER_SIZE + length
    if kind not in _VALID_KINDS:
        return f"unknown record kind {kind}"
    if length > MAX_RECORD or end > len(data):
        return f"record length {length} runs past the end of the file"
    return f"checksum mismatch in a {Kind(kind).name} record of {length} bytes"


def acknowledged_after(data: bytes, damage: int) -> int | None:
    """Offset of a well-formed record after `damage` that proves the damaged
    bytes were already fsynced, if there is one.

    The writer starts a batch only after the previous sync() returned, and
    every record carries the offset where its batch began. A record whose
    batch began after the damaged offset therefore shows that the batch
    holding the damage was durable (acknowledged): real corruption. Records
    of the damaged batch itself prove nothing: a power cut can persist the
    pages of an unsynced write out of order, leaving a hole before them.
    """
    return _valid_record_after(data, damage, batch_after=damage)


SECTOR = 512  # the unit a power cut persists or loses as a whole (docs/internals.md)


def _valid_record_after(data: bytes, start: int, batch_after: int = -1) -> int | None:
    """The offset of the first well-formed record after `start` whose batch began
    after `batch_after` (any batch by default), or None."""
    n = len(data)
    view = memoryview(data)
    for m in _KIND_BYTE_RE.finditer(data, start + 1 + 8):
        p = m.start() - 8
        if n - p < HEADER_SIZE:
            break
        length, crc, _kind, batch = HEADER.unpack_from(data, p)
        end = p + HEADER_SIZE + length
        if length > MAX_RECORD or end > n or batch <= batch_after:
            continue
        if zlib.crc32(view[p + 8 : end]) == crc:
            return p
    return None


def torn_append(data: bytes, damage: int) -> bool:
    """Could the bytes from `damage` to the end of the file be what a crash
    leaves of an append in flight (so nothing that was ever synced is in them)?

    The WAL only appends, so bytes past the last synced size can only be the
    written bytes or zeros (a sector that never reached the disk), and the
    file may end anywhere. Damage is such a torn append when no well-formed
    record follows it and the first damaged record is explained by an end of
    file or a zero sector inside it: its header is cut short, all zeros (with
    only zeros after it) or zero from a sector boundary on, or it is well framed (known kind, sane length, batch at or before its own
    offset) and runs past the end of the file or holds a sector-aligned run
    of zeros. A hole of whole zero sectors followed by valid records of the same
    write is one too (sectors persisted out of order). Anything else (a bit flip
    in a whole record, garbage, a partial hole followed by valid records) is
    damage a crash cannot produce.
    """
    n = len(data)
    rest = n - damage
    if rest <= 0:
        return True
    follower = _valid_record_after(data, damage)
    if follower is not None:
        # Well-formed records follow (of the damaged write itself: one of a later batch
        # is refused before this is asked). A power cut can persist an unsynced write's
        # sectors out of order, so a whole zero sector between the damage and them is
        # a crash state; any other damage there is not.
        s = -(-damage // SECTOR) * SECTOR
        while s + SECTOR <= follower:
            if not any(data[s : s + SECTOR]):
                return True
            s += SECTOR
        return False
    if rest < HEADER_SIZE:
        return True  # header cut short by the end of the file
    if not any(data[damage : damage + HEADER_SIZE]):
        return not any(data[damage:])  # a zero header: only a zero tail is an unwritten extension
    boundary = (damage // SECTOR + 1) * SECTOR
    if boundary < damage + HEADER_SIZE and not any(data[boundary : damage + HEADER_SIZE]):
        return True  # the header's first sector was written, the next one not (yet)
    length, _crc, kind, batch = HEADER.unpack_from(data, damage)
    if kind not in _VALID_KINDS or length > MAX_RECORD or batch > damage:
        return False
    end = damage + HEADER_SIZE + length
    if end > n:
        return True  # the record runs past the end of the file: cut short
    # A complete record with a bad checksum: only a sector that never reached the
    # disk (zeros over the whole sector, or over the part inside the record) explains it.
    s = (damage // SECTOR) * SECTOR
    while s < end:
        lo, hi = max(s, damage + HEADER_SIZE), min(s + SECTOR, end)
        if lo < hi and not any(data[lo:hi]):
            return True
        s += SECTOR
    return False


def scan_segment(seq: int, path: str) -> SegmentScan:
    """Read one segment file; `damage` tells where and why reading stopped early."""
    with open(path, "rb") as f:
        data = f.read()
    scan = SegmentScan(seq=seq, path=path, size=len(data))
    read_records(data, scan)
    if scan.damage is not None:
        scan.acknowledged_after = acknowledged_after(data, scan.good_end)
        scan.plausible_torn = torn_append(data, scan.good_end)
    return scan


class WalWriter:
    """The single writer of the WAL: appends records to the active segment.

    Records are buffered in memory and written with one os.write per sync()
    (or when the buffer grows large); sync() then fsyncs the segment. New
    segments are created, fsynced and directory-fsynced before use. Any
    OSError from the disk turns into DiskFailure and the writer refuses every
    later write: after a failed fsync the kernel may have dropped the dirty
    pages, so nothing written since the last good fsync may be called durable
    (fail closed).
    """

    FLUSH_BYTES = 4 * 1024 * 1024

    def __init__(
        self,
        dirpath: str,
        seq: int,
        offset: int,
        segment_bytes: int,
        logger: logging.Logger,
        segments: list[tuple[int, int]],
    ) -> None:
        """Open segment `seq` for appending at `offset` (its valid length)."""
        self.dirpath = dirpath
        self.seq = seq
        self.segment_bytes = segment_bytes
        self.log = logger
        # (seq, last log index before the segment) of every live segment, oldest first.
        self.segments = segments
        self.failed: DiskFailure | None = None
        self._buf = bytearray()
        self._path = os.path.join(dirpath, segment_name(seq))
        self._fd: int | None = None
        self._fd = self._guard("open", lambda: os.open(self._path, os.O_WRONLY | os.O_APPEND))
        self.offset = offset  # bytes in the file, written or not yet synced
        self.synced_offset = offset

    @classmethod
    def create(
        cls,
        dirpath: str,
        seq: int,
        head: list[tuple[int, bytes]],
        segment_bytes: int,
        logger: logging.Logger,
        segments: list[tuple[int, int]],
    ) -> WalWriter:
        """Create segment `seq` holding the records `head`, durably (file + directory fsync)."""
        path = os.path.join(dirpath, segment_name(seq))
        data = b"".join(encode_record(k, p) for k, p in head)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(dirpath)
            write_last_seq(dirpath, seq)
        except OSError as err:
            raise _disk_failure("create segment", path, err) from err
        return cls(dirpath, seq, len(data), segment_bytes, logger, segments)

    # -- writing -----------------------------------------------------------------

    def _guard(self, what: str, op):  # type: ignore[no-untyped-def]
        try:
            return op()
        except OSError as err:
            self.failed = _disk_failure(what, self._path, err)
            self.log.error("wal: %s", self.failed)
            raise self.failed from err

    def check(self) -> None:
        if self.failed is not None:
            raise DiskFailure(f"storage refuses writes after an earlier disk failure: {self.failed}")
        if self._fd is None:
            raise DiskFailure("storage is closed")

    def add(self, kind: int, payload: bytes) -> None:
        """Buffer one record (not durable until sync())."""
        batch = self.synced_offset  # this batch began where the last sync ended
        crc = zlib.crc32(payload, zlib.crc32(_KIND_BATCH.pack(kind, batch)))
        self._buf += HEADER.pack(len(payload), crc, kind, batch)
        self._buf += payload
        if len(self._buf) >= self.FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand buffered records to the kernel (no fsync)."""
        self.check()
        if not self._buf:
            return
        data = bytes(self._buf)
        self._buf.clear()
        fd = self._fd
        self._guard("write", lambda: _write_all(fd, data))
        self.offset += len(data)

    @property
    def dirty(self) -> bool:
        return bool(self._buf) or self.offset != self.synced_offset

    def sync(self) -> None:
        """Make every record added so far durable: write and fsync the segment.
        (Creating a segment already fsyncs it and the directory before use.)"""
        self.check()
        if not self.dirty:
            return
        self.flush()
        fd = self._fd
        self._guard("fsync", lambda: os.fsync(fd))
        self.synced_offset = self.offset

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def unsynced_bytes(self) -> int:
        return self.offset - self.synced_offset + len(self._buf)

    def should_rotate(self) -> bool:
        return self.offset + len(self._buf) >= self.segment_bytes

    def rotate(self, head: list[tuple[int, bytes]], prev_index: int) -> None:
        """Start segment seq+1 with `head` (its SEGMENT record + checkpoint).

        The current segment must be synced first: only the last segment may
        ever hold a torn tail, so no write may go to a later file while an
        earlier one still has unsynced bytes.
        """
        self.sync()
        seq = self.seq + 1
        path = os.path.join(self.dirpath, segment_name(seq))
        data = b"".join(encode_record(k, p) for k, p in head)

        def create() -> int:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            _write_all(fd, data)
            os.fsync(fd)
            fsync_dir(self.dirpath)
            # Only once the new segment is durable may LAST point at it.
            write_last_seq(self.dirpath, seq)
            return fd

        fd = self._guard("create segment", create)
        os.close(self._fd)  # type: ignore[arg-type]
        self._fd = fd
        self.seq = seq
        self._path = path
        self.offset = self.synced_offset = len(data)
        self.segments.append((seq, prev_index))
        self.log.info("wal: started segment %s prev_index=%d", segment_name(seq), prev_index)

    def delete_below(self, index: int) -> int:
        """Delete segments all of whose entries are <= `index` (a durable
        snapshot covers them); the active segment is always kept. Returns how
        many were deleted."""
        self.check()
        doomed = []
        # Segment k is covered when segment k+1 began at or below `index`.
        for (seq, _prev), (_next_seq, next_prev) in zip(self.segments, self.segments[1:], strict=False):
            if next_prev <= index:
                doomed.append(seq)
            else:
                break
        if not doomed:
            return 0
        for seq in doomed:
            path = os.path.join(self.dirpath, segment_name(seq))
            self._guard("delete segment", lambda p=path: os.unlink(p))
        self._guard("fsync directory", lambda: fsync_dir(self.dirpath))
        del self.segments[: len(doomed)]
        self.log.info(
            "wal: deleted %d segment(s) up to %s covered by snapshot index=%d",
            len(doomed),
            segment_name(doomed[-1]),
            index,
        )
        return len(doomed)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _disk_failure(what: str, path: str, err: OSError) -> DiskFailure:
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    return DiskFailure(
        f"{what} failed on {path}: {name} ({err.strerror}); the node must stop, data written "
        "since the last successful sync may not be durable"
    )
