"""The one Ready loop of the test and benchmark hosts (as etcd's rafttest interaction
environment has one `ProcessReady` for every scenario).

A host hands each Ready of a RawNode through the same steps in the same order, the order
of consensus.py's peer loop (docs/internals.md, "Peer loop"):

 1. soft state (role, leader) is seen;
 2. `messages` leave (the leader's appends may go before its own write);
 3. persist: snapshot, entries, hard state; then `sync`;
 4. `persisted_messages` leave (they needed the write above: votes, append answers);
 5. committed entries are handed to the applier;
 6. `advance`; then, if the applier finished entries already, `advance_apply_to`;
 7. the host's work after the Ready (a deferred applier, invariant checks, ...).

What differs between hosts is a hook of `ReadyHost`: where storage lives (MemoryStorage,
DiskStorage through a simulated disk), where messages go (a deque, an inbox, a byte stream
of frames), what applying means, and the simulator's fault injection, which may crash the
node at every `boundary(stage)` between two steps (its stage names are fixed here, so the
same seed chooses the same crash points).

consensus.py keeps a Ready loop of its own (the service must stay one file); a change to
the order above is made here and there.
"""

from __future__ import annotations

from typing import Any

from cita_raft_pb import eraftpb_pb2 as pb

# The fault points of a Ready, in order (tests/sim crashes a node at any of them).
READY_TAKEN = "ready taken"
MESSAGES_SENT = "messages sent"
WRITTEN = "written, not synced"
SYNCED = "synced"
PERSISTED_MESSAGES_SENT = "persisted messages sent"
HANDED_OUT = "committed entries handed out"
ADVANCED = "advanced"


class ReadyHost:
    """What one host does with the parts of a Ready. Every hook has a default, so a host
    overrides only what it needs; the driver decides the order."""

    def boundary(self, stage: str) -> None:
        """Between two steps of a Ready: a chance to crash the node (raise)."""

    def on_soft_state(self, rd: Any) -> None:
        """`rd.soft_state` is set: the role or the leader changed."""

    def send(self, msgs: list[pb.Message]) -> None:
        """Messages that may leave before this Ready is persisted (`rd.messages`)."""

    def send_persisted(self, msgs: list[pb.Message]) -> None:
        """Messages that needed this Ready persisted first (`rd.persisted_messages`)."""
        self.send(msgs)

    def persist_snapshot(self, snap: pb.Snapshot) -> None:
        """A snapshot from the leader (index > 0) to install in storage."""

    def persist_entries(self, entries: list[pb.Entry]) -> None:
        """Append (or overwrite a conflicting tail with) these entries."""

    def persist_hard_state(self, hs: pb.HardState) -> None:
        """Term, vote and commit to write."""

    def sync(self, rd: Any) -> None:
        """Make the writes of this Ready durable (the host may honour `rd.must_sync`)."""

    def apply(self, entries: list[pb.Entry]) -> int:
        """Hand committed entries to the applier. Return the index applied up to now, for
        `advance_apply_to` once the Ready is advanced; 0 when the applier runs later (it then
        calls `advance_apply_to` itself)."""
        return entries[-1].index if entries else 0

    def after_advance(self) -> None:
        """After `advance` (and `advance_apply_to`)."""


def handle_ready(raw: Any, host: ReadyHost) -> bool:
    """Handle one Ready of `raw` through `host`. False if there was none."""
    if not raw.has_ready():
        return False
    run_ready(raw, host)
    return True


def run_ready(raw: Any, host: ReadyHost) -> None:
    """Take the pending Ready of `raw` (the caller saw `has_ready()`) through every step."""
    rd = raw.ready()
    host.boundary(READY_TAKEN)
    if rd.soft_state is not None:
        host.on_soft_state(rd)
    host.send(rd.messages)
    host.boundary(MESSAGES_SENT)
    snap = rd.snapshot
    if snap is not None and snap.metadata.index > 0:
        host.persist_snapshot(snap)
    if rd.entries:
        host.persist_entries(rd.entries)
    if rd.hard_state is not None:
        host.persist_hard_state(rd.hard_state)
    host.boundary(WRITTEN)
    host.sync(rd)
    host.boundary(SYNCED)
    host.send_persisted(rd.persisted_messages)
    host.boundary(PERSISTED_MESSAGES_SENT)
    applied = host.apply(rd.committed_entries) if rd.committed_entries else 0
    host.boundary(HANDED_OUT)
    raw.advance(rd)
    host.boundary(ADVANCED)
    if applied:
        raw.advance_apply_to(applied)
    host.after_advance()


def drain(raw: Any, host: ReadyHost) -> None:
    """Handle Readies until `raw` has none."""
    while handle_ready(raw, host):
        pass


class StorageHost(ReadyHost):
    """A host whose storage is a raft Storage (MemoryStorage, DiskStorage): the writes of a
    Ready go to it as they are, and `sync()` is called on every Ready."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage

    def persist_snapshot(self, snap: pb.Snapshot) -> None:
        self.storage.apply_snapshot(snap)

    def persist_entries(self, entries: list[pb.Entry]) -> None:
        self.storage.append(entries)

    def persist_hard_state(self, hs: pb.HardState) -> None:
        self.storage.set_hardstate(hs)

    def sync(self, rd: Any) -> None:
        self.storage.sync()
