#!/usr/bin/env python3
"""consensus.py -- the Raft consensus service of a CITA-Cloud node, in Python.

A drop-in replacement for CITA-Cloud's Rust `consensus_raft`: same command
line, same `[consensus_raft]` config table, same gRPC surface, same peer
protocol (raft-rs `eraftpb` messages inside `NetworkMsg`). On every node it
fetches block proposals from the local controller while it leads, has the
controller check proposals from peers, agrees on them with the other
validators through Raft (package `raft/`), and commits each agreed proposal
with its (empty) proof to the local controller. It reaches other nodes only
through the local network service.

Greenlets (one gevent process). Each owner below creates all its fields in
its `__init__` and only its own greenlet writes them; other greenlets read
them at most and ask for a change by putting an event (a frozen dataclass,
section "Events") on the owner's queue.

peer_loop        PeerLoop (+ its LeaderDuties), queue PeerLoop.inbox
                 owns the RawNode and every write to the raft data (DiskStorage:
                 log, hard state, snapshots, applied record, abort height), the
                 role, the leader, the proposal in flight, the conf state.
                 Fed by RaftMessage, FetchedProposal, EntryApplied,
                 ApplyConfChange, SnapshotReported, PeerUnreachable, HandOff,
                 StartRaft, StopRaft, SetAbortHeight.
applier_loop     Applier, queue Applier.queue
                 owns the chain configuration and the block height raft applied;
                 CheckProposal + CommitBlock in log order. Fed by Committed,
                 EarlyCheck, SnapshotInstalled, RaftStarted, ControllerConfig.
supervisor_loop  Supervisor, queue Supervisor.events
                 owns what the controller says of the validator set (height,
                 when we stopped being a validator); decides the abort height and
                 the start/stop of raft. Fed by Reconfigure, else a CommitBlock
                 ping every SUPERVISE_SECONDS.
transport_loop   Transport, queue Transport.events
                 owns the registration with the network, the mailbook (raft id
                 -> network origin), the per-peer outboxes and senders, probes.
                 Fed by Registered, OriginLearned, OriginRefused, ProbeWanted,
                 OutboxWanted, NetworkTrouble.
sender_loop      one per raft peer (Transport): its outbox -> network.SendMsg, in
                 order; reports SnapshotReported/PeerUnreachable to the peer loop.
one-shots        fetch_proposal (GetProposal -> FetchedProposal), register
                 (-> Registered), _broadcast and _send_control (probes).
refresh_loop     HealthServicer: readiness every HEALTH_REFRESH_SECONDS (reads).
gRPC workers     the servicers: check each input, then post it to its owner.
main             Service, the composition root: start, stop, the storage
                 handle; waits for a signal or a fatal fault (fail-stop).

Metrics, loggers and their OnceLogger/rate-limit bookkeeping are sinks any
greenlet writes to. Waits go one way (the supervisor, the applier and the
gRPC workers wait for the peer loop or the transport loop, which never wait
for anyone), so no two greenlets can wait for each other.

The file reads top-down: patching, the owners, the servicers, the clients,
config and logging, the command line, main. See docs/internals.md and README.md.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def _enter_checkout_venv() -> None:
    """`./consensus.py ...` from a checkout: run under the checkout's .venv
    (made by `make setup`) as devnet.py does; without one, say in one line
    what to do instead of an ImportError traceback. Only when run as a
    script: an installed `consensus` (pip, Nix, image) has its packages."""
    here = os.path.dirname(os.path.abspath(__file__))
    venv = os.path.join(here, ".venv")
    venv_py = os.path.join(venv, "bin", "python")
    if os.path.exists(venv_py) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
        os.execv(venv_py, [venv_py, os.path.abspath(__file__), *sys.argv[1:]])
    for name in ("docopt", "gevent", "grpc", "grpc_health", "prometheus_client"):
        if importlib.util.find_spec(name) is None:
            print(f"consensus.py: the Python package {name!r} is missing: run `make setup` in {here} first",
                  file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    _enter_checkout_venv()

# --------------------------------------------------------------------------
# Patching: gevent must patch the standard library before anything else is
# imported, and grpc's gevent integration must be initialised before any
# channel or server exists: otherwise blocking gRPC calls would block the
# whole process.
# --------------------------------------------------------------------------

from gevent import monkey  # noqa: E402

monkey.patch_all()

import grpc  # noqa: E402
from grpc.experimental import gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()

import gevent  # noqa: E402

# grpc's gevent mode waits on its completion queues in gevent's native thread
# pool: one thread per server and per call in flight. The default pool of 10
# threads deadlocks as soon as more calls are pending (senders to every peer,
# controller calls, registration, the server itself), so give it room.
gevent.get_hub().threadpool.maxsize = 128
# Those pool threads hand each finished gRPC poll back through the GIL; with
# the default 5 ms switch interval a busy main greenlet delays every hand-off
# by up to 5 ms, which dominated the per-block latency.
sys.setswitchinterval(0.0005)

import dataclasses  # noqa: E402
import gzip  # noqa: E402
import logging  # noqa: E402
import logging.handlers  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402  (TOML 1.0, stdlib)
from concurrent import futures  # noqa: E402

import docopt  # noqa: E402
import gevent.event  # noqa: E402
import gevent.queue  # noqa: E402
import prometheus_client as prom  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from grpc_health.v1 import health as grpc_health_v1  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402

import raft  # noqa: E402
from cita_raft_pb import (  # noqa: E402
    common_pb2,
    controller_pb2_grpc,
    health_check_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
)
from cita_raft_pb import eraftpb_pb2 as pb  # noqa: E402
from raft.disk import DiskStorage  # noqa: E402

try:
    from _version import GIT_HASH as _BUILD_GIT_HASH  # noqa: E402  (written by the build, gitignored)
except ImportError:
    _BUILD_GIT_HASH = ""

NAME = "consensus_raft"
VERSION = "0.1.0"
AUTHORS = "CITA-Cloud Python consensus developers"
HOMEPAGE = "https://github.com/cita-cloud/consensus_raft"
HERE = os.path.dirname(os.path.abspath(__file__))

INBOX_LIMIT = 4096          # raft messages + commands queued for the peer loop
OUTBOX_LIMIT = 1024         # raft messages queued per destination
SNAPSHOT_EVERY = 1000       # applied entries between snapshots (and log compaction)
KEEP_ENTRIES = 200          # entries kept below a snapshot for followers that lag a little
SUPERVISE_SECONDS = 3.0     # as the original's main loop
REREGISTER_SECONDS = 10.0   # re-registration with the network (a restarted network forgets us)
FATAL_EXIT_SECONDS = 15.0  # after a fatal fault the process ends within this, stopped gracefully or not
BOOTSTRAP_INDEX = BOOTSTRAP_TERM = 5  # must equal the Rust service's, on every node


def u64_be(value: int) -> bytes:
    return value.to_bytes(8, "big")


def election_timeout(cfg: Config) -> float:
    return cfg.election_tick * cfg.tick_interval_in_millis / 1000.0


class StartupError(Exception):
    """The service cannot start (port in use, damaged data...): one line, exit 1."""


# --------------------------------------------------------------------------
# Events: what one greenlet asks of another owner, through that owner's queue.
# `done` (a gevent AsyncResult) is set by the owner when the caller waits.
# --------------------------------------------------------------------------

def event(cls):
    return dataclasses.dataclass(frozen=True, eq=False)(cls)


# ----- to the peer loop (PeerLoop.inbox) -----

@event
class RaftMessage:          # ProcessNetworkMsg: a checked raft message for this node
    msg: pb.Message


@event
class FetchedProposal:      # fetch_proposal: the controller's proposal, None if the fetch failed
    proposal: common_pb2.Proposal | None


@event
class EntryApplied:         # applier: entry `index` is applied; the chain configuration after it (data)
    index: int
    conf_state: pb.ConfState | None
    data: bytes
    block_time: float | None = None   # monotonic time a block was committed with it (leader pacing)


@event
class ApplyConfChange:      # applier: a committed ConfChangeV2; done gets the new ConfState
    entry: pb.Entry
    done: gevent.event.AsyncResult


@event
class SnapshotReported:     # a sender: the snapshot to `to` went out (ok) or was lost
    to: int
    ok: bool


@event
class PeerUnreachable:      # a sender: a message to `to` could not be sent
    to: int


@event
class HandOff:              # main, before a graceful stop: done gets True once leadership moved
    done: gevent.event.AsyncResult


@event
class StartRaft:            # supervisor: start raft (bootstrapping an empty store) with this chain configuration
    config: common_pb2.ConsensusConfiguration
    done: gevent.event.AsyncResult


@event
class StopRaft:             # supervisor or main: finish the current Ready, drop the RawNode
    done: gevent.event.AsyncResult


@event
class SetAbortHeight:       # supervisor: persist (fsync) a new abort height
    height: int
    done: gevent.event.AsyncResult


# ----- to the applier (Applier.queue) -----

@event
class Committed:            # peer loop: committed entries, in log order
    entries: list


@event
class EarlyCheck:           # peer loop (follower): CheckProposal for the newest proposal before it commits
    proposal: common_pb2.Proposal


@event
class SnapshotInstalled:    # peer loop: a leader's snapshot; its chain configuration (None if it has none)
    index: int
    conf_state: pb.ConfState
    config: common_pb2.ConsensusConfiguration | None


@event
class RaftStarted:          # peer loop: raft started with `config` (the controller's, at the controller's height)
    config: common_pb2.ConsensusConfiguration
    bootstrapped: common_pb2.ConsensusConfiguration | None  # the chain configuration of a new bootstrap
    recommit: list          # Proposals applied by raft that a controller behind us may have lost


@event
class ControllerConfig:     # supervisor, while raft runs: the controller's configuration (maybe newer than ours)
    config: common_pb2.ConsensusConfiguration


# ----- to the supervisor (Supervisor.events) -----

@event
class Reconfigure:          # Reconfigure from the controller (the latest wins)
    config: common_pb2.ConsensusConfiguration


# ----- to the transport (Transport.events) -----

@event
class Registered:           # register: the network's answer (a status code), or the call failed (error)
    code: int | None
    error: Exception | None


@event
class OriginLearned:        # ProcessNetworkMsg: raft peer `peer` reaches us from network origin `origin`
    peer: int
    origin: int
    done: gevent.event.AsyncResult


@event
class OriginRefused:        # a refresh: the peer at `origin` is not `peer` (forget it, probe again)
    peer: int
    origin: int


@event
class ProbeWanted:          # a sender without a route: ask every node for its raft id (at most once a second)
    pass


@event
class OutboxWanted:         # peer loop: the first message to a peer without an outbox yet
    message: pb.Message


@event
class NetworkTrouble:       # a sender: a network call failed at `at` (monotonic): register again now
    at: float


# --------------------------------------------------------------------------
# The owners
# --------------------------------------------------------------------------

ROLE_CODES = {raft.StateRole.Follower: 0, raft.StateRole.Candidate: 1, raft.StateRole.Leader: 2,
              raft.StateRole.PreCandidate: 3}


class PeerLoop:
    """The peer loop greenlet: the only owner of the RawNode and the only writer
    of the raft data (log, hard state, snapshots, applied record, abort height).
    It runs for the life of the service; raft itself runs between a StartRaft
    and a StopRaft. Per round: the events waiting in `inbox` (at most 256),
    the ticks that are due, the leader's duties, then one Ready (persist,
    send, hand committed entries to the applier, advance)."""

    def __init__(self, service: Service):
        self.service = service
        self.cfg, self.log, self.metrics = service.cfg, service.log, service.metrics
        self.id, self.address = service.id, service.address
        self.once = OnceLogger(self.log)
        self.inbox = gevent.queue.Queue()
        self.node = None                   # the RawNode while raft runs
        self.conf_state = pb.ConfState()   # raft's configuration as applied here
        self.raft_status = None            # the last raft Status (the readiness check reads it)
        self.role = None                   # raft's role here (StateRole)
        self.leader = 0                    # the raft leader known here
        self.deferred: list = []           # applier results that arrived while raft was stopped
        self.duties = LeaderDuties(self)   # proposal in flight, pending conf change, pacing, transfers

    @property
    def storage(self) -> DiskStorage:
        return self.service.storage

    def post(self, event) -> None:
        """Queue an internal event: never dropped (each is an answer some state
        waits for: a fetch in flight, an applied entry, a stop)."""
        self.inbox.put(event)

    def offer(self, event) -> bool:
        """Queue an event from the network: dropped (False) when INBOX_LIMIT are
        waiting, so a flood of peer messages cannot grow memory without bound."""
        if self.inbox.qsize() >= INBOX_LIMIT:
            return False
        self.inbox.put(event)
        return True

    def call(self, make):
        """Post `make(done)` and wait for the answer (from other greenlets only)."""
        done = gevent.event.AsyncResult()
        self.post(make(done))
        return done.get()

    def deliver_raft(self, msg) -> bool:
        """From ProcessNetworkMsg: never blocks; drops when raft is not running
        or the loop is overloaded (raft retransmits)."""
        if not self.service.peer_running():
            self.metrics.messages.labels("in", "dropped_not_running").inc()
            return False
        if not self.offer(RaftMessage(msg)):
            self.metrics.messages.labels("in", "dropped_overload").inc()
            return False
        self.metrics.messages.labels("in", "received").inc()
        self.metrics.contact(getattr(msg, "from"))
        return True

    # ----- the loop -----

    def peer_loop(self) -> None:
        tick_s = self.cfg.tick_interval_in_millis / 1000.0
        next_tick = 0.0
        while True:
            if self.node is None:
                self.handle(self.inbox.get())
                next_tick = time.monotonic() + tick_s
                continue
            try:
                event = self.inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
            except gevent.queue.Empty:
                event = None
            n = 0
            while event is not None and self.node is not None:
                self.handle(event)
                n += 1
                if n >= 256:
                    break
                try:
                    event = self.inbox.get_nowait()
                except gevent.queue.Empty:
                    event = None
            if self.node is None:
                continue  # raft stopped
            now = time.monotonic()
            if now >= next_tick:
                # One tick per wake-up, however late (etcd's ticker drops the ticks
                # a busy receiver missed). Catching up would run a whole election
                # timeout at once after a stall (a paused VM, a starved CPU, a slow
                # disk) and campaign before reading the leader's heartbeats queued
                # meanwhile: raft's clock waits with the process instead.
                self.node.tick()
                late = now - next_tick
                next_tick += tick_s
                if next_tick <= now:
                    next_tick = now + tick_s
                    if late >= election_timeout(self.cfg):
                        self.log.warning("the peer loop ran %.1f s late (%d ticks not run): raft's clock waited "
                                         "instead of starting an election; is the host overloaded?",
                                         late, int(late / tick_s))
                self.on_tick()
            elif self.role == raft.StateRole.Leader:
                self.duties.run(self.node.status())
            self.handle_ready()

    def handle(self, event) -> None:
        running = self.node is not None
        match event:
            case RaftMessage(msg) if running:
                self.step(msg)
            case FetchedProposal(proposal):
                self.duties.propose_block(proposal)
            case EntryApplied() | ApplyConfChange() if not running:
                self.deferred.append(event)   # as the old inbox kept them: applied once raft runs again
            case EntryApplied():
                self.on_applied(event)
            case ApplyConfChange(entry, done):
                self.apply_conf_change(entry, done)
            case HandOff(done):
                self.duties.handoff(done)
            case SnapshotReported(to, ok) if running:
                try:
                    self.node.report_snapshot(to, ok)
                except raft.errors.RaftError:
                    return  # no longer a peer
                self.log.info("snapshot to raft peer %d %s", to, "sent" if ok else "failed, will retry")
            case PeerUnreachable(to) if running:
                try:
                    self.node.report_unreachable(to)
                except raft.errors.RaftError:
                    pass
            case StartRaft(config, done):
                if not running and not self.service.stopping.is_set():
                    self.start_raft(config)
                done.set(self.node is not None)
            case StopRaft(done):
                self.stop_raft()
                done.set(True)
            case SetAbortHeight(height, done):
                self.storage.set_abort_height(height)
                done.set(height)
            case RaftMessage() | SnapshotReported() | PeerUnreachable():
                pass  # for a raft that stopped
            case _:
                raise TypeError(f"the peer loop got an unknown event {event!r}")

    def step(self, msg) -> None:
        try:
            self.node.step(msg)
        except raft.errors.StepPeerNotFound:
            # A response from a peer no longer (or not yet) in the configuration.
            self.metrics.messages.labels("in", "unknown_peer").inc()
        except raft.errors.ProposalDropped as e:
            # An expected answer: a forwarded proposal we cannot take now (raft-rs drops it too).
            self.log.debug("raft rejected a message from %d: %s", getattr(msg, "from"), e)
        except raft.errors.StorageError:
            raise
        except raft.errors.RaftError as e:
            # Any other error from step means raft reached a state it forbids (a
            # conflict below the commit index, a local message type that passed the
            # boundary, ...): raft-rs panics; we fail-stop (one CRIT line, exit 1).
            raise raft.errors.RaftInvariantError(
                f"step: {type(e).__name__} on a {enum_name(pb.MessageType, msg.msg_type)} from "
                f"{getattr(msg, 'from')} (term {msg.term}, index {msg.index}): {e}") from e

    def on_applied(self, ev: EntryApplied) -> None:
        self.storage.set_applied(ev.index, ev.conf_state, ev.data)
        self.node.advance_apply_to(ev.index)
        if ev.conf_state is not None:
            # A member added by this change accepts only a snapshot that
            # lists it: keep one at the change.
            self.compact(ev.index, ev.conf_state, ev.data, keep_log=True)
        self.metrics.applied_index.set(ev.index)
        if ev.index - self.storage.first_index() >= SNAPSHOT_EVERY + KEEP_ENTRIES:
            self.compact(ev.index, ev.conf_state, ev.data)
        if ev.block_time is not None:
            self.duties.on_block(ev.block_time)

    def apply_conf_change(self, entry, done) -> None:
        cc = pb.ConfChangeV2.FromString(entry.data)
        try:
            cs = self.node.apply_conf_change(cc)
        except raft.errors.RaftError as e:
            self.log.error("cannot apply conf change at index %d: %s", entry.index, e)
            cs = self.conf_state
        self.conf_state = cs
        self.duties.conf_change_settled()
        self.log.info("applied conf change at index %d: voters %s%s", entry.index, sorted(cs.voters),
                      f", outgoing {sorted(cs.voters_outgoing)}" if cs.voters_outgoing else "")
        done.set(cs)

    def compact(self, applied: int, conf_state, data: bytes, keep_log: bool = False) -> None:
        """Snapshot at `applied` with the chain configuration as it was at that
        entry (`data`; the applier may be further on already), then drop the
        log below it but for KEEP_ENTRIES for followers that lag a little."""
        cs = conf_state if conf_state is not None else self.conf_state
        try:
            self.storage.create_snapshot(applied, cs, data)
        except raft.errors.SnapshotTemporarilyUnavailable:
            return  # a snapshot at or above `applied` exists already
        if keep_log:
            return
        target = max(self.storage.first_index(), applied - KEEP_ENTRIES)
        self.storage.compact(target)
        self.log.debug("snapshot at index %d, log compacted below %d", applied, target)

    # ----- start and stop of raft (asked by the supervisor) -----

    def storage_initialized(self) -> bool:
        st = self.storage.initial_state()
        return bool(st.conf_state.voters or st.hard_state.term or self.storage.last_index())

    def start_raft(self, config) -> None:
        bootstrapped, started_empty = None, False
        if not self.storage_initialized():
            if self.address not in config.validators:
                return
            started_empty = True
            bootstrapped = self.bootstrap(config)
        recommit = [] if bootstrapped else applied_blocks_above(self.storage, self.service.applier.block_height,
                                                                 config.height)
        raft_cfg = raft.Config(id=self.id, election_tick=self.cfg.election_tick,
                               heartbeat_tick=self.cfg.heartbeat_tick, applied=self.storage.applied_index(),
                               check_quorum=self.cfg.check_quorum, pre_vote=self.cfg.pre_vote,
                               max_size_per_msg=1024 * 1024, max_inflight_msgs=256,
                               lost_state=lost_state(self.storage, config, started_empty,
                                                     self.cfg.raft_data_path, self.log))
        self.node = raft.RawNode(raft_cfg, self.storage, logger=logging.getLogger("raft"))
        self.conf_state = self.storage.initial_state().conf_state
        # The applier adopts a bootstrap's configuration and recommits what the
        # controller lost before it applies anything this raft commits.
        self.service.applier.post(RaftStarted(config, bootstrapped, recommit))
        if bootstrapped is not None and config.validators[0] == self.address:
            self.node.campaign()   # the first validator starts the first election at once
        self.metrics.peer_running.set(1)
        st = self.node.status()
        self.set_raft_gauges(st)
        self.metrics.applied_index.set(st.applied)
        deferred, self.deferred = self.deferred, []
        for event in deferred:
            self.handle(event)
        height = bootstrapped.height if bootstrapped is not None else self.service.applier.block_height
        self.log.info("raft started: id %d, applied %d, block height %d, voters %s", self.id,
                      self.storage.applied_index(), height, sorted(self.conf_state.voters))

    def bootstrap(self, config) -> common_pb2.ConsensusConfiguration:
        """An empty data dir: start from the synthetic snapshot every node of the
        chain derives identically (index 5, term 5, all validators as voters).
        Returns the chain configuration it records as applied."""
        voters = sorted({raft.peer_id(v) for v in config.validators})
        snap = pb.Snapshot(metadata=pb.SnapshotMetadata(conf_state=pb.ConfState(voters=voters),
                                                        index=BOOTSTRAP_INDEX, term=BOOTSTRAP_TERM))
        self.storage.apply_snapshot(snap)
        chain = common_pb2.ConsensusConfiguration(height=config.height, block_interval=config.block_interval,
                                                  validators=config.validators)
        self.storage.set_applied(BOOTSTRAP_INDEX, snap.metadata.conf_state, chain.SerializeToString())
        self.storage.sync()
        self.log.info("bootstrapped raft at index %d term %d with %d validators at height %d",
                      BOOTSTRAP_INDEX, BOOTSTRAP_TERM, len(voters), config.height)
        return chain

    def stop_raft(self) -> None:
        if self.node is None:
            return
        self.handle_ready()
        self.node = None
        self.metrics.peer_running.set(0)
        self.metrics.role.set(0)

    # ----- ticks -----

    def set_raft_gauges(self, st) -> None:
        self.metrics.term.set(st.term)
        self.metrics.commit_index.set(st.commit)
        self.metrics.last_index.set(st.last_index)
        self.metrics.set_progress(st)
        self.metrics.withholding_votes.set(1 if self.node.raft.withholding_votes else 0)
        self.raft_status = st

    def on_tick(self) -> None:
        # With block_interval 0 the next block's append follows the commit within
        # milliseconds and carries the new commit index: skip the extra round of
        # empty appends (and their responses) that would only announce it. Any other
        # interval announces it at once (a heartbeat is also a fallback).
        self.node.skip_bcast_commit(self.service.applier.config.block_interval == 0)
        st = self.node.status()
        self.set_raft_gauges(st)
        if st.role == raft.StateRole.Leader:
            self.duties.run(st)

    # ----- Ready handling (docs/internals.md, "Peer loop per Ready") -----

    def handle_ready(self) -> None:
        node = self.node
        if not node.has_ready():
            return
        rd = node.ready()
        transport, applier = self.service.transport, self.service.applier
        if rd.soft_state is not None:
            self.on_soft_state(rd.soft_state)
        if rd.messages:
            transport.send_raft(rd.messages)
            # Let the senders hand these to gRPC before the fsync below blocks
            # this process: the leader's disk write overlaps the followers'.
            gevent.sleep(0)
        if rd.snapshot is not None and rd.snapshot.metadata.index:
            self.install_snapshot(rd.snapshot)
        if rd.entries:
            self.storage.append(rd.entries)
        if rd.hard_state is not None:
            self.storage.set_hardstate(rd.hard_state)
            # The commit gauge moves here, before anything it covers is applied:
            # a scrape never sees applied_index above commit_index.
            self.metrics.commit_index.set(rd.hard_state.commit)
        # fsync only what raft needs durable before it answers anyone: entries, a
        # snapshot, a new term or vote (must_sync, as etcd's MustSync). A new commit
        # index alone is written and goes to disk with the next sync; a restart that
        # finds an older one learns it again from the leader (and the applied record
        # that follows it in the WAL can never survive without it).
        if rd.must_sync:
            t0 = time.perf_counter()
            self.storage.sync()
            self.metrics.fsync.observe((time.perf_counter() - t0) * 1000)
        if rd.persisted_messages:
            transport.send_raft(rd.persisted_messages)
        if rd.committed_entries:
            applier.post(Committed(list(rd.committed_entries)))
        if rd.entries and self.role == raft.StateRole.Follower:
            self.queue_early_check(rd.entries)
        node.advance(rd)

    def queue_early_check(self, entries) -> None:
        """Ask the applier to check a follower's newest proposal before it commits.

        CheckProposal then runs while raft waits for the commit (one round trip,
        or the next block at block_interval 0), not between the commit and
        CommitBlock; the applier skips it at commit time if the same proposal
        passed. Queued behind the committed entries, so it runs after the
        controller has the parent block."""
        for entry in reversed(entries):
            if entry.entry_type == pb.EntryNormal and entry.data:
                try:
                    proposal = common_pb2.Proposal.FromString(entry.data)
                except Exception:
                    return   # the applier reports it when it commits
                self.service.applier.post(EarlyCheck(proposal))
                return

    def on_soft_state(self, ss) -> None:
        st = self.node.status()
        if ss.role != self.role:
            campaigning = (raft.StateRole.Candidate, raft.StateRole.PreCandidate)
            if ss.role in campaigning and self.role not in campaigning:
                self.metrics.elections.inc()
            self.log.info("became %s term=%d index=%d", ss.role.name.lower(), st.term, st.last_index)
            self.duties.on_role(ss.role)
            self.role = ss.role
            self.metrics.role.set(ROLE_CODES.get(ss.role, 0))
        if ss.leader_id != self.leader:
            if ss.leader_id:
                self.log.info("leader is %d term=%d", ss.leader_id, st.term)
            self.metrics.leader_changes.inc()
            self.leader = ss.leader_id
            self.metrics.set_leader(ss.leader_id, self.id)

    def install_snapshot(self, snap) -> None:
        """A snapshot from the leader: the chain configuration at its index."""
        self.storage.apply_snapshot(snap)
        config = common_pb2.ConsensusConfiguration.FromString(snap.data) if snap.data else None
        # The applier takes it in order, after what it is applying now.
        self.service.applier.post(SnapshotInstalled(snap.metadata.index, snap.metadata.conf_state, config))
        self.conf_state = snap.metadata.conf_state
        self.duties.conf_change_settled()
        self.log.info("installed snapshot index=%d term=%d height=%s voters %s", snap.metadata.index,
                      snap.metadata.term, config.height if config else "?", sorted(snap.metadata.conf_state.voters))



def applied_blocks_above(storage: DiskStorage, block_height: int, controller_height: int) -> list:
    """The blocks raft applied above the controller's height (it lost them in
    a crash), from our log, in order: the applier commits them again."""
    if block_height <= controller_height:
        return []
    first, last = storage.first_index(), storage.applied_index()
    if last < first:
        return []
    try:
        entries = storage.entries(first, last + 1)
    except raft.errors.RaftError:
        return []
    blocks = []
    for e in entries:
        if e.entry_type != pb.EntryNormal or not e.data:
            continue
        try:
            proposal = common_pb2.Proposal.FromString(e.data)
        except Exception:
            continue
        if proposal.height > controller_height:
            blocks.append(proposal)
    return blocks

def lost_state(storage: DiskStorage, config, started_empty: bool, data_path: str, log: logging.Logger) -> bool:
    """Did this node lose durable raft state? Then it may have voted in a term
    it no longer remembers, and raft must start with Config.lost_state (it
    withholds votes until it is safe again). Known exactly in two cases: the
    store was empty (fresh or wiped data dir) while the chain is past genesis,
    or the WAL recovery cut damaged data that had been synced."""
    if getattr(storage, "recovery_lost_synced", False):
        log.warning("raft data lost: WAL recovery cut damaged data that had been synced (a disk that "
                         "lied or was damaged); this node may have voted in a term it no longer remembers, "
                         "so it starts with lost_state and withholds its vote until that is safe")
        return True
    if started_empty and config.height > 0:
        log.warning("raft data lost or never there: the raft data dir %s was empty while the chain is at "
                         "height %d (past genesis); if this node was a validator before, it may have voted in "
                         "a term it no longer remembers, so it starts with lost_state and withholds its vote "
                         "until that is safe", os.path.abspath(data_path), config.height)
        return True
    return False


class LeaderDuties:
    """The leader's half of the peer loop, on the peer loop's greenlet (split
    out for size; PeerLoop calls it): one block proposal at a time (fetched
    from the controller by a one-shot greenlet), the conf change that turns
    raft's voters into the chain's validators, leadership transfers (a stall,
    our own removal, a graceful stop)."""

    def __init__(self, peer: PeerLoop):
        self.peer, self.service = peer, peer.service
        self.cfg, self.log, self.metrics, self.id = peer.cfg, peer.log, peer.metrics, peer.id
        self.once = OnceLogger(self.log)
        self.proposal_in_flight = None     # (height, proposed at) while our proposal is not applied
        self.fetching = False              # a fetch_proposal greenlet runs
        self.cc_pending = False            # our conf change is proposed and not applied yet
        self.last_progress = 0.0           # monotonic time the leader last made progress
        self.last_block_time = 0.0         # monotonic time the last block was committed (pacing)
        self.own_proposal = (0, b"", 0.0)  # (height, data, proposed at) of our latest proposal
        self.handoff_waiters: list[gevent.event.AsyncResult] = []
        self._validator_ids = ((), frozenset())

    def on_role(self, role) -> None:
        """The peer loop's role changed."""
        if role == raft.StateRole.Leader:
            self.last_progress = time.monotonic()
            self.last_block_time = 0.0
        else:
            self.proposal_in_flight = None
            self.cc_pending = False
            for w in self.handoff_waiters:
                w.set(True)
            self.handoff_waiters = []

    def on_block(self, block_time: float) -> None:
        """The applier committed a block at `block_time` (pacing by block_interval)."""
        self.last_block_time = block_time

    def conf_change_settled(self) -> None:
        """A conf change (ours or not) or a snapshot was applied."""
        self.cc_pending = False

    def block_interval(self) -> float:
        return float(self.service.applier.config.block_interval)

    def run(self, st) -> None:
        """On every tick of a leader, and after each round of events."""
        now = time.monotonic()
        if self.service.stopping.is_set():
            return
        cs = self.peer.conf_state
        if self.maybe_conf_change(st, cs):
            return
        # Only one block at a time, and only once everything in the log is
        # applied, so the controller's height tells the next height exactly.
        if self.proposal_in_flight is not None:
            height, started = self.proposal_in_flight
            if self.service.applier.block_height >= height:
                self.proposal_in_flight = None
                self.last_progress = now
            elif now - started > max(election_timeout(self.cfg), 4 * self.block_interval()):
                self.log.warning("proposal for height %d not committed in time, fetching again", height)
                self.proposal_in_flight = None
            else:
                return
        # The original transfers after 4 x block_interval without a valid
        # proposal; never sooner than two election timeouts, so that a slow
        # controller or block_interval 0 does not make leadership flap.
        stall = max(4 * self.block_interval(), 2 * election_timeout(self.cfg))
        if st.applied < st.last_index or self.cc_pending:
            # Waiting for our own controller to commit what is agreed: a
            # transfer would not help (and must not count as a stall).
            self.last_progress = now
            return
        if now - self.last_progress > stall and not cs.voters_outgoing:
            target = transfer_target(st, self.id, set(cs.voters))
            if target:
                self.log.warning("no valid proposal for %.1f s, transferring leadership to %d", stall, target)
                self.peer.node.transfer_leader(target)
                self.last_progress = now
                return
        if self.fetching:
            return
        if now - self.last_block_time < self.block_interval():
            return
        self.fetching = True
        self.service.spawn(self.fetch_proposal)

    def fetch_proposal(self) -> None:
        """A one-shot greenlet: GetProposal, answered to the peer loop as FetchedProposal."""
        try:
            code, proposal = self.service.controller.get_proposal()
        except RpcFailed as e:
            self.once.fail("get_proposal", "%s, will retry", e, extra=ctx(tag="controller"))
            self.metrics.controller_errors.labels("GetProposal").inc()
            gevent.sleep(min(1.0, max(0.1, self.block_interval())))
            self.peer.post(FetchedProposal(None))
            return
        if code not in (SUCCESS, NO_TRANSACTION) or proposal is None:
            self.once.fail("get_proposal", "controller GetProposal returned %s, will retry", code_name(code))
            gevent.sleep(min(1.0, max(0.1, self.block_interval())))
            self.peer.post(FetchedProposal(None))
            return
        self.once.ok("get_proposal", "controller GetProposal works again")
        self.peer.post(FetchedProposal(proposal))

    def propose_block(self, proposal) -> None:
        self.fetching = False
        node = self.peer.node
        if proposal is None or node is None:
            return
        st = node.status()
        if st.role != raft.StateRole.Leader:
            return
        height = self.service.applier.block_height
        if proposal.height != height + 1:
            self.log.debug("dropping proposal with height %d (raft height %d)", proposal.height, height)
            self.metrics.proposals.labels("wrong_height").inc()
            return
        try:
            node.propose(proposal.SerializeToString())
        except raft.errors.ProposalDropped as e:
            self.metrics.proposals.labels("dropped").inc()
            self.log.debug("proposal for height %d dropped: %s", proposal.height, e)
            return
        self.metrics.proposals.labels("proposed").inc()
        now = time.monotonic()
        self.proposal_in_flight = (proposal.height, now)
        # Remember what we proposed: our own controller made it, so applying
        # it needs no CheckProposal round trip (the controller would answer 0
        # from its cache anyway), and its commit latency is measured.
        self.own_proposal = (proposal.height, proposal.data, now)
        self.last_progress = now
        self.log.debug("proposed block %d at index %d", proposal.height, st.last_index + 1)

    def maybe_conf_change(self, st, cs) -> bool:
        """Propose the ConfChangeV2 that turns the raft voters into the chain's
        validators. True while a change is in progress (no blocks meanwhile)."""
        if self.cc_pending:
            return True
        if cs.voters_outgoing:
            return True  # joint: raft leaves it automatically
        target = self.validator_ids()
        current = set(cs.voters)
        if not target or target == current:
            return False
        if st.applied < st.last_index:
            return True  # let what is in the log be applied first
        added, removed = target - current, current - target
        if added == target and removed == current:
            removed = set()  # replace-all: first add every new validator, then remove the old
        if self.id in removed:
            dest = transfer_target(st, self.id, target & current)
            if dest:
                self.log.info("leader %d is being removed: transferring leadership to %d first", self.id, dest)
                self.peer.node.transfer_leader(dest)
            return True
        changes = [pb.ConfChangeSingle(change_type=pb.AddNode, node_id=n) for n in sorted(added)]
        changes += [pb.ConfChangeSingle(change_type=pb.RemoveNode, node_id=n) for n in sorted(removed)]
        try:
            self.peer.node.propose_conf_change(pb.ConfChangeV2(transition=pb.Auto, changes=changes))
        except raft.errors.RaftError as e:
            self.log.debug("conf change not proposed: %s", e)
            return True
        self.cc_pending = True
        self.log.info("proposed conf change: add %s, remove %s", sorted(added), sorted(removed))
        return True

    def validator_ids(self) -> frozenset:
        """Raft ids of the chain's validators (SipHash is costly in Python:
        computed again only when the validator list changes)."""
        validators = tuple(self.service.applier.config.validators)
        if self._validator_ids[0] != validators:
            self._validator_ids = (validators, frozenset(raft.peer_id(v) for v in validators))
        return self._validator_ids[1]

    def handoff(self, done) -> None:
        """Before a graceful stop: hand leadership to an up-to-date validator
        so the chain does not wait an election timeout."""
        node = self.peer.node
        st = node.status() if node is not None else None
        if st is None or st.role != raft.StateRole.Leader:
            done.set(False)
            return
        target = transfer_target(st, self.id, set(self.peer.conf_state.voters))
        if not target:
            done.set(False)
            return
        self.log.info("shutting down: transferring leadership to %d", target)
        self.peer.node.transfer_leader(target)
        self.handoff_waiters.append(done)


