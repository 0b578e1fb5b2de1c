"""Simulated crashes of DiskStorage and WalWriter, for tests (moved out of raft/).

`simulate_crash(storage, rng=None)`: the process dies / the power goes now.
Everything the storage has not fsynced is lost (optionally but for a torn
prefix of it, or with a zeroed hole) and the storage is closed; reopening the
path with `DiskStorage.open` is the restart. `crash_wal(writer, ...)` does the
same to one WalWriter with the damage given explicitly.

Both reach into the writer's private buffer, file descriptor and path: a crash
is not part of the storage's API. (The crash-state explorer, tests/crash_explore,
models crashes at the file-system level instead.)
"""

from __future__ import annotations

import os
import random

from raft.disk import DiskStorage
from raft.errors import DiskFailure
from raft.wal import SECTOR, WalWriter

__all__ = ["crash_wal", "simulate_crash"]


def simulate_crash(storage: DiskStorage, rng: random.Random | None = None) -> None:
    """Lose what is not fsynced, then close `storage`.

    With `rng`, sometimes a random prefix of the unsynced bytes survives,
    maybe followed by zeros from a sector boundary on (a torn write), and
    sometimes all of it survives but for a zeroed hole (pages written out of
    order); recovery must cut either.
    """
    writer = storage._writer
    torn, garbage, hole = 0, b"", None
    pending = writer.unsynced_bytes
    r = rng.random() if rng is not None else 0.0
    if rng is not None and r >= 0.5:
        torn = rng.randint(0, pending)
        if r >= 0.8 and pending:
            torn = pending
            hole = (rng.randrange(pending), rng.randint(1, 4096))
        elif rng.random() < 0.3:
            # The size grew but the data did not all come: the zeros start where a
            # sector was lost, so the kept prefix ends at a sector boundary of the file
            # (docs/internals.md, the power-loss model; a tear in mid-sector followed
            # by zeros is not a crash state and recovery rightly calls it damage).
            garbage = bytes(rng.randint(1, 64))
            base = writer.synced_offset
            torn = max(0, (base + torn) // SECTOR * SECTOR - base)
    crash_wal(writer, torn, garbage, hole)
    if storage._lock_fd is not None:
        os.close(storage._lock_fd)
        storage._lock_fd = None


def crash_wal(
    writer: WalWriter, torn_bytes: int = 0, garbage: bytes = b"", hole: tuple[int, int] | None = None
) -> None:
    """Lose what a power cut would lose of `writer`'s segment, then close it.

    Drops the buffer and cuts the active segment back to the last fsynced
    offset, keeping `torn_bytes` of the unsynced data (a partial write) and
    then `garbage` (e.g. zeros); `hole` = (start, length) within the kept
    unsynced bytes is zeroed, widened to whole sectors (pages persisted out
    of order: a crash state, so recovery cuts it without
    recovery_lost_synced). Earlier segments were synced before rotation, so
    they are untouched. The writer refuses every write afterwards.
    """
    pending = bytes(writer._buf)
    writer._buf.clear()
    if writer._fd is not None:
        os.close(writer._fd)
        writer._fd = None
    with open(writer._path, "rb") as f:
        f.seek(writer.synced_offset)
        unsynced = f.read() + pending
    keep = bytearray(unsynced[: max(0, min(torn_bytes, len(unsynced)))])
    if hole is not None:
        # A disk persists or loses whole sectors: widen the hole to the sectors it
        # touches, in file offsets (the unsynced bytes start at synced_offset).
        start, length = hole
        base = writer.synced_offset
        lo = max(0, (base + start) // SECTOR * SECTOR - base)
        hi = -(-(base + start + length) // SECTOR) * SECTOR - base
        keep[lo:hi] = bytes(len(keep[lo:hi]))
    with open(writer._path, "r+b") as f:
        f.truncate(writer.synced_offset)
        f.seek(writer.synced_offset)
        f.write(keep + garbage)
    writer.failed = DiskFailure("storage crashed (simulated)")
