"""CI run of the crash-state explorer (tests/crash_explore): every operation
boundary of the storage workloads, under a process crash and a power loss,
plus crashes during the recovery of those states; `make crash-explore` runs the
full exploration (every sector cut, no sampling, one more workload)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft.disk import DiskStorage
from tests.crash_explore.explore import Explorer, check, ci_explorer, report
from tests.crash_explore.fsmodel import FsModel, Recorder, snapshot_dir
from tests.crash_explore.workloads import WORKLOADS, Logical

MIN_STATES = 5000


@pytest.fixture
def scratch(tmp_path):
    shm = "/dev/shm"
    if os.access(shm, os.W_OK):
        d = tempfile.mkdtemp(prefix="crash-explore-", dir=shm)
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield str(tmp_path)


def test_every_crash_state_of_the_storage_workloads_recovers(scratch, capsys):
    ex: Explorer = ci_explorer(scratch, seed=1)
    t0 = time.monotonic()
    stats = ex.run(sorted(WORKLOADS))
    failures = report(stats, time.monotonic() - t0)
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + "\n".join(line for line in out.splitlines() if "states checked" in line))
    assert failures == 0, out
    assert {"process-L1", "power-L1", "process-L2", "power-L2"} <= set(stats)
    total = sum(st.checked for st in stats.values())
    assert total >= MIN_STATES, f"only {total} distinct crash states explored"
    assert stats["process-L1"].checked >= 100 and stats["power-L1"].checked >= 300


# ---- the explorer itself can fail ------------------------------------------------------


def test_recorder_sees_every_kind_of_operation(tmp_path):
    root = str(tmp_path / "r")
    os.mkdir(root)
    with Recorder(root) as rec:
        s = DiskStorage.open(os.path.join(root, "data"), segment_bytes=300)
        for i in range(1, 6):
            s.append([pb.Entry(index=i, term=1, data=b"x" * 100)])
            s.sync()
        s.set_applied(3, pb.ConfState(voters=[1]), b"c")
        s.sync()
        s.create_snapshot(3, pb.ConfState(voters=[1]), b"s")
        s.close()
    kinds = {op[0] for op in rec.ops}
    assert {"open", "write", "fsync", "rename", "mkdir", "close"} <= kinds, kinds
    # Replaying the recording rebuilds exactly what is on disk.
    model = FsModel({})
    for op in rec.ops:
        model.apply(op)
    state = model.process_crash()
    real = snapshot_dir(root)
    assert {k: v for k, v in state.items()} == real


def test_power_loss_drops_unsynced_writes_and_keeps_synced_ones():
    model = FsModel({"d": None})
    model.apply(("open", "d/f", os.O_WRONLY | os.O_CREAT, 3, False))
    model.apply(("write", 3, b"A" * 600))
    model.apply(("fsync", 3))
    model.apply(("open", "d", os.O_RDONLY, 4, True))
    model.apply(("fsync", 4))  # the file's name is durable now
    model.apply(("write", 3, b"B" * 600))
    states = [st for st, _hole in model.power_losses(None, None, random.Random(0))]
    contents = {st["d/f"] for st in states}
    assert b"A" * 600 in contents, "the unsynced write dropped"
    assert b"A" * 600 + b"B" * 600 in contents, "kept"
    assert b"A" * 600 + b"\0" * 600 in contents, "zeros"
    assert b"A" * 600 + b"B" * 424 in contents, "torn at the sector boundary 1024"
    assert all(c.startswith(b"A" * 600) for c in contents), "synced data is never lost"


def test_power_loss_without_a_directory_fsync_may_lose_the_new_name():
    model = FsModel({"d": None})
    model.apply(("open", "d/f", os.O_WRONLY | os.O_CREAT, 3, False))
    model.apply(("write", 3, b"A"))
    model.apply(("fsync", 3))
    names = [set(st) for st, _h in model.power_losses(None, None, random.Random(0))]
    assert {"d"} in names and {"d", "d/f"} in names


def test_check_catches_a_lost_acknowledged_entry(tmp_path):
    from tests.crash_explore.explore import Boundary, Written

    s = DiskStorage.open(str(tmp_path / "data"))
    s.append([pb.Entry(index=1, term=1, data=b"a")])
    s.set_hardstate(pb.HardState(term=1, vote=1, commit=0))
    s.sync()
    acked = Logical(entries={1: (1, b"a"), 2: (1, b"b")}, last=2, hs=(1, 1, 0))
    w = Written()
    for i, (t, d) in acked.entries.items():
        w.add("entry", (i, t, d))
    w.add("hs", (1, 1, 0))
    w.add("applied", (0, b""))
    with pytest.raises(AssertionError, match="acknowledged entry 2 lost"):
        check(s, Boundary(0, acked, w, []), False)
    acked.hs = (2, 1, 0)
    with pytest.raises(AssertionError, match="term went back"):
        check(s, Boundary(0, Logical(hs=(2, 1, 0)), w, []), False)
    s.close()