def transfer_target(st, me: int, allowed: set[int]) -> int:
    """An up-to-date follower in `allowed`: Replicate state and fully matched."""
    candidates = [pid for pid, (match, _next, state) in st.progress.items()
                  if pid != me and pid in allowed and match == st.last_index and str(state).endswith("Replicate")]
    return sorted(candidates)[0] if candidates else 0


class Applier:
    """The applier greenlet: committed entries -> the controller, in log order
    (CheckProposal unless already checked, then CommitBlock). Owns the
    replicated state machine: the chain configuration at the last applied
    block (as the Rust service's snapshot data) and the block height raft
    applied. Reports each applied entry to the peer loop (EntryApplied)."""

    def __init__(self, service: Service, applied_data: bytes = b""):
        self.service = service
        self.log, self.metrics, self.controller = service.log, service.metrics, service.controller
        self.once = OnceLogger(self.log)
        self.queue = gevent.queue.Queue()
        self.config = common_pb2.ConsensusConfiguration()
        if applied_data:
            self.config = common_pb2.ConsensusConfiguration.FromString(applied_data)
        self.block_height = self.config.height   # height of the last block applied through raft
        self.prechecked = (0, b"")                # (height, data) the controller accepted before it committed

    def post(self, event) -> None:
        self.queue.put(event)

    def applier_loop(self) -> None:
        service = self.service
        while True:
            match self.queue.get():
                case Committed(entries):
                    for entry in entries:
                        if service.stopping.is_set() and service.fatal:
                            return
                        self.apply_entry(entry)
                case EarlyCheck(proposal):
                    self.early_check(proposal)
                case SnapshotInstalled(index, conf_state, config):
                    if config is not None:
                        self.config = config
                        self.set_height(max(self.block_height, config.height))
                    service.peer.post(EntryApplied(index, conf_state, self.config.SerializeToString()))
                case RaftStarted(config, bootstrapped, recommit):
                    self.on_raft_started(config, bootstrapped, recommit)
                case ControllerConfig(config):
                    self.on_controller_config(config)
                case event:
                    raise TypeError(f"the applier got an unknown event {event!r}")

    def set_height(self, height: int) -> None:
        self.block_height = height
        self.metrics.block_height.set(height)

    def on_raft_started(self, config, bootstrapped, recommit) -> None:
        """Adopt a bootstrap's configuration; commit again the blocks raft applied
        that the controller lost (it is at config.height); a store without a
        chain configuration takes the controller's."""
        if bootstrapped is not None:
            self.config = bootstrapped
            self.block_height = bootstrapped.height
        for proposal in recommit:
            if config.height < proposal.height <= self.block_height:
                self.log.info("recommitting block %d after restart (controller is at %d)", proposal.height,
                              config.height)
                self.commit_to_controller(proposal, check=True)
        if not self.config.validators:
            self.config = config
        self.metrics.block_height.set(self.block_height)

    def on_controller_config(self, config) -> None:
        """A Reconfigure or ping while raft runs (the original dropped it): adopt
        the validators and interval when they are at least as new as our last
        block. A controller that synced blocks from peers is ahead of raft:
        those heights are committed there already, so raft's height moves up
        with it and the next proposal has the right height."""
        if config.height < self.block_height:
            return
        self.set_height(config.height)
        self.config = common_pb2.ConsensusConfiguration(
            height=self.block_height, block_interval=config.block_interval, validators=config.validators)

    def early_check(self, proposal) -> None:
        """CheckProposal for the next height before it commits (see PeerLoop.queue_early_check).
        Only when the controller should have its parent (we applied height-1) and
        nothing else waits: otherwise the commit-time check does it. A failure
        here only means the commit-time check runs as usual."""
        if proposal.height != self.block_height + 1 or not self.queue.empty() or \
                self.prechecked == (proposal.height, proposal.data):
            return
        try:
            code = self.controller.check_proposal(proposal)
        except RpcFailed as e:
            self.log.debug("early CheckProposal height=%d failed: %s; checking when it commits", proposal.height, e)
            self.metrics.early_checks.labels("failed").inc()
            return
        if code == SUCCESS:
            self.prechecked = (proposal.height, proposal.data)
            self.metrics.early_checks.labels("accepted").inc()
        else:
            self.log.debug("early CheckProposal height=%d returned %s; checking again when it commits",
                           proposal.height, code_name(code))
            self.metrics.early_checks.labels("rejected").inc()

    def apply_entry(self, entry) -> None:
        peer = self.service.peer
        conf_state, block_time = None, None
        if entry.entry_type == pb.EntryConfChangeV2:
            conf_state = peer.call(lambda done: ApplyConfChange(entry, done))
        elif entry.entry_type == pb.EntryConfChange:
            self.log.error("ignoring a ConfChange V1 entry at index %d: this chain uses ConfChangeV2 only",
                           entry.index)
        elif entry.data:
            try:
                proposal = common_pb2.Proposal.FromString(entry.data)
            except Exception:
                self.log.error("entry %d is not a Proposal (%d bytes): skipped", entry.index, len(entry.data))
                proposal = None
            if proposal is not None and proposal.height > self.block_height:
                own_height, own_data, started = peer.duties.own_proposal
                ours = own_height == proposal.height and own_data == proposal.data
                checked = self.prechecked == (proposal.height, proposal.data)
                self.commit_to_controller(proposal, check=not (ours or checked))
                self.set_height(max(self.block_height, proposal.height))
                block_time = time.monotonic()
                if ours:
                    self.metrics.commit_latency.observe((block_time - started) * 1000)
        peer.post(EntryApplied(entry.index, conf_state, self.config.SerializeToString(), block_time))

    def commit_to_controller(self, proposal, check: bool) -> bool:
        """CheckProposal then CommitBlock (empty proof). Transient failures are
        retried with backoff until they succeed: the block is agreed and must
        not be lost. A definite rejection is logged and skipped (the
        controller will sync the block from its peers)."""
        delay = 0.1
        h = proposal.height
        stopping = self.service.stopping
        while not stopping.is_set():
            try:
                if check:
                    code = self.controller.check_proposal(proposal)
                    if code not in (SUCCESS, PROPOSAL_TOO_LOW):
                        if is_transient(code):
                            raise _Retry(f"controller CheckProposal height={h} returned {code_name(code)}")
                        self.log.error("controller rejected the agreed block height=%d: CheckProposal returned %s;"
                                       " skipping it (the controller syncs it from peers)", h, code_name(code))
                        return False
                code, config = self.controller.commit_block(proposal, b"")
                if code != SUCCESS:
                    if is_transient(code):
                        raise _Retry(f"controller CommitBlock height={h} returned {code_name(code)}")
                    self.log.error("controller CommitBlock height=%d returned %s; skipping it", h, code_name(code))
                    return False
                self.once.ok("commit", f"controller accepts blocks again at height {h}")
                if config is not None:
                    self.config = common_pb2.ConsensusConfiguration(
                        height=h, block_interval=config.block_interval, validators=config.validators)
                self.log.info("committed block height=%d", h)
                return True
            except (RpcFailed, _Retry) as e:
                self.metrics.controller_errors.labels("CommitBlock").inc()
                self.once.fail("commit", "%s, will retry", e, extra=ctx(tag="controller"))
            stopping.wait(delay)
            delay = min(delay * 2, 3.0)
        return False


