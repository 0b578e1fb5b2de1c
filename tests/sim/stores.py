"""Pluggable storage backends for the simulation, each with crash semantics.

A backend owns one node's storage across incarnations. `live` is what the core
reads and the host writes; a crash keeps only what the last `sync()` made
durable and throws away every write after it (the WAL's unsynced tail, the
page cache). The backend also carries the host's applied record (applied index,
the conf state in effect there, the state-machine digest), which is durable
with the next `sync()` exactly like the service's `DiskStorage.set_applied`.

This module never decides *when* to crash; the fault injector does.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import Any

from cita_raft_pb import eraftpb_pb2 as pb


@dataclass
class AppliedRecord:
    """The host's applied state as last written: index, conf state there, app digest."""

    index: int
    conf_state: pb.ConfState
    digest: bytes


def _copy_arg(arg: Any) -> Any:
    # The core may reuse or mutate message objects after handing them out, so a
    # pending write keeps its own copy, as bytes on disk would.
    if isinstance(arg, list):
        return [_copy_arg(a) for a in arg]
    if hasattr(arg, "CopyFrom"):
        c = type(arg)()
        c.CopyFrom(arg)
        return c
    return arg


class _Journal:
    """The last synced batches of a MemoryBackend and the durable state before them, so
    a fault can take back the newest synced batches (a disk that lied about them)."""

    KEEP = 8

    def __init__(self) -> None:
        from raft.storage import MemoryStorage

        self.base = MemoryStorage()  # the durable state before batches[0]
        self.base_applied: AppliedRecord | None = None
        self.batches: deque[tuple[list[tuple[str, tuple]], AppliedRecord | None]] = deque()

    def add(self, ops: list[tuple[str, tuple]], applied: AppliedRecord | None) -> None:
        self.batches.append((ops, applied))
        if len(self.batches) > self.KEEP:
            old_ops, old_applied = self.batches.popleft()
            _replay(self.base, old_ops)
            if old_applied is not None:
                self.base_applied = old_applied


def _replay(storage: Any, ops: list[tuple[str, tuple]]) -> None:
    for name, args in ops:
        getattr(storage, name)(*(_copy_arg(a) for a in args))


class _RecordingStorage:
    """Wraps a MemoryStorage: every write goes to `live` at once and is queued for
    the durable shadow, which receives the queue only on `sync()`."""

    _WRITES = ("append", "set_hardstate", "set_conf_state", "apply_snapshot", "create_snapshot", "compact")

    def __init__(self, live: Any, shadow: Any, journal: _Journal | None = None) -> None:
        self._live = live
        self._shadow = shadow
        self._journal = journal if journal is not None else _Journal()
        self._pending: list[tuple[str, tuple]] = []
        self.pending_applied: AppliedRecord | None = None
        self.durable_applied: AppliedRecord | None = None

    # read side: straight to the live storage
    def initial_state(self) -> Any:
        return self._live.initial_state()

    def first_index(self) -> int:
        return self._live.first_index()

    def last_index(self) -> int:
        return self._live.last_index()

    def term(self, index: int) -> int:
        return self._live.term(index)

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[pb.Entry]:
        return self._live.entries(lo, hi, max_size)

    def snapshot(self, request_index: int = 0, to: int = 0) -> pb.Snapshot:
        return self._live.snapshot(request_index, to)

    # write side: live now, shadow on sync
    def _write(self, name: str, *args: Any) -> Any:
        result = getattr(self._live, name)(*args)
        self._pending.append((name, tuple(_copy_arg(a) for a in args)))
        return result

    def append(self, entries: list[pb.Entry]) -> None:
        self._write("append", entries)

    def set_hardstate(self, hs: pb.HardState) -> None:
        self._write("set_hardstate", hs)

    def set_conf_state(self, cs: pb.ConfState) -> None:
        self._write("set_conf_state", cs)

    def apply_snapshot(self, snap: pb.Snapshot) -> None:
        self._write("apply_snapshot", snap)

    def create_snapshot(self, index: int, conf_state: pb.ConfState | None, data: bytes) -> pb.Snapshot:
        return self._write("create_snapshot", index, conf_state, data)

    def compact(self, index: int) -> None:
        self._write("compact", index)

    def sync(self) -> None:
        ops, applied = self._pending, self.pending_applied
        for name, args in ops:
            getattr(self._shadow, name)(*args)
        self._pending = []
        if applied is not None:
            self.durable_applied = applied
            self.pending_applied = None
        if ops or applied is not None:
            self._journal.add(ops, applied)
        self._live.sync()

    def has_unsynced(self) -> bool:
        return bool(self._pending) or self.pending_applied is not None

    def durable_view(self) -> Any:
        """The storage as a restart would find it (never handed to the core)."""
        return self._shadow


