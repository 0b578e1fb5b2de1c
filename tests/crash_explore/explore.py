"""Crash-state explorer for raft/ storage (in the manner of ALICE, OSDI'14).

Each workload (workloads.py) runs once on a real directory while every
file-system operation is recorded (fsmodel.Recorder). Then, at every
operation boundary, the explorer builds the on-disk states a crash could
leave there, under two models (fsmodel.FsModel, docs/internals.md):

* process crash: every completed operation kept;
* power loss: only what fsync/fdatasync and directory fsync made durable,
  plus any in-order prefix of the other metadata operations, and each
  unsynced write dropped, kept, zeroed or torn at a sector boundary.

Every distinct state is written to a scratch directory and opened with
`DiskStorage.open`; then it must hold (`check`):

* it opens (a crash state is never refused) and says it lost no synced data
  (`recovery_lost_synced` is False; a power-loss state with a hole, a lost
  write followed by a kept one in the same file, may say True);
* nothing acknowledged is lost: the entries, hard state, snapshot, applied
  index and abort height of the last completed sync are there (entries may
  only be replaced by ones written after it, or covered by a snapshot);
* nothing appears that was never written (entries, hard state, snapshots,
  applied records, abort heights);
* term and vote never go back.

Second level (double crashes): on states of the first level, recovery itself
and a continuation that appends until the WAL rotates are recorded and
explored the same way, so a crash during recovery or right after it (the
LAST defect of issue 13) is covered.

    python -m tests.crash_explore [--full] [--workload NAME] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

from raft.disk import DiskStorage

from .fsmodel import SIGNIFICANT, FsModel, Recorder, materialize, state_key
from .workloads import (
    DATA,
    FULL_WORKLOADS,
    LEVEL2_EVERY,
    LOG,
    SEGMENT_BYTES,
    WORKLOADS,
    Driver,
    Logical,
    Timeline,
    continuation,
    rust_files,
)


@dataclass
class Written:
    entries: set = field(default_factory=set)
    hs: set = field(default_factory=set)
    snaps: set = field(default_factory=set)
    applied: set = field(default_factory=set)
    aborts: set = field(default_factory=set)
    max_term: int = 0

    def add(self, kind: str, v) -> None:  # type: ignore[no-untyped-def]
        if kind == "entry":
            self.entries.add(v)
            self.max_term = max(self.max_term, v[1])
        elif kind == "hs":
            self.hs.add(v)
            self.max_term = max(self.max_term, v[0])
        elif kind == "snap":
            self.snaps.add(v)
            self.max_term = max(self.max_term, v[1])
        elif kind == "applied":
            self.applied.add(v)
        elif kind == "abort":
            self.aborts.add(v)


@dataclass
class Recording:
    name: str
    initial: dict
    ops: list
    timeline: Timeline


@dataclass
class Boundary:
    index: int
    acked: Logical
    written: Written
    pending: list  # ("w", kind, value) events since the last ack


def significant(op: tuple) -> bool:
    if op[0] == "open":
        _k, _rel, flags, _fd, existed = op
        return bool((not existed and flags & os.O_CREAT) or (existed and flags & os.O_TRUNC))
    return op[0] in SIGNIFICANT


def boundaries(rec: Recording):
    """Yield (Boundary, model) at every boundary after a state-changing operation."""
    model = FsModel(rec.initial)
    events = rec.timeline.events
    ev = 0
    written = Written()
    acked: Logical | None = None
    pending: list = []
    ops = rec.ops
    for i in range(len(ops) + 1):
        while ev < len(events) and events[ev][0] <= i:
            e = events[ev][1]
            ev += 1
            if e[0] == "ack":
                acked, pending = e[1], []
            else:
                written.add(e[1], e[2])
                pending.append(e)
        if acked is not None and (i == 0 or significant(ops[i - 1])):
            yield Boundary(i, acked, written, list(pending)), model
        if i < len(ops):
            model.apply(ops[i])


def check(s: DiskStorage, b: Boundary, may_lose: bool) -> None:
    """Raise AssertionError if the recovered `s` breaks a rule (module docstring)."""
    A, W = b.acked, b.written
    if not may_lose:
        assert not getattr(s, "recovery_lost_synced", False), (
            "recovery says it lost synced data in a pure crash state"
        )
    hs = s.initial_state().hard_state
    term, vote, commit = hs.term, hs.vote, hs.commit
    at, av, ac = A.hs
    assert term >= at, f"term went back: {term} < acknowledged {at}"
    if term == at and av:
        assert vote == av, f"vote changed in term {term}: {vote} != acknowledged {av}"
    assert term <= W.max_term, f"term {term} was never written (max {W.max_term})"
    assert vote == 0 or any(v == vote for _t, v, _c in W.hs), f"vote {vote} never written"
    assert commit >= ac, f"commit went back: {commit} < acknowledged {ac}"
    first, last = s.first_index(), s.last_index()
    assert commit <= last, f"commit {commit} beyond last index {last}"
    sn = s.snapshot(0, 0)
    sidx = sn.metadata.index
    assert sidx >= A.snap[0], f"snapshot went back: {sidx} < acknowledged {A.snap[0]}"
    if sidx:
        assert (sidx, sn.metadata.term, sn.data) in W.snaps, (
            f"snapshot {sidx}/{sn.metadata.term} never written"
        )
    got = {}
    if last >= first:
        for e in s.entries(first, last + 1):
            got[e.index] = (e.term, e.data)
            assert (e.index, e.term, e.data) in W.entries, f"entry {e.index} term {e.term} was never written"
    if first - 1 >= 1 and first - 1 in A.entries and first - 1 > sidx:
        assert s.term(first - 1) == A.entries[first - 1][0], f"boundary term of {first - 1} changed"
    floor = A.last
    for e in b.pending:
        if e[1] == "trunc":
            floor = min(floor, e[2] - 1)
    for i, ent in A.entries.items():
        if i <= sidx:
            continue  # covered by a snapshot recovery holds
        if i <= floor:
            assert i in got, f"acknowledged entry {i} lost (log {first}..{last}, snapshot {sidx})"
            assert got[i] == ent, f"acknowledged entry {i} changed: term {got[i][0]} != {ent[0]}"
    ai, ad = s.applied_index(), s.applied_data()
    assert ai >= A.applied[0], f"applied index went back: {ai} < {A.applied[0]}"
    assert (ai, ad) in W.applied or (ai == sidx and ad == sn.data), f"applied {ai} never written"
    pending_aborts = {e[2] for e in b.pending if e[1] == "abort"}
    assert s.abort_height() == A.abort or s.abort_height() in pending_aborts, (
        f"abort height {s.abort_height()} != acknowledged {A.abort}"
    )


@dataclass
class Stats:
    generated: int = 0
    checked: int = 0
    failures: list = field(default_factory=list)


class Explorer:
    def __init__(
        self,
        full: bool,
        seed: int,
        scratch: str,
        level2_every: int,
        max_cuts: int | None,
        cap: int | None,
        level2_power: bool,
        fail_dir: str | None = None,
    ) -> None:
        self.full = full
        self.rng = random.Random(seed)
        self.scratch = scratch
        self.level2_every = level2_every
        self.max_cuts = max_cuts
        self.cap = cap
        self.level2_power = level2_power
        self.fail_dir = fail_dir
        self.stats: dict[str, Stats] = {}
        self.seen: dict[str, set] = {}
        self._n = 0

    def stat(self, model: str) -> Stats:
        return self.stats.setdefault(model, Stats())

    # ---- recording --------------------------------------------------------------------

    def record(self, name: str, fn, initial: dict, acked: Logical, pre: Timeline | None = None) -> Recording:  # type: ignore[no-untyped-def]
        root = os.path.join(self.scratch, "rec")
        materialize(initial, root)
        with Recorder(root) as rec:
            d = Driver(rec, root, acked, pre)
            timeline = d.t
            try:
                fn(d)
            finally:
                if d.s is not None and d.s._lock_fd is not None:  # a failed workload: release it
                    d.s._writer.close()
                    os.close(d.s._lock_fd)
        return Recording(name, initial, rec.ops, timeline)

    def record_workload(self, name: str) -> Recording:
        initial: dict = {}
        acked = Logical()
        if name == "import":
            initial = {DATA: None, **{f"{DATA}/{k}": v for k, v in rust_files().items()}}
            probe = os.path.join(self.scratch, "probe")
            materialize(initial, probe)
            s = DiskStorage.open(os.path.join(probe, DATA), logger=LOG, segment_bytes=SEGMENT_BYTES)
            acked = Logical.of(s)  # every crash state must recover at least the import
            s.close()
        return self.record(name, FULL_WORKLOADS[name], initial, acked)

    # ---- exploring ----------------------------------------------------------------------

    def try_state(self, model: str, label: str, state: dict, b: Boundary, may_lose: bool, ops: list) -> bool:
        """Check one state (once per distinct state and model); True if it was new."""
        st = self.stat(model)
        st.generated += 1
        key = state_key(state)
        seen = self.seen.setdefault(model + ":" + label.split("@")[0], set())
        if key in seen:
            return False
        seen.add(key)
        st.checked += 1
        root = os.path.join(self.scratch, "state")
        materialize(state, root)
        s = None
        try:
            s = DiskStorage.open(os.path.join(root, DATA), logger=LOG, segment_bytes=SEGMENT_BYTES)
            check(s, b, may_lose)
        except Exception as err:  # noqa: BLE001 - every failure is a finding
            where = f"{label} model={model} boundary={b.index}"
            last_ops = [describe(op) for op in ops[max(0, b.index - 4) : b.index]]
            msg = f"{where}: {type(err).__name__}: {err}\n    last ops: {last_ops}"
            if not isinstance(err, AssertionError | OSError) and type(err).__name__ != "CorruptLog":
                msg += "\n" + "".join(traceback.format_exception(err)[-3:])
            st.failures.append(msg)
            if self.fail_dir and len(st.failures) <= 20:
                dst = os.path.join(self.fail_dir, f"{model}-{len(st.failures)}")
                materialize(state, dst)
                with open(os.path.join(dst, "FAILURE.txt"), "w") as f:
                    f.write(msg + "\n")
        finally:
            if s is not None:
                try:
                    s.close()
                except Exception:  # noqa: BLE001
                    pass
        return True

    def explore(self, rec: Recording, level: int = 1, label: str | None = None, hole: bool = False) -> list:
        """Explore every boundary of `rec`; returns the new level-1 states (with
        their boundary and whether they hold a hole) for the second level.
        `hole`: the recording starts from a state with a hole (recovery may
        then say it lost synced data)."""
        label = label or rec.name
        found = []
        for b, model in boundaries(rec):
            state = model.process_crash()
            if (
                self.try_state(f"process-L{level}", f"{label}@{b.index}", state, b, hole, rec.ops)
                and level == 1
            ):
                found.append((state, b, hole))
            if level == 1 or self.level2_power:
                for state, h in model.power_losses(self.max_cuts, self.cap, self.rng):
                    new = self.try_state(
                        f"power-L{level}", f"{label}@{b.index}", state, b, h or hole, rec.ops
                    )
                    if new and level == 1:
                        found.append((state, b, h))
        return found

    def explore_second_level(self, name: str, states: list) -> None:
        every = max(self.level2_every, LEVEL2_EVERY.get(name, 1))
        for k, (state, b, hole) in enumerate(states):
            if k % every:
                continue
            pre = Timeline()
            w = b.written
            for kind, values in (
                ("entry", w.entries),
                ("hs", w.hs),
                ("snap", w.snaps),
                ("applied", w.applied),
                ("abort", w.aborts),
            ):
                for v in values:
                    pre.add(0, ("w", kind, v))
            pre.add(0, ("ack", b.acked))
            for e in b.pending:
                pre.add(0, e)
            try:
                rec = self.record(f"{name}+recover", continuation, state, b.acked, pre)
            except Exception as err:  # noqa: BLE001 - the first-level check reported it already
                self.stat("process-L2").failures.append(f"{name}@{b.index}: continuation failed: {err!r}")
                continue
            self.explore(rec, level=2, label=f"{name}@{b.index}+recover", hole=hole)

    def run(self, names: list[str], out=None) -> dict[str, Stats]:  # type: ignore[no-untyped-def]
        out = out or sys.stdout
        for name in names:
            t0 = time.monotonic()
            rec = self.record_workload(name)
            states = self.explore(rec)
            self.explore_second_level(name, states)
            print(
                f"crash-explore: workload {name}: {len([o for o in rec.ops if significant(o)])} "
                f"operations recorded, explored in {time.monotonic() - t0:.1f}s",
                file=out,
            )
        return self.stats


def describe(op: tuple) -> str:
    if op[0] == "write":
        return f"write(fd{op[1]}, {len(op[2])} bytes)"
    if op[0] == "open":
        return f"open({op[1]}, fd{op[3]})"
    return f"{op[0]}({', '.join(str(a) for a in op[1:])})"


def report(stats: dict[str, Stats], elapsed: float, out=None) -> int:  # type: ignore[no-untyped-def]
    out = out or sys.stdout
    failures = 0
    for model in sorted(stats):
        st = stats[model]
        print(
            f"crash-explore: {model}: {st.checked} distinct states checked "
            f"({st.generated} generated), {len(st.failures)} failed",
            file=out,
        )
        failures += len(st.failures)
    total = sum(st.checked for st in stats.values())
    print(f"crash-explore: {total} states checked in {elapsed:.1f}s, {failures} failures", file=out)
    for model in sorted(stats):
        for msg in stats[model].failures[:10]:
            print("  FAIL " + msg, file=out)
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.crash_explore", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--full", action="store_true", help="every state: all sector cuts, no caps, second level on all"
    )
    ap.add_argument("--workload", action="append", choices=sorted(FULL_WORKLOADS), help="default: all")
    ap.add_argument("--seed", type=int, default=1, help="sampling seed (only used where a cap applies)")
    ap.add_argument("--fail-dir", help="write failing states here (default: a temp dir)")
    args = ap.parse_args(argv)
    base = tempfile.mkdtemp(
        prefix="crash-explore-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    )
    fail_dir = args.fail_dir or os.path.join(tempfile.gettempdir(), f"crash-explore-failures-{os.getpid()}")
    try:
        ex = full_explorer(base, args.seed, fail_dir) if args.full else ci_explorer(base, args.seed, fail_dir)
        t0 = time.monotonic()
        stats = ex.run(args.workload or sorted(FULL_WORKLOADS if args.full else WORKLOADS))
        failures = report(stats, time.monotonic() - t0)
        if failures:
            print(f"crash-explore: failing states written to {fail_dir}")
        return 1 if failures else 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def full_explorer(scratch: str, seed: int, fail_dir: str | None = None) -> Explorer:
    return Explorer(
        True, seed, scratch, level2_every=1, max_cuts=None, cap=None, level2_power=True, fail_dir=fail_dir
    )


def ci_explorer(scratch: str, seed: int, fail_dir: str | None = None) -> Explorer:
    return Explorer(
        False, seed, scratch, level2_every=1, max_cuts=3, cap=64, level2_power=True, fail_dir=fail_dir
    )