class _Retry(Exception):
    pass


class Supervisor:
    """The supervisor greenlet: asks the controller for the chain configuration
    (CommitBlock ping every SUPERVISE_SECONDS, or takes a Reconfigure), and from
    the validator set decides whether raft runs here: starts it, keeps it
    through our own removal (abort height), stops it. The peer loop does it."""

    def __init__(self, service: Service):
        self.service = service
        self.log, self.address = service.log, service.address
        self.once = OnceLogger(self.log)
        self.events = gevent.queue.Queue()
        self.controller_height = 0             # latest height the controller told us
        self.nonvalidator_since: int | None = None  # first height our controller said we are no validator
        self.seen_as_validator = False         # this process saw a configuration with us as a validator

    def post(self, event) -> None:
        self.events.put(event)

    def supervisor_loop(self) -> None:
        config = None
        while not self.service.stopping.is_set():
            self.supervise_once(config)
            config = self.next_reconfigure()

    def next_reconfigure(self):
        """The latest Reconfigure that arrives within SUPERVISE_SECONDS, or None."""
        try:
            event = self.events.get(timeout=SUPERVISE_SECONDS)
        except gevent.queue.Empty:
            return None
        while not self.events.empty():
            event = self.events.get_nowait()   # the latest Reconfigure wins
        match event:
            case Reconfigure(config):
                return config
            case _:
                raise TypeError(f"the supervisor got an unknown event {event!r}")

    def supervise_once(self, config=None) -> None:
        if config is None:
            try:
                code, config = self.service.controller.ping()
            except RpcFailed as e:
                self.once.fail("ping", "cannot get the chain configuration (CommitBlock ping): %s; will retry",
                               e, extra=ctx(tag="controller"))
                return
            if code != SUCCESS or config is None:
                self.once.fail("ping", "controller CommitBlock ping returned %s, will retry", code_name(code))
                return
            self.once.ok("ping", "controller answers again")
        self.on_controller_config(config)

    def on_controller_config(self, config) -> None:
        try:
            check_chain_config(config, "configuration from the controller")
        except BadRequest as e:
            self.once.fail("config", "ignoring it: %s", e, extra=ctx(tag="controller"))
            return
        self.once.ok("config")
        self.controller_height = config.height
        if self.peer_running():
            self.service.applier.post(ControllerConfig(config))
        if self.address in config.validators:
            self.seen_as_validator = True
            self.nonvalidator_since = None
            if not self.peer_running():
                self.start_peer(config)
            return
        block_height = self.service.applier.block_height
        if config.height < block_height:
            # Older than the last block raft applied (a late or reordered call): the
            # validators at that block, not these, say whether we are still one.
            self.log.debug("ignoring a configuration of height %d without us: raft is at height %d",
                           config.height, block_height)
            return
        self.note_removal(config.height)
        abort = self.service.storage.abort_height()
        if config.height < abort:
            # Keep raft running until our own removal is through (abort-height rule).
            if not self.peer_running() and self.service.peer.storage_initialized():
                self.start_peer(config)
        elif self.peer_running():
            self.log.info("not a validator at height %d (abort height %d): leaving raft",
                          config.height, abort)
            self.stop_peer()

    def note_removal(self, height: int) -> None:
        """Abort height of a removed validator: the first height F at which our
        controller says we are no validator, plus one. The block that removed us
        is at a height H <= F, and no leader proposes block H+1 before the raft
        configuration without us is committed (maybe_conf_change holds blocks until
        the voters equal the validators), so a chain at F+1 or above proves our
        removal committed: we may leave raft then, and must not before (leaving at
        once stalled replace-all at block_interval 0, where an abort height from
        an old ping lagged hundreds of blocks behind). A node that restarts
        already removed keeps the abort height it persisted; one that never
        persisted any but is still a voter in its raft state serves until the next
        block. The peer loop persists it (SetAbortHeight); we wait for the fsync."""
        if self.nonvalidator_since is not None:
            return
        storage, peer = self.service.storage, self.service.peer
        if not self.seen_as_validator:
            if storage.abort_height() or not peer.storage_initialized():
                return
            cs = storage.initial_state().conf_state
            if self.service.id not in cs.voters and self.service.id not in cs.voters_outgoing:
                return
        self.nonvalidator_since = height
        if height + 1 > storage.abort_height():
            peer.call(lambda done: SetAbortHeight(height + 1, done))
            self.log.info("no longer a validator at height %d: serving raft until the chain passes it "
                          "(abort height %d)", height, height + 1)

    def peer_running(self) -> bool:
        return self.service.peer_running()

    def start_peer(self, config) -> None:
        self.service.peer.call(lambda done: StartRaft(config, done))

    def stop_peer(self) -> None:
        self.service.peer.call(StopRaft)