class MemoryBackend:
    """MemoryStorage with a durable shadow copy: crash = restart from the shadow."""

    name = "memory"

    def __init__(self, node_id: int, workdir: str | None = None, rng: Any = None) -> None:
        from raft.storage import MemoryStorage

        self._factory = MemoryStorage
        self.node_id = node_id
        self.storage = _RecordingStorage(MemoryStorage(), MemoryStorage())

    def record_applied(self, index: int, conf_state: pb.ConfState | None, digest: bytes) -> None:
        """Applied record, durable with the next sync (like DiskStorage.set_applied)."""
        if conf_state is not None:
            self.storage.set_conf_state(conf_state)
            cs = _copy_arg(conf_state)
        else:
            prev = self.storage.pending_applied or self.storage.durable_applied
            cs = prev.conf_state if prev is not None else pb.ConfState()
        self.storage.pending_applied = AppliedRecord(index, cs, digest)

    def durable_applied(self) -> AppliedRecord | None:
        return self.storage.durable_applied

    def crash(self) -> None:
        """Lose everything written since the last sync."""
        shadow = self.storage.durable_view()
        durable = self.storage.durable_applied
        self.storage = _RecordingStorage(copy.deepcopy(shadow), shadow, self.storage._journal)
        self.storage.durable_applied = durable

    def wipe(self) -> None:
        """An operator moved the data directory away: the next start finds nothing."""
        from raft.storage import MemoryStorage

        self.storage = _RecordingStorage(MemoryStorage(), MemoryStorage())

    def lose_synced_tail(self, rng: Any) -> str | None:
        """After a crash: the newest 1-4 synced batches are gone (a disk that acknowledged
        them and lost them), as a recovery that cuts a damaged WAL tail leaves it. The
        model of DiskBackend's real damage; None if there was nothing synced to lose."""
        journal = self.storage._journal
        if not journal.batches:
            return None
        k = rng.randint(1, min(4, len(journal.batches)))
        kept = list(journal.batches)[:-k]
        shadow = copy.deepcopy(journal.base)
        applied = journal.base_applied
        for ops, ap in kept:
            _replay(shadow, ops)
            if ap is not None:
                applied = ap
        journal.batches = deque(kept)
        self.storage = _RecordingStorage(copy.deepcopy(shadow), shadow, journal)
        self.storage.durable_applied = applied
        return f"newest {k} synced batch(es) lost"

    def restart(self) -> Any:
        return self.storage

    def close(self) -> None:
        pass


