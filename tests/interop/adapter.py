"""Stdio adapter: one node of this project's RawNode behind the etcd oracle's framing.

Owns: translating the oracle's length-prefixed frames (documented at the top
of ../shared/oracle/raftnode/main.go) into RawNode calls, and handling each
Ready the way a host must (the shared driver tests/ready_driver.py;
docs/internals.md, "Peer loop"): persist snapshot, entries and hard state to a
MemoryStorage, then release `messages` and `persisted_messages`, then apply
committed entries (conf changes through `apply_conf_change`), then `advance`.  It never decides protocol questions
itself; anything the core refuses is reported as an 'X' frame.

Run as a program (`python tests/interop/adapter.py -id 1 -peers 1,2,3`) with
the same flags as `raftnode`, so a router can put it anywhere an etcd node
goes.  Ready is handled once per 'y' (sync) frame, like `raftnode -ready=sync`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import struct
import sys

if __package__ in (None, ""):
    # started as a script by the router: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cita_raft_pb import eraftpb_pb2 as pb  # noqa: E402
from raft import Config, RawNode  # noqa: E402
from raft.errors import RaftError, SnapshotTemporarilyUnavailable  # noqa: E402
from raft.storage import MemoryStorage  # noqa: E402
from tests.ready_driver import StorageHost, drain  # noqa: E402

_HDR = struct.Struct(">I")


def role_name(role: object) -> str:
    """etcd's name for a role ("StateLeader"), from a StateRole member."""
    name = getattr(role, "name", str(role)).split(".")[-1]
    return name if name.startswith("State") else "State" + name