def _supersede_key(m):
    """Messages that a later one of the same key makes useless: a heartbeat
    (the later one carries a commit at least as high), a heartbeat response,
    and an append without entries (a probe or a commit announcement; the later
    one reflects the leader's newer view). Losing them is what raft already
    tolerates from any network. Heartbeats with a context (ReadIndex) and
    everything else are kept."""
    t = m.msg_type
    if t in (pb.MsgHeartbeat, pb.MsgHeartbeatResponse) and not m.context:
        return (t, m.term)
    if t == pb.MsgAppend and not m.entries:
        return (t, m.term)
    return None


def coalesce_outbox(batch: list) -> list:
    """The messages of `batch` (one peer's queued outbox, in order) worth
    sending: each superseded message (_supersede_key) is dropped when a later
    one with the same key is in the batch; the others keep their order."""
    keys = [_supersede_key(m) for m in batch]
    last = {key: i for i, key in enumerate(keys) if key is not None}
    return [m for i, (m, key) in enumerate(zip(batch, keys, strict=True)) if key is None or last[key] == i]


class Transport:
    """The transport greenlet: registers with the network (every second until
    it answers 0, then every REREGISTER_SECONDS, and at once after a failed
    send: a restarted network forgets us; the original registers once), keeps
    the mailbook (raft peer id -> network origin, learnt from probes and raft
    messages), creates one ordered outbox and sender greenlet per raft peer,
    and broadcasts probes (at most one a second: the original could storm the
    network with them, weak spot 11)."""

    def __init__(self, service: Service):
        self.service = service
        self.log, self.metrics, self.network = service.log, service.metrics, service.network
        self.once = OnceLogger(self.log)
        self.events = gevent.queue.Queue()
        self.registered = False
        self.registering = False                # a registration call is in flight
        self.registered_at = 0.0                # monotonic time the last registration attempt ended
        self.mailbook: dict[int, int] = {}      # raft peer id -> network origin
        self.outboxes: dict[int, gevent.queue.Queue] = {}
        self.senders: dict[int, gevent.Greenlet] = {}
        self.last_probe = 0.0

    def post(self, event) -> None:
        self.events.put(event)

    def transport_loop(self) -> None:
        """Never blocks on the network (registration runs in a one-shot
        greenlet), so an OriginLearned is answered at once."""
        self.log.info("registering network msg handler...", extra=ctx(tag="network"))
        next_register = 0.0
        while not self.service.stopping.is_set():
            wait = None if self.registering else next_register - time.monotonic()
            if wait is not None and wait <= 0:
                self.registering = True
                self.service.spawn(self.register)
                continue
            try:
                event = self.events.get(timeout=wait)
            except gevent.queue.Empty:
                continue
            match event:
                case Registered(code, error):
                    self.on_registered(code, error)
                    next_register = time.monotonic() + (REREGISTER_SECONDS if self.registered else 1.0)
                case OriginLearned(peer, origin, done):
                    if peer and self.mailbook.get(peer) != origin:
                        self.mailbook[peer] = origin
                        self.log.debug("mailbook: raft peer %d is at origin %d", peer, origin)
                    done.set(True)
                case OriginRefused(peer, origin):
                    if self.mailbook.get(peer) == origin:
                        del self.mailbook[peer]
                    self.broadcast_probe()
                case ProbeWanted():
                    self.broadcast_probe()
                case OutboxWanted(message):
                    self.open_outbox(message)
                case NetworkTrouble(at):
                    if at >= self.registered_at and not self.registering:
                        next_register = 0.0   # the network may have restarted and forgotten us
                case _:
                    raise TypeError(f"the transport got an unknown event {event!r}")

    def learn_origin(self, peer: int, origin: int) -> None:
        """From ProcessNetworkMsg: the mailbook has it when this returns (the
        transport loop answers at once; a wait of at most a second)."""
        if peer and self.mailbook.get(peer) != origin:
            done = gevent.event.AsyncResult()
            self.post(OriginLearned(peer, origin, done))
            done.wait(1.0)

    def register(self) -> None:
        """A one-shot greenlet: RegisterNetworkMsgHandler, answered as Registered."""
        try:
            self.post(Registered(self.network.register(self.service.cfg.grpc_listen_port), None))
        except RpcFailed as e:
            self.post(Registered(None, e))

    def on_registered(self, code: int | None, error: RpcFailed | None) -> None:
        self.registering = False
        if code == SUCCESS:
            if not self.registered:
                self.log.info("registered with the network on port %d", self.service.cfg.network_port)
                self.registered = True
                self.broadcast_probe(force=True)
            self.once.ok("register")
        elif error is None:
            self.registered = False
            self.once.fail("register", "network RegisterNetworkMsgHandler returned %s, will retry",
                           code_name(code))
        else:
            self.registered = False
            self.once.fail("register", "%s; will retry every second", error)
        # A failed send reported before now is answered by this attempt.
        self.registered_at = time.monotonic()

    def broadcast_probe(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_probe < 1.0:
            return
        self.last_probe = now
        self.service.spawn(self._broadcast, "probe", u64_be(self.service.id))

    def _broadcast(self, msg_type: str, payload: bytes) -> None:
        try:
            code = self.network.broadcast(msg_type, payload)
            if code != SUCCESS:
                self.once.fail("broadcast", "network Broadcast %s returned %s", msg_type, code_name(code))
            else:
                self.once.ok("broadcast")
        except RpcFailed as e:
            self.once.fail("broadcast", "%s", e)

    def send_control(self, origin: int, msg_type: str, payload: bytes) -> None:
        """A probe answer or a refresh, from its own one-shot greenlet."""
        self.service.spawn(self._send_control, origin, msg_type, payload)

    def _send_control(self, origin: int, msg_type: str, payload: bytes) -> None:
        try:
            self.network.send(origin, msg_type, payload)
        except RpcFailed as e:
            self.once.fail("send", "%s", e)

    # ----- outgoing raft messages: one ordered queue + sender per peer -----

    def send_raft(self, messages) -> None:
        """From the peer loop: queue each message for its peer's sender. The
        first message to a new peer goes through the transport loop, which
        opens the outbox; later ones (and any after it) keep their order."""
        for m in messages:
            q = self.outboxes.get(m.to)
            if q is None:
                self.post(OutboxWanted(m))
                continue
            try:
                q.put_nowait(m)
            except gevent.queue.Full:
                self.metrics.messages.labels("out", "dropped_overload").inc()

    def open_outbox(self, m) -> None:
        q = self.outboxes.get(m.to)
        if q is None:
            q = self.outboxes[m.to] = gevent.queue.Queue(OUTBOX_LIMIT)
            self.senders[m.to] = self.service.spawn(self.sender_loop, m.to, q)
        try:
            q.put_nowait(m)
        except gevent.queue.Full:
            self.metrics.messages.labels("out", "dropped_overload").inc()

    def sender_loop(self, to: int, q: gevent.queue.Queue) -> None:
        """One per raft peer: its outbox -> network.SendMsg, in order. Each
        round takes everything queued and drops what a later message in it
        supersedes (coalesce_outbox): with a network slower than the heartbeat
        rate, the outbox would otherwise become a queue of stale heartbeats in
        front of every append, its delay growing until followers campaign."""
        once = OnceLogger(self.log)
        peer = self.service.peer
        while True:
            batch = [q.get()]
            while True:
                try:
                    batch.append(q.get_nowait())
                except gevent.queue.Empty:
                    break
            kept = coalesce_outbox(batch)
            if len(kept) < len(batch):
                self.metrics.messages.labels("out", "superseded").inc(len(batch) - len(kept))
            for m in kept:
                self.send_one(to, m, once, peer)

    def send_one(self, to: int, m, once: OnceLogger, peer: PeerLoop) -> None:
        """Send one raft message; a failure is reported to raft (PeerUnreachable,
        or SnapshotReported for a snapshot, which raft waits for)."""
        origin = self.mailbook.get(to)
        if origin is None:
            # Unknown peer: drop (raft retransmits) and ask the network who it is.
            self.metrics.messages.labels("out", "dropped_no_route").inc()
            self.post(ProbeWanted())
            return
        ok = False
        try:
            code = self.network.send(origin, "raft", m.SerializeToString())
            if code == SUCCESS:
                ok = True
                self.metrics.messages.labels("out", "sent").inc()
                once.ok("send", f"network SendMsg to raft peer {to} works again")
            else:
                self.metrics.messages.labels("out", "failed").inc()
                once.fail("send", "network SendMsg to raft peer %d returned %s", to, code_name(code))
        except RpcFailed as e:
            self.metrics.messages.labels("out", "failed").inc()
            once.fail("send", "%s (raft peer %d)", e, to)
            self.post(NetworkTrouble(time.monotonic()))
        if m.msg_type == pb.MsgSnapshot:
            # Raft waits for this report before it sends that follower
            # anything else; a lost snapshot must be reported or the
            # follower stays stuck.
            peer.post(SnapshotReported(to, ok))
        elif not ok:
            peer.post(PeerUnreachable(to))


class Service:
    """One consensus node: the composition root. Creates the clients and the
    owners (PeerLoop, Applier, Supervisor, Transport), serves gRPC and the
    metrics, runs every greenlet under the fail-stop guard. Create, `start()`,
    then `stop()` (or wait on `halt` for a signal or a fatal fault). Its own
    fields are written by the main greenlet only, but `fatal`, which die()
    sets once from whichever greenlet fails."""

    def __init__(self, cfg: Config, logger: logging.Logger | None = None):
        self.cfg = cfg
        self.log = logger or log
        self.address = cfg.node_address
        self.id = raft.peer_id(self.address)
        self.metrics = Metrics(cfg.metrics_buckets)
        self.controller = ControllerClient(cfg.controller_port)
        self.network = NetworkClient(cfg.network_port)
        self.storage: DiskStorage | None = None  # opened by the main greenlet; the peer loop writes it
        self.grpc_server = None
        self.metrics_server = None
        self.health = None
        self.peer_greenlet = None
        self.greenlets: list[gevent.Greenlet] = []
        self.stopping = gevent.event.Event()  # set by stop(): every loop winds down
        self.stopped = gevent.event.Event()
        self.halt = gevent.event.Event()      # a signal or a fatal fault asks the main greenlet to stop()
        self.fatal: str | None = None
        self.peer = PeerLoop(self)
        self.applier = Applier(self)
        self.supervisor = Supervisor(self)
        self.transport = Transport(self)

    # ----- what the readiness check, the metrics and the tests read -----

    node = property(lambda self: self.peer.node)
    raft_status = property(lambda self: self.peer.raft_status)
    consensus_config = property(lambda self: self.applier.config)
    block_height = property(lambda self: self.applier.block_height)
    controller_height = property(lambda self: self.supervisor.controller_height)
    nonvalidator_since = property(lambda self: self.supervisor.nonvalidator_since)
    registered = property(lambda self: self.transport.registered)
    mailbook = property(lambda self: self.transport.mailbook)

    def peer_running(self) -> bool:
        g = self.peer_greenlet
        return self.peer.node is not None and g is not None and not g.dead

    def election_timeout(self) -> float:
        return election_timeout(self.cfg)

    # ----- life cycle -----

    def start(self) -> None:
        self.open_storage()
        self.grpc_server = self.serve_grpc()
        if self.cfg.enable_metrics:
            try:
                self.metrics_server = self.metrics.serve(self.cfg.metrics_port)
            except OSError as e:
                raise StartupError(f"cannot serve metrics on port {self.cfg.metrics_port}: {e.strerror}") from None
        self.log.info("consensus service started: raft id %d, address 0x%s, grpc port %d, data %s",
                      self.id, self.address.hex(), self.cfg.grpc_listen_port,
                      os.path.abspath(self.cfg.raft_data_path))
        self.log.info("controller grpc addr: http://%s", self.controller.addr, extra=ctx(tag="controller"))
        self.log.info("network grpc addr: http://%s", self.network.addr, extra=ctx(tag="network"))
        self.greenlets += [self.spawn(self.transport.transport_loop), self.spawn(self.supervisor.supervisor_loop)]

    def open_storage(self) -> None:
        """Open the raft data, give the applier the chain configuration recorded
        with it, and start the two greenlets that own them (raft itself starts
        when the supervisor says so)."""
        try:
            self.storage = DiskStorage.open(self.cfg.raft_data_path, logger=logging.getLogger("raft.disk"))
        except (raft.errors.StorageError, OSError) as e:
            raise StartupError(f"cannot open raft data in {self.cfg.raft_data_path}: {e}") from None
        self.applier = Applier(self, self.storage.applied_data())
        self.log.info("raft data opened: applied index %d, block height %d, last index %d",
                      self.storage.applied_index(), self.applier.block_height, self.storage.last_index())
        self.peer_greenlet = self.spawn(self.peer.peer_loop)
        self.greenlets += [self.peer_greenlet, self.spawn(self.applier.applier_loop)]

    def serve_grpc(self):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32),
                             interceptors=[_MetricsInterceptor(self.metrics)],
                             options=_CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)])
        register_servicers(server, self)
        self.health = HealthServicer(self)
        health_check_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = self.cfg.grpc_listen_port
        bound = 0
        for host in ("[::]", "0.0.0.0"):
            try:
                bound = server.add_insecure_port(f"{host}:{port}")
            except RuntimeError:
                bound = 0
            if bound:
                break
        if not bound:
            raise StartupError(f"cannot listen on grpc_listen_port {port}: address in use or not permitted")
        server.start()
        return server

    def stop(self, grace: float = 3.0) -> None:
        """Graceful stop: a leader first hands leadership to an up-to-date
        validator, then we stop serving, finish the current Ready, close the WAL."""
        if self.stopping.is_set():
            self.stopped.wait(grace + 5)
            return
        self.stopping.set()
        if self.peer_running():
            done = gevent.event.AsyncResult()
            self.peer.post(HandOff(done))
            done.wait(grace)
        if self.grpc_server is not None:
            self.grpc_server.stop(0.5).wait(2)   # in-flight calls end before storage closes
        self.stop_raft()
        for g in self.greenlets + list(self.transport.senders.values()):
            g.kill(block=False)
        gevent.joinall(self.greenlets, timeout=2)
        if self.metrics_server is not None:
            self.metrics_server.stop(timeout=1)
        if self.storage is not None:
            # The peer loop, its only writer, has ended.
            try:
                self.storage.close()
            except raft.errors.StorageError as e:
                self.log.error("closing raft data failed: %s", e)
        self.controller.close()
        self.network.close()
        self.stopped.set()
        self.log.info("consensus service stopped")

    def stop_raft(self) -> None:
        """The peer loop finishes the current Ready and drops the RawNode; a
        loop that does not answer within 5 s is killed."""
        if not self.peer_running():
            return
        done = gevent.event.AsyncResult()
        self.peer.post(StopRaft(done))
        done.wait(5)
        if not done.ready():
            self.peer_greenlet.kill()
            self.metrics.peer_running.set(0)
            self.metrics.role.set(0)

    def die(self, reason: str, exc_info=None) -> None:
        """A fault we must not continue after (disk failure, a crashed greenlet, a
        broken raft invariant): stop at once; the process exits 1 and its
        orchestrator restarts it (fail-stop, never a zombie out of raft)."""
        if self.fatal is None:
            self.fatal = reason
            self.log.critical("stopping: %s", reason, exc_info=exc_info)
        self.halt.set()

    def spawn(self, fn, *args) -> gevent.Greenlet:
        """Every greenlet of the service runs through here: an exception that
        escapes it stops the process (see fail_stop) instead of killing only
        that greenlet and leaving a process that serves but no longer works."""
        return gevent.spawn(self.fail_stop, fn, *args)

    def fail_stop(self, fn, *args):
        try:
            return fn(*args)
        except gevent.GreenletExit:
            raise
        except raft.errors.StorageError as e:
            self.die(f"raft data: {e}")
        except raft.errors.RaftInvariantError as e:
            self.die(f"raft invariant violated (in {getattr(fn, '__name__', fn)}): {e}", exc_info=True)
        except Exception as e:
            name = getattr(fn, "__name__", fn)
            if self.stopping.is_set():
                # Shutting down: channels and storage close under running greenlets.
                self.log.debug("%s ended during shutdown: %s: %s", name, type(e).__name__, e)
                return None
            self.die(f"{name} crashed: {type(e).__name__}: {e}", exc_info=True)
        return None