def scratch_dir() -> str | None:
    """Where DiskStorage directories go: tmpfs when there is one. The simulation's
    crashes are tests/crash_sim.simulate_crash(), not power cuts, so real fsyncs buy nothing here
    and cost 0.1-10 ms each on a busy disk."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


class DiskBackend:
    """raft.disk.DiskStorage in a temp dir; crash = `crash_sim.simulate_crash()` (the unsynced
    tail is lost, sometimes with a torn prefix of it left behind) and reopen.

    Without that hook, every `sync()` copies the directory and a crash reopens
    from the copy.
    """

    name = "disk"

    def __init__(self, node_id: int, workdir: str | None = None, rng: Any = None) -> None:
        from raft.disk import DiskStorage

        self._cls = DiskStorage
        self.node_id = node_id
        self.rng = rng
        self.root = tempfile.mkdtemp(prefix=f"sim-n{node_id}-", dir=workdir or scratch_dir())
        self.path = os.path.join(self.root, "data")
        self.synced_path = os.path.join(self.root, "synced")
        self.logger = logging.getLogger(f"sim.disk{node_id}")
        self.storage: Any = DiskStorage.open(self.path, logger=self.logger)
        self._hook = True  # tests/crash_sim.simulate_crash works on every DiskStorage
        self._install_sync_copy()

    def _install_sync_copy(self) -> None:
        if self._hook:
            return
        real_sync = self.storage.sync
        backend = self

        def sync_and_copy() -> None:
            real_sync()
            if os.path.exists(backend.synced_path):
                shutil.rmtree(backend.synced_path)
            shutil.copytree(backend.path, backend.synced_path)

        self.storage.sync = sync_and_copy
        sync_and_copy()

    def record_applied(self, index: int, conf_state: pb.ConfState | None, digest: bytes) -> None:
        from .checkers import encode_snapshot_data

        # Same bytes as a snapshot's data, so a restart that finds the snapshot's own
        # applied record (torn tail) decodes it the same way.
        self.storage.set_applied(index, conf_state, encode_snapshot_data(index, digest))

    def durable_applied(self) -> AppliedRecord | None:
        """Asked right after a restart, when the live storage is what survived."""
        from .checkers import decode_snapshot_data

        index = self.storage.applied_index()
        if index == 0:
            return None
        data_index, digest = decode_snapshot_data(self.storage.applied_data())
        if data_index != index:
            raise AssertionError(f"applied record index={index} carries data of index={data_index}")
        return AppliedRecord(index, self.storage.initial_state().conf_state, digest)

    def crash(self) -> None:
        if self._hook:
            from tests.crash_sim import simulate_crash

            simulate_crash(self.storage, self.rng)
        else:
            try:
                self.storage.close()
            except Exception:  # noqa: BLE001 -- a crash does not close cleanly
                pass
            shutil.rmtree(self.path)
            shutil.copytree(self.synced_path, self.path)
        self.storage = None

    def restart(self) -> Any:
        """Reopen after a crash; CorruptLog (damage recovery refuses to cut) propagates."""
        if self.storage is None:
            self.storage = self._cls.open(self.path, logger=self.logger)
            self._install_sync_copy()
        return self.storage

    def wipe(self) -> None:
        """An operator moved the data directory away: the next start creates a new store."""
        if self.storage is not None:
            self.crash()
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.synced_path, ignore_errors=True)

    def lose_synced_tail(self, rng: Any) -> str | None:
        """After a crash (so every byte left in the WAL was fsynced): damage the end of
        the newest segment as a disk that lied would, in a way recovery can see: zero
        or garble its last bytes, or cut it inside a record. Recovery then cuts the
        damaged tail (or refuses with CorruptLog, and the operator wipes the node)."""
        from raft.wal import SegmentScan, list_segments, read_records

        assert self.storage is None, "damage the files of a crashed node only"
        wal_dir = os.path.join(self.path, "raft-store", "wal")
        segs = list_segments(wal_dir) if os.path.isdir(wal_dir) else []
        if not segs:
            return None
        path = segs[-1][1]
        size = os.path.getsize(path)
        if size == 0:
            return None
        with open(path, "rb") as f:
            data = f.read()
        n = min(size, rng.choice([1, 7, 64, 512, 4096]))
        how = rng.choice(["zeroed", "garbled", "cut"])
        if how == "cut":
            damaged = data[: size - n]
            scan = SegmentScan(seq=segs[-1][0], path=path, size=len(damaged))
            read_records(damaged, scan)
            if scan.damage is None:
                # Cut exactly at a record boundary: recovery could not see it (outside
                # the fault model, as for Raft itself), so zero those bytes instead.
                how = "zeroed"
        if how != "cut":
            fill = bytes(n) if how == "zeroed" else bytes(rng.getrandbits(8) for _ in range(n))
            damaged = data[: size - n] + fill
        with open(path, "wb") as f:
            f.write(damaged)
        if not self._hook:
            shutil.rmtree(self.synced_path, ignore_errors=True)
            shutil.copytree(self.path, self.synced_path)
        return f"last {n} synced bytes of {os.path.basename(path)} {how}"

    def close(self) -> None:
        if self.storage is not None:
            try:
                self.storage.close()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(self.root, ignore_errors=True)


BACKENDS = {"memory": MemoryBackend, "disk": DiskBackend}