def parse_ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class AdapterNode(StorageHost):
    """One RawNode, its MemoryStorage and the output buffer of framed replies; the host of
    the RawNode's Readies (the hooks of tests/ready_driver.ReadyHost)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.id: int = args.id
        self.out = bytearray()
        self.early: list[pb.Message] = []  # this Ready's `messages`, framed after persisting
        # raft-rs style start: empty log at index 0 / term 0, configuration preset
        # (the oracle's raftnode does the same without -bootstrap).
        super().__init__(MemoryStorage.new_with_conf_state(parse_ids(args.peers), parse_ids(args.learners)))
        self.conf_state = pb.ConfState()
        self.conf_state.CopyFrom(self.storage.conf_state)
        self.applied = 0
        logger = logging.getLogger(f"raft{self.id}")
        if args.v:
            logging.basicConfig(stream=sys.stderr, level=logging.DEBUG,
                                format=f"raft{self.id} %(message)s")
        else:
            logger.disabled = True
        cfg = Config(
            id=args.id,
            election_tick=args.election,
            heartbeat_tick=args.heartbeat,
            max_size_per_msg=args.max_size_per_msg,
            max_inflight_msgs=args.max_inflight,
            check_quorum=args.checkquorum,
            pre_vote=args.prevote,
        )
        cfg.validate()
        seed = args.seed if args.seed is not None else args.id
        self.rn = RawNode(cfg, self.storage, rng=random.Random(seed), logger=logger)

    # ------------------------------------------------------------- output
    def emit(self, op: bytes, payload: bytes = b"") -> None:
        self.out += _HDR.pack(len(payload) + 1)
        self.out += op
        self.out += payload

    def emit_err(self, text: str) -> None:
        self.emit(b"X", text.encode())

    # ------------------------------------------------------------- Ready
    def handle_ready(self) -> None:
        """Every pending Ready, through the shared driver (tests/ready_driver.py); the
        hooks below turn its steps into frames."""
        drain(self.rn, self)

    def on_soft_state(self, rd) -> None:
        ss = rd.soft_state
        self.emit(b"L", f"lead={ss.leader_id} state={role_name(ss.role)}".encode())

    # Persist: snapshot, entries, hard state, in that order (Raft §5.3, §7:
    # a follower's state must be durable before it answers).
    def persist_snapshot(self, snap: pb.Snapshot) -> None:
        try:
            self.storage.apply_snapshot(snap)
        except RaftError as exc:
            self.emit_err(f"apply snapshot index={snap.metadata.index}: {exc!r}")
        else:
            self.conf_state = pb.ConfState()
            self.conf_state.CopyFrom(snap.metadata.conf_state)
            self.applied = snap.metadata.index
            self.emit(b"S", snap.metadata.SerializeToString())

    def persist_entries(self, entries: list[pb.Entry]) -> None:
        try:
            self.storage.append(list(entries))
        except RaftError as exc:
            self.emit_err(f"append first={entries[0].index}: {exc!r}")

    def persist_hard_state(self, hs: pb.HardState) -> None:
        self.storage.set_hardstate(hs)
        self.emit(b"H", hs.SerializeToString())

    # Send: both lists go out only after persisting, as the framing promises: the
    # early `messages` wait here until the persisted ones follow them.
    def send(self, msgs: list[pb.Message]) -> None:
        self.early = msgs

    def send_persisted(self, msgs: list[pb.Message]) -> None:
        out, pack = self.out, _HDR.pack
        for batch in (self.early, msgs):
            for m in batch:
                b = m.SerializeToString()
                out += pack(len(b) + 1)
                out += b"M"
                out += b
        self.early = []

    def apply(self, entries: list[pb.Entry]) -> int:
        out, pack = self.out, _HDR.pack
        for e in entries:
            b = e.SerializeToString()
            out += pack(len(b) + 1)
            out += b"E"
            out += b
            if e.entry_type == pb.EntryConfChangeV2:
                cc = pb.ConfChangeV2()
                try:
                    cc.ParseFromString(e.data)
                    self.conf_state = self.rn.apply_conf_change(cc)
                except Exception as exc:  # report, keep the node serving
                    self.emit_err(f"apply confchangev2 index={e.index}: {exc!r}")
                else:
                    self.emit(b"C", self.conf_state.SerializeToString())
            elif e.entry_type == pb.EntryConfChange:
                self.emit_err(f"EntryConfChange (v1) at index={e.index} is not supported")
        self.applied = entries[-1].index
        return self.applied

    # ------------------------------------------------------------- input
    def status_json(self) -> bytes:
        """raft.Status in etcd's JSON shape (ids in hex, as etcd's MarshalJSON writes them)."""
        st = self.rn.status()
        progress = {}
        for pid, pr in (st.progress or {}).items():
            match, nxt, state = pr
            progress[f"{pid:x}"] = {"match": match, "next": nxt, "state": role_name(state)}
        doc = {
            "id": f"{st.id:x}", "term": st.term, "vote": f"{st.vote:x}", "commit": st.commit,
            "lead": f"{st.leader_id:x}", "raftState": role_name(st.role), "applied": st.applied,
            "progress": progress, "leadtransferee": f"{st.lead_transferee:x}",
        }
        return json.dumps(doc).encode()

    def compact(self, payload: bytes) -> None:
        idx = int(payload or b"0")
        if idx == 0 or idx > self.applied:
            idx = self.applied
        if idx == 0:
            return
        try:
            self.storage.create_snapshot(idx, self.conf_state, b"snapshot@%d" % idx)
        except SnapshotTemporarilyUnavailable:
            pass  # a snapshot at or above idx exists already (etcd: ErrSnapOutOfDate); compact anyway
        # etcd's Compact(i) keeps i as the dummy (first index i+1); ours keeps i-1
        self.storage.compact(idx + 1)

    def handle(self, op: bytes, p: bytes) -> bool:
        """One input frame; False on exit."""
        rn = self.rn
        try:
            # the frequent frames first: step, sync, propose, tick
            if op == b"s":
                m = pb.Message()
                m.ParseFromString(p)
                rn.step(m)
            elif op == b"y":
                self.handle_ready()
                # with no Ready pending, the persisted hard state holds the current commit
                commit = self.storage.hard_state.commit
                self.emit(b"K", b"%d %d %d" % (commit, self.applied, self.storage.last_index()))
            elif op == b"p":
                rn.propose(p)
            elif op == b"t":
                for _ in range(int(p or b"1")):
                    rn.tick()
            elif op == b"c":
                rn.campaign()
            elif op == b"v":
                cc = pb.ConfChangeV2()
                cc.ParseFromString(p)
                rn.propose_conf_change(cc)
            elif op == b"x":
                rn.transfer_leader(int(p))
            elif op == b"q":
                self.emit(b"Q", self.status_json())
            elif op == b"u":
                rn.report_unreachable(int(p))
            elif op == b"n":
                pid, ok = p.split()
                rn.report_snapshot(int(pid), ok == b"ok")
            elif op == b"k":
                self.compact(p)
            elif op == b"z":
                return False
            else:
                self.emit_err(f"unknown opcode {op!r}")
        except Exception as exc:  # every refusal is an 'X' frame, never a dead node
            self.emit_err(f"op {op.decode(errors='replace')}: {exc!r}")
        return True


def serve(node: AdapterNode, fd_in: int = 0, fd_out: int = 1) -> None:
    """Read frames until EOF or 'z'; write replies once no complete frame is pending."""
    buf = bytearray()
    running = True
    while running:
        # 64 KiB: a 1 MiB read buffer is an mmap + page faults on every frame batch
        chunk = os.read(fd_in, 1 << 16)
        if not chunk:
            break
        buf += chunk
        i = 0
        n = len(buf)
        while running and n - i >= 4:
            ln = _HDR.unpack_from(buf, i)[0]
            if n - i - 4 < ln:
                break
            if ln:
                running = node.handle(bytes(buf[i + 4:i + 5]), bytes(buf[i + 5:i + 4 + ln]))
            i += 4 + ln
        del buf[:i]
        if node.out:
            view = memoryview(node.out)
            while view:
                k = os.write(fd_out, view)
                view = view[k:]
            view.release()
            node.out.clear()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="one RawNode of this project behind the raftnode framing")
    ap.add_argument("-id", type=int, required=True)
    ap.add_argument("-peers", default="")
    ap.add_argument("-learners", default="")
    ap.add_argument("-election", type=int, default=10)
    ap.add_argument("-heartbeat", type=int, default=1)
    ap.add_argument("-prevote", action="store_true")
    ap.add_argument("-checkquorum", action="store_true")
    # raftnode's default (1 MiB per append) so mixed clusters batch alike
    ap.add_argument("-max-size-per-msg", dest="max_size_per_msg", type=int, default=1 << 20)
    ap.add_argument("-max-inflight", dest="max_inflight", type=int, default=256)
    ap.add_argument("-seed", type=int, default=None, help="election-timeout RNG seed (default: the id)")
    ap.add_argument("-ready", default="sync", choices=["sync"])
    ap.add_argument("-v", action="store_true", help="raft log to stderr")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    node = AdapterNode(parse_args(argv))
    node.handle_ready()  # anything the start-up produced, like raftnode does
    serve(node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