# --------------------------------------------------------------------------
# gRPC servicers
# --------------------------------------------------------------------------

DEFAULT_CLIENT_NAME = "unknown"


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Latency histograms per calling client, named `<client-name>_to_<Method>`
    in ms, as the original's middleware. A call without `client-name` metadata
    counts under DEFAULT_CLIENT_NAME (`unknown_to_CheckBlock`); health checks
    (grpc.health.v1) are not measured."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or \
                handler_call_details.method.startswith("/grpc.health.v1."):
            return handler
        client = dict(handler_call_details.invocation_metadata or ()).get("client-name") or DEFAULT_CLIENT_NAME
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        metrics = self.metrics

        def timed(request, context):
            t0 = time.perf_counter()
            try:
                return inner(request, context)
            finally:
                metrics.observe_rpc(client, method, (time.perf_counter() - t0) * 1000)

        return grpc.unary_unary_rpc_method_handler(timed, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


# ----- input validation at the gRPC boundary -----
#
# Every request body arrives as bytes (the handlers are registered with no
# deserializer, see register_servicers) and is decoded and checked here, so
# every malformed input is answered INVALID_ARGUMENT with a reason and nothing
# the service cannot handle reaches the supervisor, raft or the disk.

U64_MAX = 2**64 - 1
# Heights, terms and indexes are u64 on the wire and in the WAL; the service adds
# small numbers to them (abort height = height + 1, a term + 1 per election). A
# value within 2^32 of u64 max is no real chain's (2^32 elections or blocks at
# one per millisecond would take 50 days each way: the rest of the range takes
# 584 million years): refuse it rather than overflow later.
NUMBER_LIMIT = 2**64 - 2**32
ADDRESS_BYTES = 20
RAFT_WIRE_TYPES = frozenset(pb.MessageType.values()) - frozenset(
    {pb.MsgHup, pb.MsgBeat, pb.MsgUnreachable, pb.MsgSnapStatus, pb.MsgCheckQuorum})
_ENTRY_TYPES = frozenset(pb.EntryType.values())
_CC_TYPES = frozenset(pb.ConfChangeType.values())
_CC_TRANSITIONS = frozenset(pb.ConfChangeTransition.values())


class BadRequest(Exception):
    """An input refused at the boundary; the message is the reason given to the caller."""


def enum_name(enum, value: int) -> str:
    """The enum's name for `value`, or 'unknown(<value>)': never raises (defect: Name() of an
    unknown value raised ValueError in the peer loop and ended the process)."""
    try:
        return enum.Name(value)
    except ValueError:
        return f"unknown({value})"


def decode(message_type, body, what: str):
    """Decode a request body (bytes) into `message_type`, or BadRequest."""
    if not isinstance(body, bytes | bytearray | memoryview):
        return body  # already decoded (a test calling the servicer directly)
    try:
        return message_type.FromString(bytes(body))
    except Exception as e:  # DecodeError, or RuntimeWarning-like errors of the C decoder
        raise BadRequest(f"undecodable {what} ({len(body)} bytes): {e}") from None


def _check_number(value: int, what: str) -> None:
    if value >= NUMBER_LIMIT:
        raise BadRequest(f"{what} {value} out of range (must be below 2^64 - 2^32)")


def check_chain_config(config, what: str = "configuration") -> None:
    """A ConsensusConfiguration from the controller (Reconfigure, or a ping or CommitBlock reply)."""
    _check_number(config.height, f"{what}: height")
    if not config.validators:
        raise BadRequest(f"{what}: no validators")
    for i, v in enumerate(config.validators):
        if len(v) != ADDRESS_BYTES:
            raise BadRequest(f"{what}: validator {i} is {len(v)} bytes, expected a {ADDRESS_BYTES}-byte address")


def check_proposal(proposal, what: str = "proposal") -> None:
    _check_number(proposal.height, f"{what}: height")


def _check_conf_change_data(entry, where: str) -> None:
    if entry.entry_type == pb.EntryConfChangeV2:
        cc = decode(pb.ConfChangeV2, entry.data, f"{where}: ConfChangeV2")
        if cc.transition not in _CC_TRANSITIONS:
            raise BadRequest(f"{where}: unknown conf change transition {cc.transition}")
        changes = [(c.change_type, c.node_id) for c in cc.changes]
    elif entry.entry_type == pb.EntryConfChange:
        cc = decode(pb.ConfChange, entry.data, f"{where}: ConfChange")
        changes = [(cc.change_type, cc.node_id)]
    else:
        return
    for change_type, node_id in changes:
        if change_type not in _CC_TYPES:
            raise BadRequest(f"{where}: unknown conf change type {change_type}")
        if node_id == 0 and (entry.entry_type == pb.EntryConfChange or cc.changes):
            raise BadRequest(f"{where}: conf change of raft id 0")


def check_raft_message(m) -> None:
    """What raft and the peer loop may be handed: a known, non-local message type;
    terms and indexes below NUMBER_LIMIT; entries of known types, numbered after
    `index` in an append, never from a later term than the message; decodable conf
    changes; a snapshot whose data is a chain configuration. Real peers never send
    anything else."""
    t = m.msg_type
    name = enum_name(pb.MessageType, t)
    if t not in RAFT_WIRE_TYPES:
        if name.startswith("unknown"):
            raise BadRequest(f"unknown raft message type {t}")
        raise BadRequest(f"raft message type {name} is local to a node and never sent")
    if getattr(m, "from") == 0:
        raise BadRequest(f"{name} from raft id 0")
    for field in ("term", "log_term", "index", "commit", "commit_term", "request_snapshot", "reject_hint"):
        _check_number(getattr(m, field), f"{name}: {field}")
    if t == pb.MsgPropose and not m.entries:
        raise BadRequest("MsgPropose without entries")
    for k, e in enumerate(m.entries):
        where = f"{name}: entry {k}"
        if e.entry_type not in _ENTRY_TYPES:
            raise BadRequest(f"{where}: unknown entry type {e.entry_type}")
        _check_number(e.term, f"{where}: term")
        _check_number(e.index, f"{where}: index")
        if t == pb.MsgAppend:
            if e.index != m.index + 1 + k:
                raise BadRequest(f"{where}: index {e.index}, expected {m.index + 1 + k}")
            if e.term > m.term or (k and e.term < m.entries[k - 1].term):
                raise BadRequest(f"{where}: term {e.term} out of order (message term {m.term})")
        _check_conf_change_data(e, where)
    if t == pb.MsgAppend:
        if m.log_term > m.term:
            raise BadRequest(f"{name}: log_term {m.log_term} above the message term {m.term}")
        # Only the dummy entry at index 0 has term 0. raft (as raft-rs) reads the term of an
        # index beyond its log as 0, so such an append 'matches' there and the commit index
        # it carries lands beyond the log: a state raft forbids (found by the gRPC fuzzer).
        if m.index and not m.log_term:
            raise BadRequest(f"{name}: log_term 0 at index {m.index}")
        if any(not e.term for e in m.entries):
            raise BadRequest(f"{name}: an entry of term 0")
    if m.HasField("snapshot"):
        meta = m.snapshot.metadata
        _check_number(meta.index, f"{name}: snapshot index")
        _check_number(meta.term, f"{name}: snapshot term")
        if t == pb.MsgSnapshot and meta.index:
            if not meta.conf_state.voters:
                raise BadRequest(f"{name}: snapshot at index {meta.index} without voters")
            if not meta.term:
                raise BadRequest(f"{name}: snapshot at index {meta.index} of term 0")
            if meta.term > m.term:
                raise BadRequest(f"{name}: snapshot term {meta.term} above the message term {m.term}")
        if m.snapshot.data:
            config = decode(common_pb2.ConsensusConfiguration, m.snapshot.data, f"{name}: snapshot data")
            check_chain_config(config, f"{name}: snapshot data")


def _answer(context, fn):
    """Run a handler body: BadRequest -> INVALID_ARGUMENT with its reason."""
    try:
        return fn()
    except BadRequest as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


class ConsensusServicer:
    """consensus.ConsensusService: what the controller calls."""

    def __init__(self, service: Service):
        self.service = service

    def Reconfigure(self, request, context):  # noqa: N802 (gRPC method name)
        return _answer(context, lambda: self._reconfigure(request))

    def _reconfigure(self, body):
        # Answer at once; the supervisor and a running peer both see it, and
        # the latest configuration wins.
        s = self.service
        request = decode(common_pb2.ConsensusConfiguration, body, "ConsensusConfiguration")
        check_chain_config(request, "Reconfigure")
        s.supervisor.post(Reconfigure(request))
        s.log.debug("reconfigure: height %d, interval %d, %d validators", request.height,
                    request.block_interval, len(request.validators))
        return common_pb2.StatusCode(code=SUCCESS)

    def CheckBlock(self, request, context):  # noqa: N802
        return _answer(context, lambda: self._check_block(request))

    def _check_block(self, body):
        # Raft is crash-fault tolerant: blocks carry an empty proof and any
        # block the controller syncs from a peer is accepted here.
        request = decode(common_pb2.ProposalWithProof, body, "ProposalWithProof")
        check_proposal(request.proposal, "CheckBlock")
        return common_pb2.StatusCode(code=SUCCESS)


class NetworkMsgHandler:
    """network.NetworkMsgHandlerService: messages from peers, via the network."""

    def __init__(self, service: Service):
        self.service = service
        self._rate_limited: dict[str, tuple[float, int]] = {}

    def once_per_second(self, key: str, message: str, *args) -> None:
        """A warning about untrusted input, at most once a second per key (a flood
        of bad messages must not flood the log); says how many were not logged."""
        now = time.monotonic()
        last, quiet = self._rate_limited.get(key, (-1e9, 0))
        if now - last < 1.0:
            self._rate_limited[key] = (last, quiet + 1)
            return
        self._rate_limited[key] = (now, 0)
        if quiet:
            message += f" ({quiet} more not logged in the last second)"
        self.service.log.warning(message, *args, stacklevel=2)

    def ProcessNetworkMsg(self, request, context):  # noqa: N802
        return _answer(context, lambda: self._process(request))

    def _process(self, body):
        s, transport = self.service, self.service.transport
        request = decode(network_pb2.NetworkMsg, body, "NetworkMsg")
        if request.module != "consensus":
            raise BadRequest(f"wrong module {request.module[:64]!r}: this service handles module 'consensus'")
        kind, origin = request.type, request.origin
        if kind == "raft":
            msg = decode(pb.Message, request.msg, f"raft message from origin {origin}")
            try:
                check_raft_message(msg)
            except BadRequest as e:
                self.once_per_second("bad-raft", "dropped a raft message from origin %d: %s", origin, e)
                s.metrics.messages.labels("in", "invalid").inc()
                raise
            sender = getattr(msg, "from")
            if msg.msg_type not in (pb.MsgPropose, pb.MsgTransferLeader):
                # forwarded messages keep the original sender's id in `from`
                transport.learn_origin(sender, origin)
            if msg.to != s.id:
                # The sender's mailbook points at us for another id: tell it.
                transport.send_control(origin, "refresh", u64_be(msg.to))
                return common_pb2.StatusCode(code=SUCCESS)
            s.peer.deliver_raft(msg)
        elif kind in ("probe", "probe-resp", "refresh"):
            if len(request.msg) != 8:
                raise BadRequest(f"{kind} payload must be an 8-byte big-endian raft id, got {len(request.msg)} bytes")
            peer = int.from_bytes(request.msg, "big")
            if peer == 0:
                raise BadRequest(f"{kind} payload names raft id 0")
            if kind == "probe":
                transport.learn_origin(peer, origin)
                transport.send_control(origin, "probe-resp", u64_be(s.id))
            elif kind == "probe-resp":
                transport.learn_origin(peer, origin)
            else:
                transport.post(OriginRefused(peer, origin))
        else:
            raise BadRequest(f"unknown message type {kind[:64]!r} (expected raft, probe, probe-resp or refresh)")
        return common_pb2.StatusCode(code=SUCCESS)


def register_servicers(server, service: Service) -> None:
    """Add the consensus and network-handler services with a bytes
    pass-through (no request deserializer): grpcio would answer an undecodable body
    INTERNAL ('Exception deserializing request') before our code runs; the handlers
    decode it themselves and answer INVALID_ARGUMENT with the reason."""
    def unary(fn, reply_type):
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=None,
                                                   response_serializer=reply_type.SerializeToString)

    cons, handler = ConsensusServicer(service), NetworkMsgHandler(service)

    status = common_pb2.StatusCode
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("consensus.ConsensusService", {
            "Reconfigure": unary(cons.Reconfigure, status),
            "CheckBlock": unary(cons.CheckBlock, status)}),
        grpc.method_handlers_generic_handler("network.NetworkMsgHandlerService", {
            "ProcessNetworkMsg": unary(handler.ProcessNetworkMsg, status)}),
    ))


READY_SERVICE = "consensus.Ready"   # the readiness health service name (probe -service=consensus.Ready)
HEALTH_REFRESH_SECONDS = 1.0


class Readiness:
    """Whether this node does its job, for the readiness probe: registered
    with the network and, for a validator, raft running and not stuck.

    Stuck means one of: no raft leader known for longer than the limit; the
    chain height (as the controller reports it) advanced by 2 or more while
    the raft commit index stood still for longer than the limit (the node
    follows the chain by controller sync, not by raft: a wiped or cut-off
    follower); a leader that heard from no quorum of voters within the limit.
    The limit is two election timeouts, at least three supervisor rounds
    (the controller's height is asked every SUPERVISE_SECONDS)."""

    def __init__(self, service: Service, now: float | None = None):
        self.s = service
        now = time.monotonic() if now is None else now
        self.commit = None             # raft commit index last seen, and when it changed
        self.commit_at = now
        self.height_at_commit = 0      # the chain height then
        self.leader_seen_at = now      # when a raft leader was last known
        self.leading_since = None      # when this node became leader

    def reset(self, now: float) -> None:
        self.commit = None
        self.commit_at = now
        self.height_at_commit = 0
        self.leader_seen_at = now
        self.leading_since = None

    def limit(self) -> float:
        return max(2 * self.s.election_timeout(), 3 * SUPERVISE_SECONDS)

    def check(self, now: float | None = None) -> tuple[bool, bool, str]:
        """(ready, stuck, reason)."""
        s = self.s
        now = time.monotonic() if now is None else now
        if s.fatal:
            return False, False, f"fatal fault: {s.fatal}"
        if s.stopping.is_set():
            return False, False, "stopping"
        if not s.registered:
            self.reset(now)
            return False, False, "not registered with the network"
        running = s.peer_running()
        st = getattr(s, "raft_status", None)
        if not running or st is None:
            self.reset(now)
            if s.address in s.consensus_config.validators:
                return False, False, "a validator whose raft is not running"
            if not s.controller.reachable:
                return False, False, "the controller does not answer: validator set unknown"
            return True, False, "not a validator (not in raft)"
        chain = max(s.controller_height, s.block_height)
        if st.commit != self.commit:
            self.commit, self.commit_at, self.height_at_commit = st.commit, now, chain
        if st.leader_id:
            self.leader_seen_at = now
        limit = self.limit()
        if now - self.leader_seen_at > limit:
            return False, True, f"no raft leader for {now - self.leader_seen_at:.0f} s"
        if chain >= self.height_at_commit + 2 and now - self.commit_at > limit:
            return False, True, (f"raft commit index stuck at {st.commit} for {now - self.commit_at:.0f} s while "
                                 f"the chain advanced from height {self.height_at_commit} to {chain} by "
                                 f"controller sync")
        if st.role == raft.StateRole.Leader:
            if self.leading_since is None:
                self.leading_since = now
            voters = set(st.conf_state.voters)
            heard = {p for p, t in s.metrics.last_contact.items() if p in voters and now - t <= limit}
            active = len(heard | ({st.id} & voters))
            if voters and now - self.leading_since > limit and 2 * active <= len(voters):
                return False, True, f"leader without a quorum: heard from {active} of {len(voters)} voters"
        else:
            self.leading_since = None
        return True, False, "raft running"


class HealthServicer(grpc_health_v1.HealthServicer):
    """grpc.health.v1.Health (Check and Watch) by the maintained servicer of
    grpcio-health-checking: a service name it does not know answers NOT_FOUND.

    ""               liveness: SERVING while the process runs (as the
                     original); NOT_SERVING after a fatal fault.
    consensus.Ready  readiness: SERVING while Readiness.check() says so,
                     refreshed every HEALTH_REFRESH_SECONDS; each change of
                     state is logged with its reason.

    It also binds the service's state gauges (Metrics.bind)."""

    def __init__(self, service: Service):
        super().__init__()
        self.service = service
        self.readiness = Readiness(service)
        self.ready_reason = None
        self.last_state = None
        self.once = OnceLogger(service.log)
        service.metrics.bind(service)
        self.set(READY_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        service.greenlets.append(gevent.spawn(self.refresh_loop))

    def refresh_loop(self) -> None:
        while not self.service.stopping.is_set():
            try:
                self.refresh()
            except Exception as e:   # a fault in the check must not take consensus down: report not ready
                self.once.fail("readiness", "readiness check failed: %r", e)
                self.set(READY_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            self.service.stopping.wait(HEALTH_REFRESH_SECONDS)

    def refresh(self) -> None:
        s = self.service
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        self.set("", not_serving if s.fatal else serving)
        ready, stuck, reason = self.readiness.check()
        if not s.peer_running():
            s.metrics.clear_raft()
        s.metrics.ready.set(1 if ready else 0)
        s.metrics.stuck.set(1 if stuck else 0)
        self.set(READY_SERVICE, serving if ready else not_serving)
        if (ready, stuck) != self.last_state:
            log_fn = s.log.info if ready else s.log.warning
            log_fn("readiness (%s): %s, %s", READY_SERVICE, "SERVING" if ready else "NOT_SERVING", reason)
        self.ready_reason, self.last_state = reason, (ready, stuck)


# --------------------------------------------------------------------------
# Status codes (cita_cloud_proto status_code.proto) that the service acts on
# --------------------------------------------------------------------------

CODE_NAMES = {
    0: "Success", 2: "NoneStatusCode", 3: "FatalError", 109: "NoTransaction", 112: "NoneProposal",
    113: "NoneBlockBody", 114: "NoneBlockHeader", 119: "NoneRawTx", 122: "EncodeError", 123: "DecodeError",
    124: "NoCandidate", 126: "NoForkTree", 128: "ProposalTooHigh", 129: "ProposalTooLow",
    130: "ProposalCheckError", 131: "ConsensusProposalCheckError", 132: "BlockCheckError",
    139: "NodeInSyncMode", 153: "QuotaUsedExceed", 154: "NoStateRoot", 155: "StateRootCheckError",
    200: "ConsensusServerNotReady", 400: "NetworkServerNotReady", 401: "SendMsgError",
    402: "BroadcastMsgError", 500: "ExecuteServerNotReady", 600: "StorageServerNotReady",
}
SUCCESS, NO_TRANSACTION, NONE_RAW_TX, PROPOSAL_TOO_HIGH, PROPOSAL_TOO_LOW = 0, 109, 119, 128, 129
PING_HEIGHT = 2**64 - 1  # CommitBlock at this height only returns the controller's configuration


def code_name(code: int) -> str:
    return f"{code} ({CODE_NAMES.get(code, 'unknown code')})"


def is_transient(code: int) -> bool:
    """Codes after which the same request may succeed later: a '...ServerNotReady'
    (code % 100 == 0, the controller's own convention), txs still being fetched
    (119), or a controller that is behind and syncing (128)."""
    return code % 100 == 0 or code in (NONE_RAW_TX, PROPOSAL_TOO_HIGH)


# --------------------------------------------------------------------------
# Clients of the controller and the network, with deadlines and metadata
# --------------------------------------------------------------------------

CLIENT_METADATA = (("client-name", "consensus"),)


class RpcFailed(Exception):
    """A gRPC call failed at the transport level (unreachable, deadline...)."""

    def __init__(self, service: str, method: str, err: grpc.RpcError):
        self.code = err.code() if hasattr(err, "code") else None
        detail = err.details() if hasattr(err, "details") else str(err)
        name = self.code.name if self.code else "UNKNOWN"
        super().__init__(f"{service} {method} failed: {name}: {detail}")


class ControllerClient:
    """Consensus2ControllerService on localhost:controller_port."""

    def __init__(self, port: int):
        self.addr = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.addr, options=_CHANNEL_OPTIONS)
        self.stub = controller_pb2_grpc.Consensus2ControllerServiceStub(self.channel)
        self.reachable = False   # the last call got an answer (metric consensus_raft_controller_reachable)

    def _call(self, method: str, request, timeout: float):
        try:
            reply = getattr(self.stub, method)(request, timeout=timeout, metadata=CLIENT_METADATA)
        except grpc.RpcError as e:
            self.reachable = False
            raise RpcFailed("controller", method, e) from None
        self.reachable = True
        return reply

    def get_proposal(self):
        """(status code, Proposal or None)."""
        reply = self._call("GetProposal", common_pb2.Empty(), 5.0)
        proposal = reply.proposal if reply.HasField("proposal") else None
        return reply.status.code, proposal

    def check_proposal(self, proposal) -> int:
        return self._call("CheckProposal", proposal, 30.0).code

    def commit_block(self, proposal, proof: bytes = b"", timeout: float = 60.0):
        """(status code, ConsensusConfiguration or None)."""
        reply = self._call("CommitBlock", common_pb2.ProposalWithProof(proposal=proposal, proof=proof), timeout)
        return reply.status.code, (reply.config if reply.HasField("config") else None)

    def ping(self):
        """CommitBlock at height 2^64-1: the controller's current configuration."""
        return self.commit_block(common_pb2.Proposal(height=PING_HEIGHT, data=b""), timeout=5.0)

    def close(self):
        self.channel.close()


class NetworkClient:
    """NetworkService on localhost:network_port."""

    def __init__(self, port: int):
        self.addr = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.addr, options=_CHANNEL_OPTIONS)
        self.stub = network_pb2_grpc.NetworkServiceStub(self.channel)

    def _call(self, method: str, request, timeout: float = 3.0) -> int:
        try:
            return getattr(self.stub, method)(request, timeout=timeout, metadata=CLIENT_METADATA).code
        except grpc.RpcError as e:
            raise RpcFailed("network", method, e) from None

    def register(self, grpc_port: int) -> int:
        return self._call("RegisterNetworkMsgHandler", network_pb2.RegisterInfo(
            module_name="consensus", hostname="localhost", port=str(grpc_port)))

    def send(self, origin: int, msg_type: str, payload: bytes) -> int:
        return self._call("SendMsg", network_pb2.NetworkMsg(module="consensus", type=msg_type, origin=origin,
                                                            msg=payload))

    def broadcast(self, msg_type: str, payload: bytes) -> int:
        return self._call("Broadcast", network_pb2.NetworkMsg(module="consensus", type=msg_type, origin=0,
                                                              msg=payload))

    def close(self):
        self.channel.close()


MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # the original's 4 MB limit rejected large proposals (weak spot 14)
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class OnceLogger:
    """Logs a failure once when it starts and once when it ends, not per retry."""

    def __init__(self, logger: logging.Logger):
        self.log = logger
        self.failing: dict[str, str] = {}

    def fail(self, key: str, message: str, *args, **kw) -> None:
        text = message % args if args else message
        if self.failing.get(key) != text:
            self.failing[key] = text
            self.log.warning(text, stacklevel=2, **kw)  # log lines name the caller

    def ok(self, key: str, message: str | None = None) -> None:
        if self.failing.pop(key, None) is not None and message:
            self.log.info(message, stacklevel=2)


# --------------------------------------------------------------------------
# Metrics (Prometheus text on metrics_port)
# --------------------------------------------------------------------------

class Metrics:
    """The original's gRPC latency histograms (`<client-name>_to_<Method>`, ms)
    plus the raft and service figures it lacks. Each Service has its own
    registry so that several can live in one test process.

    Every value is one Prometheus can represent exactly: raft ids (64-bit) are
    labels, never sample values. No `_created` series; the client library's
    process/platform/gc collectors are included. deploy/ holds a Grafana
    dashboard and alerting rules built on these names."""

    PEER_STATES = ("Probe", "Replicate", "Snapshot")

    def __init__(self, buckets: list[float]):
        prom.disable_created_metrics()
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        prom.ProcessCollector(registry=self.registry)
        prom.PlatformCollector(registry=self.registry)
        prom.GCCollector(registry=self.registry)
        self.buckets = buckets
        self._histograms: dict[str, object] = {}
        r = self.registry
        g, c = prom.Gauge, prom.Counter
        self.role = g("consensus_raft_role", "raft role: 0 follower, 1 candidate, 2 leader, 3 pre-candidate",
                      registry=r)
        self.term = g("consensus_raft_term", "raft term", registry=r)
        self.is_leader = g("consensus_raft_is_leader", "1 while this node is the raft leader", registry=r)
        self.has_leader = g("consensus_raft_has_leader", "1 while this node knows a raft leader", registry=r)
        self.withholding_votes = g(
            "consensus_raft_withholding_votes",
            "1 while this node, restarted without its raft state, refuses votes until it has seen an election "
            "(docs/internals.md, Lost state): the chain tolerates one failure fewer meanwhile", registry=r)
        self.leader = g("consensus_raft_leader", "1 for the raft id (label leader_id) of the known leader",
                        ["leader_id"], registry=r)
        self.node_info = g("consensus_raft_node_info", "always 1: this node's raft id and address as labels",
                           ["raft_id", "address"], registry=r)
        self.commit_index = g("consensus_raft_commit_index", "raft commit index", registry=r)
        self.applied_index = g("consensus_raft_applied_index", "raft applied index", registry=r)
        self.last_index = g("consensus_raft_last_index", "index of the last entry in the raft log", registry=r)
        self.block_height = g("consensus_raft_block_height", "height of the last block committed", registry=r)
        self.peer_running = g("consensus_raft_peer_running", "1 while this node takes part in raft", registry=r)
        self.elections = c("consensus_raft_elections", "elections this node started", registry=r)
        self.leader_changes = c("consensus_raft_leader_changes", "changes of the known leader", registry=r)
        self.proposals = c("consensus_raft_proposals", "block proposals by outcome", ["outcome"], registry=r)
        self.messages = c("consensus_raft_messages", "raft messages by direction and outcome",
                          ["direction", "outcome"], registry=r)
        self.early_checks = c("consensus_raft_early_checks", "CheckProposal before the commit, by outcome",
                              ["outcome"], registry=r)
        self.controller_errors = c("consensus_raft_controller_errors", "failed controller calls", ["method"],
                                   registry=r)
        self.fsync = prom.Histogram("consensus_raft_wal_fsync_ms", "WAL fsync latency in ms", registry=r,
                                    buckets=buckets)
        self.commit_latency = prom.Histogram("consensus_raft_commit_latency_ms",
                                             "proposal to CommitBlock returned, in ms (leader)", registry=r,
                                             buckets=buckets)
        # Replication progress of every peer, on the leader only (cleared elsewhere).
        peer = ["peer"]
        self.peer_match = g("consensus_raft_peer_match_index", "leader: highest log index known replicated on "
                            "the peer", peer, registry=r)
        self.peer_next = g("consensus_raft_peer_next_index", "leader: next log index to send to the peer",
                           peer, registry=r)
        self.peer_lag = g("consensus_raft_peer_lag_entries", "leader: entries the peer is behind the leader's log",
                          peer, registry=r)
        self.peer_state = g("consensus_raft_peer_state", "leader: 1 for the peer's replication state "
                            "(Probe, Replicate, Snapshot)", ["peer", "state"], registry=r)
        self.peer_contact = g("consensus_raft_peer_last_contact_seconds", "leader: seconds since a raft "
                              "message from the peer arrived", peer, registry=r)
        self.registered = g("consensus_raft_network_registered", "1 while registered with the network service",
                            registry=r)
        self.controller_reachable = g("consensus_raft_controller_reachable", "1 while the last call to the "
                                      "controller got an answer", registry=r)
        self.ready = g("consensus_raft_ready", "1 while the readiness health service (consensus.Ready) is "
                       "SERVING", registry=r)
        self.stuck = g("consensus_raft_stuck", "1 while this validator's raft makes no progress: no leader, or "
                       "the chain advances by controller sync while the commit index does not", registry=r)
        self.last_contact: dict[int, float] = {}   # raft peer id -> monotonic time of its last message
        self._peers: set[str] = set()
        self._leader_label: str | None = None

    def contact(self, peer: int) -> None:
        self.last_contact[peer] = time.monotonic()

    def set_leader(self, leader_id: int, me: int) -> None:
        """The known leader as a label (raft ids are 64-bit: a float sample would lose digits)."""
        if self._leader_label is not None:
            self.leader.remove(self._leader_label)
            self._leader_label = None
        if leader_id:
            self._leader_label = str(leader_id)
            self.leader.labels(self._leader_label).set(1)
        self.has_leader.set(1 if leader_id else 0)
        self.is_leader.set(1 if leader_id and leader_id == me else 0)

    def bind(self, service) -> None:
        """Gauges read from the service's state at each scrape."""
        self.node_info.labels(str(service.id), "0x" + service.address.hex()).set(1)
        self.registered.set_function(lambda: 1 if service.registered else 0)
        self.controller_reachable.set_function(lambda: 1 if service.controller.reachable else 0)

    def clear_raft(self) -> None:
        """Raft is not running here: no leader known, no peer progress."""
        self.set_leader(0, 0)
        self._drop_peers(set())

    def set_progress(self, st) -> None:
        """Per-peer replication progress from a leader's raft Status; a
        non-leader (empty progress) exports none."""
        now = time.monotonic()
        seen = set()
        for pid, (match, next_idx, state) in st.progress.items():
            if pid == st.id:
                continue
            peer = str(pid)
            seen.add(peer)
            self.peer_match.labels(peer).set(match)
            self.peer_next.labels(peer).set(next_idx)
            self.peer_lag.labels(peer).set(max(0, st.last_index - match))
            for name in self.PEER_STATES:
                self.peer_state.labels(peer, name).set(1 if state == name else 0)
            last = self.last_contact.get(pid)
            self.peer_contact.labels(peer).set(now - last if last is not None else float("inf"))
        self._drop_peers(seen)

    def _drop_peers(self, keep: set[str]) -> None:
        """Remove the progress series of every peer not in `keep`."""
        for peer in self._peers - keep:
            for gauge in (self.peer_match, self.peer_next, self.peer_lag, self.peer_contact):
                gauge.remove(peer)
            for name in self.PEER_STATES:
                self.peer_state.remove(peer, name)
        self._peers = keep

    def observe_rpc(self, client_name: str, method: str, elapsed_ms: float) -> None:
        name = f"{client_name}_to_{method}"
        if not _METRIC_NAME.match(name):
            return
        h = self._histograms.get(name)
        if h is None:
            h = self.prom.Histogram(name, "request latencies in milliseconds(ms)", registry=self.registry,
                                    buckets=self.buckets)
            self._histograms[name] = h
        h.observe(elapsed_ms)

    def serve(self, port: int):
        """HTTP exporter: /metrics in Prometheus text format, a hint elsewhere."""
        app = self.prom.make_wsgi_app(self.registry)

        def route(environ, start_response):
            if environ.get("PATH_INFO") == "/metrics":
                return app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"try /metrics (ports: 60000 network, 60001 consensus, 60002 executor, "
                    b"60003 storage, 60004 controller, 60005 crypto)\n"]

        server = _bind_dual_stack(lambda host: WSGIServer((host, port), route, log=None, error_log=None))
        server.start()
        return server


_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _bind_dual_stack(make):
    """Bind on [::] (dual stack); fall back to 0.0.0.0 where IPv6 is missing."""
    try:
        return make("::")
    except OSError as e:
        if e.errno in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL: no IPv6 here
            return make("0.0.0.0")
        raise


# --------------------------------------------------------------------------
# Configuration: the [consensus_raft] table of config.toml
# --------------------------------------------------------------------------

DEFAULT_BUCKETS = [0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0]
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """A config problem; the message is one line naming file, key and problem."""


@dataclasses.dataclass
class Config:
    """Every key of the original's [consensus_raft] table, same defaults.
    Keys marked 'ours' are additions; the original ignores them."""

    node_addr: str = ""                 # path of a file with the hex address, or the hex itself
    grpc_listen_port: int = 50001       # our gRPC server (consensus, network handler, health)
    network_port: int = 50000           # network service at localhost:<port>
    controller_port: int = 50004        # controller service at localhost:<port>
    log_level: str = "info"             # trace/debug/info/warning/error/critical
    log_to_stdout: bool = False         # also forced by --stdout
    log_dir: str = "logs"               # overridden by -d
    log_file_name: str = "consensus-service.log"  # overridden by -f
    log_rotate_size: int = 128 * 1024 * 1024       # bytes per log file before rotation
    log_rotate_keep: int = 5            # rotated files kept
    log_rotate_compress: bool = False   # gzip rotated files
    tick_interval_in_millis: int = 200  # raft tick (the original ignores this key; we honour it)
    heartbeat_tick: int = 15            # ticks between leader heartbeats
    election_tick: int = 50             # ticks before a follower campaigns (randomised to [e, 2e))
    check_quorum: bool = False          # leader steps down without a live quorum
    pre_vote: bool = True               # ours: pre-vote keeps a rejoining node from disrupting the leader
    raft_data_path: str = "raft-data-dir"  # WAL and snapshots, relative to the working dir
    enable_metrics: bool = True         # Prometheus exporter + gRPC latency histograms
    metrics_port: int = 60001           # exporter port (/metrics)
    metrics_buckets: list = dataclasses.field(default_factory=lambda: list(DEFAULT_BUCKETS))  # ms
    # derived, not a key:
    node_address: bytes = b""           # the decoded 20-byte address
    unknown_keys: list = dataclasses.field(default_factory=list)


# Older names of keys, still accepted (6.3.x used raft_data_dir, then wal_path).
KEY_ALIASES = {"raft_data_dir": "raft_data_path", "wal_path": "raft_data_path"}
_DERIVED = {"node_address", "unknown_keys"}


def parse_address(value: str, where: str) -> bytes:
    """Hex address with or without 0x, whitespace stripped; must be 20 bytes."""
    text = "".join(value.split())
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    if not text:
        raise ConfigError(f"{where}: empty address")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{where}: not a hex address: {value.strip()[:60]!r}") from None
    if len(raw) != 20:
        raise ConfigError(f"{where}: address must be 20 bytes (40 hex digits), got {len(raw)} bytes")
    return raw


def _check_type(path: str, key: str, value, default):
    where = f"{path}: [consensus_raft].{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: expected a list of numbers, got {value!r}")
        value = [float(v) for v in value]
        if not value or value != sorted(value) or len(set(value)) != len(value):
            raise ConfigError(f"{where}: buckets must be non-empty and strictly increasing")
    return value


def load_config(path: str) -> Config:
    """Load and check [consensus_raft] from `path`. Raises ConfigError with a
    one-line message; never a traceback for bad input."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    table = doc.get("consensus_raft")
    if table is None:
        raise ConfigError(f"{path}: missing section [consensus_raft]")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: consensus_raft must be a table, got {type(table).__name__}")
    cfg = Config()
    defaults = Config()
    fields = {f.name for f in dataclasses.fields(Config)} - _DERIVED
    for key, value in table.items():
        name = KEY_ALIASES.get(key, key)
        if name not in fields:
            cfg.unknown_keys.append(key)
            continue
        setattr(cfg, name, _check_type(path, key, value, getattr(defaults, name)))
    where = f"{path}: [consensus_raft]"
    if not cfg.node_addr.strip():
        raise ConfigError(f"{where}.node_addr: missing (a file holding the node's hex address, or the hex itself)")
    addr_path = cfg.node_addr.strip()
    if os.path.isdir(addr_path):
        raise ConfigError(f"{where}.node_addr: {addr_path} is a directory, not a file holding the node's hex address")
    if os.path.isfile(addr_path):
        try:
            with open(addr_path, encoding="utf-8") as f:
                content = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}.node_addr: cannot read address file {addr_path}: {e}") from None
        cfg.node_address = parse_address(content, f"{where}.node_addr (file {addr_path})")
    else:
        looks_like_path = os.sep in addr_path or addr_path.endswith("node_address")
        try:
            cfg.node_address = parse_address(addr_path, f"{where}.node_addr")
        except ConfigError:
            if looks_like_path:
                raise ConfigError(f"{where}.node_addr: address file not found: {addr_path}") from None
            raise
    if cfg.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"{where}.log_level: unknown level {cfg.log_level!r} (one of {', '.join(LOG_LEVELS)})")
    cfg.log_level = cfg.log_level.lower()
    for key in ("grpc_listen_port", "network_port", "controller_port", "metrics_port"):
        if not 0 < getattr(cfg, key) < 65536:
            raise ConfigError(f"{where}.{key}: not a TCP port: {getattr(cfg, key)}")
    if cfg.tick_interval_in_millis == 0:
        raise ConfigError(f"{where}.tick_interval_in_millis: must be at least 1")
    if cfg.heartbeat_tick == 0:
        raise ConfigError(f"{where}.heartbeat_tick: must be at least 1")
    if cfg.heartbeat_tick >= cfg.election_tick:
        raise ConfigError(f"{where}.heartbeat_tick: must be less than election_tick "
                          f"({cfg.heartbeat_tick} >= {cfg.election_tick})")
    if cfg.log_rotate_size == 0:
        raise ConfigError(f"{where}.log_rotate_size: must be at least 1 byte")
    if not cfg.raft_data_path.strip():
        raise ConfigError(f"{where}.raft_data_path: must not be empty")
    return cfg


# --------------------------------------------------------------------------
# Logging: slog-like lines, stdout or a size-rotated file
# --------------------------------------------------------------------------

TRACE = 5
logging.addLevelName(TRACE, "TRACE")
_LEVEL_NUMBERS = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO,
                  "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
_LEVEL_TAGS = {TRACE: "TRCE", logging.DEBUG: "DEBG", logging.INFO: "INFO",
               logging.WARNING: "WARN", logging.ERROR: "ERRO", logging.CRITICAL: "CRIT"}

log = logging.getLogger("consensus")


class LineFormatter(logging.Formatter):
    """`Mar 14 08:32:55.131 INFO <message>, tag: peer, module: consensus::run:45`:
    timestamp, level, message, `key: value` context (from extra={'ctx': {...}}),
    then where the line was logged."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        stamp = time.strftime("%b %d %H:%M:%S", t) + f".{int(record.msecs):03d}"
        level = _LEVEL_TAGS.get(record.levelno, record.levelname[:4])
        parts = [record.getMessage()]
        ctx = getattr(record, "ctx", None)
        if ctx:
            parts.extend(f"{k}: {v}" for k, v in ctx.items())
        module = record.name.replace(".", "::")
        parts.append(f"module: {module}::{record.funcName}:{record.lineno}")
        line = f"{stamp} {level} " + ", ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _gzip_rotator(source: str, dest: str) -> None:
    with open(source, "rb") as src, gzip.open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(source)


def setup_logging(cfg: Config, stdout: bool, log_dir: str | None, log_file_name: str | None,
                  stream=None) -> logging.Handler:
    """Route the 'consensus' and 'raft' loggers to stdout or a rotated file.
    CLI values override the config; returns the installed handler."""
    if stdout or cfg.log_to_stdout:
        handler: logging.Handler = logging.StreamHandler(stream or sys.stdout)
    else:
        directory = log_dir or cfg.log_dir
        os.makedirs(directory, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            os.path.join(directory, log_file_name or cfg.log_file_name),
            maxBytes=cfg.log_rotate_size, backupCount=cfg.log_rotate_keep, encoding="utf-8")
        if cfg.log_rotate_compress:
            handler.namer = lambda name: name + ".gz"
            handler.rotator = _gzip_rotator
    handler.setFormatter(LineFormatter())
    level = _LEVEL_NUMBERS[cfg.log_level]
    for name in ("consensus", "raft"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    return handler


def ctx(**kv) -> dict:
    """extra= for a log call: `log.info("...", extra=ctx(tag="peer"))`."""
    return {"ctx": kv}


# --------------------------------------------------------------------------
# Command line (docopt), shaped like the Rust service's clap output
# --------------------------------------------------------------------------

MAIN_HELP = f"""{NAME} {VERSION}
{AUTHORS}
Consensus service for CITA-Cloud

USAGE:
    consensus [SUBCOMMAND]

OPTIONS:
    -h, --help       Print help information
    -V, --version    Print version information

SUBCOMMANDS:
    git     show git info
    help    Print this message or the help of the given subcommand(s)
    run     run the service
"""

GIT_HELP = """consensus-git
show git info

USAGE:
    consensus git

OPTIONS:
    -h, --help    Print help information
"""

RUN_HELP = """consensus-run
run the service

USAGE:
    consensus run [OPTIONS]

OPTIONS:
    -c, --config <config>                  the consensus config [default: config.toml]
    -d, --log-dir <log-dir>                the log dir. Overrides the config
    -f, --log-file-name <log-file-name>    the log file name. Overrride the config
    -h, --help                             Print help information
        --stdout                           if specified, log to stdout. Overrides the config
"""

# docopt patterns. The printed help above keeps the original's layout; these
# say the same thing in the grammar docopt parses.
_MAIN_PATTERN = """Usage: consensus [-h | -V] [<subcommand>] [<args>...]

Options:
  -h --help
  -V --version
"""
_RUN_PATTERN = """Usage: consensus run [-h] [-c <config>] [-d <log-dir>] [-f <log-file-name>] [--stdout]

Options:
  -h --help
  -c <config> --config=<config>  [default: config.toml]
  -d <log-dir> --log-dir=<log-dir>
  -f <log-file-name> --log-file-name=<log-file-name>
  --stdout
"""
_GIT_PATTERN = """Usage: consensus git [-h]

Options:
  -h --help
"""


class UsageError(Exception):
    """Bad command line: printed with a usage hint, exit code 2 (as clap)."""


def git_hash() -> str:
    """The short git hash of this build: embedded at build time in
    `_version.py` (Nix, Docker, pip builds have no .git), else asked from git
    in the source tree, else 'unknown'."""
    if _BUILD_GIT_HASH:
        return _BUILD_GIT_HASH
    try:
        out = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _docopt(pattern: str, argv: list[str], usage_hint: str) -> dict:
    try:
        return docopt.docopt(pattern, argv=argv, help=False, version=None, options_first=False)
    except docopt.DocoptExit:
        raise UsageError(f"invalid arguments: {' '.join(argv[1:]) or '(none)'}\n\n{usage_hint}") from None


def parse_command_line(argv: list[str]) -> tuple[str, dict]:
    """Returns (action, options); action is one of help/version/git/run
    with the printable text in options['text'] for help/version/git."""
    try:
        top = docopt.docopt(_MAIN_PATTERN, argv=argv, help=False, options_first=True)
    except docopt.DocoptExit:
        raise UsageError(f"invalid arguments: {' '.join(argv)}\n\nFor more information try --help") from None
    if top["--help"]:
        return "help", {"text": MAIN_HELP}
    if top["--version"]:
        return "version", {"text": f"{NAME} {VERSION}"}
    sub, rest = top["<subcommand>"], top["<args>"]
    if sub is None:
        # The original prints this and exits 0 when called without a subcommand.
        return "help", {"text": "no subcommand provided\n\n" + MAIN_HELP}
    if sub == "help":
        topic = rest[0] if rest else None
        texts = {None: MAIN_HELP, "run": RUN_HELP, "git": GIT_HELP, "help": MAIN_HELP}
        if topic not in texts:
            raise UsageError(f"unknown subcommand '{topic}'\n\nFor more information try --help")
        return "help", {"text": texts[topic]}
    if sub == "git":
        args = _docopt(_GIT_PATTERN, [sub, *rest], "USAGE:\n    consensus git")
        if args["--help"]:
            return "help", {"text": GIT_HELP}
        return "git", {"text": f"git version: {git_hash()}\nhomepage: {HOMEPAGE}"}
    if sub == "run":
        args = _docopt(_RUN_PATTERN, [sub, *rest], "USAGE:\n    consensus run [OPTIONS]\n\nFor more information try --help")
        if args["--help"]:
            return "help", {"text": RUN_HELP}
        if args["--stdout"]:
            for flag in ("--log-dir", "--log-file-name"):
                if args[flag] is not None:
                    value = "<log-dir>" if flag == "--log-dir" else "<log-file-name>"
                    raise UsageError(f"The argument '--stdout' cannot be used with '{flag} {value}'\n\n"
                                     "USAGE:\n    consensus run --stdout\n\nFor more information try --help")
        return "run", {"config": args["--config"], "log_dir": args["--log-dir"],
                       "log_file_name": args["--log-file-name"], "stdout": bool(args["--stdout"])}
    raise UsageError(f"unknown subcommand '{sub}'\n\nFor more information try --help")


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        action, opts = parse_command_line(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if action != "run":
        print(opts["text"].rstrip("\n"))
        return 0
    try:
        cfg = load_config(opts["config"])
    except ConfigError as e:
        print(f"error: bad config: {e}", file=sys.stderr)
        return 1
    try:
        setup_logging(cfg, opts["stdout"], opts["log_dir"], opts["log_file_name"])
    except OSError as e:
        print(f"error: cannot open the log file: {e}", file=sys.stderr)
        return 1
    if cfg.unknown_keys:
        log.warning("ignoring unknown config keys in [consensus_raft]: %s", ", ".join(cfg.unknown_keys),
                    extra=ctx(file=opts["config"]))
    return run_service(cfg)


def run_service(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or a fatal fault (exit 1)."""
    service = Service(cfg)
    try:
        service.start()
    except StartupError as e:
        log.critical("cannot start: %s", e)
        print(f"error: {e}", file=sys.stderr)
        service.stop()
        return 1

    def on_signal(signum):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        service.halt.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, on_signal, signum)
    service.halt.wait()
    if service.fatal:
        # Fail-stop means stop: should the graceful stop hang (a wedged call, a
        # greenlet that does not yield), end the process anyway.
        gevent.spawn_later(FATAL_EXIT_SECONDS, os._exit, 1)
    service.stop()
    return 1 if service.fatal else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `./consensus.py -h | head -3`: the reader left, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
