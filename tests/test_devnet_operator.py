"""The devnet command as an operator uses it (issue 15 §2): the status table
and compact watch line, the events of watch, blocks/s over a window, logs
merged with per-process prefixes, one-line errors, help for every flag, and
`up` resuming a devnet after `down` (stub consensus: no raft needed)."""
from __future__ import annotations

import argparse
import io
import itertools
import subprocess
import sys

import pytest

from devnet import cli
from devnet.ops import Devnet


def node(i, role="follower", term=3, commit=40, applied=40, lag=0, stuck=False, in_raft=True, stale=False,
         height=20, pid=100, ctl=200, validator=True, ready=True):
    return {"node": i, "role": role if in_raft else "not in raft", "in_raft": in_raft, "term": term,
            "commit_index": commit, "applied_index": applied, "last_index": commit, "lag": lag, "stuck": stuck,
            "ready": ready, "stale_leader": stale, "height": height, "tip": "abcdef012345", "validator": validator,
            "consensus_pid": pid + i, "controller_pid": ctl + i, "knows_leader": 0}


def status(nodes, leader=0, cut=0):
    net = {"stats": {"sent": 1, "broadcast": 1, "delivered": 1, "dropped_cut": 0, "dropped_fault": 0,
                     "duplicated": 0, "retries": 0}, "faults": {"cut": [[0, 1]] * cut}}
    return {"dir": "/tmp/dn", "leader": leader, "nodes": nodes, "network": net}


def row(text: str, i: int) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"{i:>4} "))


def test_status_table_marks_leader_stuck_stale_leader_and_non_validators():
    st = status([node(0, "leader"), node(1, commit=5, lag=35, stuck=True, ready=False),
                 node(2, "leader", term=2, stale=True, lag=10), node(3, in_raft=False, validator=False)])
    text = cli.render(st)
    assert "leader: node0" in text
    assert "consensus_pid" in text and "controller_pid" in text          # labelled pid columns
    assert row(text, 0).split()[1] == "leader*"
    assert "STUCK" in row(text, 1) and row(text, 1).split()[5] == "35"
    assert row(text, 2).split()[1] == "leader?" and "NO-QUORUM" in row(text, 2)
    r3 = row(text, 3)
    assert "not in raft" in r3 and "follower" not in r3 and " 0 " not in r3.split("not in raft")[1][:30]


def test_watch_line_when_not_a_terminal_is_one_line_per_refresh():
    st = status([node(0, "leader"), node(1, stuck=True), node(2, in_raft=False)])
    line = cli.compact(st, 1.5, 12.0)
    assert "\n" not in line
    assert line.startswith("t=12.0s leader=node0 bps=1.50")
    assert "node1 follower term=3 commit=40 lag=0 h=20 STUCK" in line and "node2 not in raft h=20" in line


def test_watch_events():
    before = status([node(0, "leader"), node(1), node(2)])
    after = status([node(0, "leader", term=3, stale=True), node(1, term=4), node(2, "leader", term=4)], leader=2,
                   cut=4)
    after["nodes"][1]["consensus_pid"] = None
    after["nodes"][1]["stuck"] = True
    events = cli.events_between(before, after)
    assert "leader is node2 (term 4), was node0" in events
    assert "election: term 3 -> 4" in events
    assert "node1: consensus down (pid 101 gone)" in events
    assert "node0: a leader without quorum (term 3)" in events
    assert "network partition: 4 directed links cut" in events
    assert cli.events_between(after, status([node(0), node(1), node(2, "leader", term=4)], leader=2))[-1] == \
        "network healed: no link cut"
    assert cli.events_between(None, after) == []


def test_watch_events_for_a_node_that_lost_its_raft_state():
    ok = status([node(0, "leader"), node(1), node(2)])
    wiped = status([node(0, "leader"), node(1), node(2)])
    for n in ok["nodes"]:
        n["withholding_votes"] = False
    for n in wiped["nodes"]:
        n["withholding_votes"] = n["node"] == 1
    assert "node1: lost its raft state, withholding votes until it sees an election" in cli.events_between(ok, wiped)
    assert "node1: voting again" in cli.events_between(wiped, ok)
    assert not any("withholding" in e or "voting again" in e for e in cli.events_between(ok, ok))


def test_blocks_per_second_is_a_window_average():
    r = cli.Rate(window=10.0)
    assert r.add(0.0, 0) is None
    assert r.add(1.0, 5) == 5.0
    for t in range(2, 31):
        r.add(float(t), 5 + (t - 1))          # one block a second after a burst of 5
    assert r.add(31.0, 35) == pytest.approx(1.0)


def test_watch_writes_events_and_lines_to_a_pipe(monkeypatch):
    snaps = iter([status([node(0, "leader"), node(1)]), status([node(0), node(1, "leader", term=4)], leader=1)])

    class Fake:
        def status(self):
            return next(snaps)
    out = io.StringIO()
    clock = itertools.chain([0.0, 0.0, 0.5, 1.0, 1.5], itertools.repeat(9.0))
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    cli.watch(Fake(), duration=2.0, out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("t=") and "event" in lines[1] and "leader is node1" in lines[1]
    assert lines[-1].startswith("t=") and "leader=node1" in lines[-1] and "\x1b" not in out.getvalue()


@pytest.fixture
def laid_out(tmp_path):
    """A devnet dir (spec and configs) with no process running."""
    return Devnet.create(str(tmp_path / "dn"), nodes=3, base_port=None)


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_friendly_one_line_errors(tmp_path, laid_out, capsys):
    code, out, err = run_cli(capsys, "--dir", str(tmp_path / "none"), "status")
    assert code == 1 and err.count("\n") == 1 and "no devnet in" in err and "devnet" in err and "up" in err
    d = laid_out.spec.dir
    for args, text in ((["partition", "9"], "no node 9: this devnet has nodes 0..2"),
                       (["partition", "0,1", "1,2"], "node 1 is in two groups"),
                       (["partition", "0,1,2"], "cuts nothing"),
                       (["partition", "a"], "not a node index"),
                       (["kill", "5"], "no node 5"),
                       (["logs", "7"], "no node 7"),
                       (["logs", "bogus"], "no log 'bogus'")):
        code, out, err = run_cli(capsys, "--dir", d, *args)
        assert code == 1 and text in err and err.count("\n") == 1, (args, err)
    # a simulator that is not running: no gRPC status dict, a hint instead
    code, out, err = run_cli(capsys, "--dir", d, "partition", "0")
    assert code == 1 and "network hub is not running" in err and "StatusCode" not in err
    code, out, err = run_cli(capsys, "--dir", d, "controller-fault", "1", "--fail-rate", "1")
    assert code == 1 and "node1's controller is not running" in err


def test_logs_are_merged_by_time_with_a_prefix(laid_out, capsys):
    spec = laid_out.spec
    import os
    os.makedirs(os.path.dirname(spec.log_file("network")), exist_ok=True)
    with open(spec.log_file("consensus0"), "w") as f:
        f.write("Dec 05 13:39:35.179 INFO became leader\nDec 05 13:39:37.000 INFO committed block height=1\n"
                "  continuation line\n")
    with open(spec.log_file("controller1"), "w") as f:
        f.write("2026-12-05 13:39:36,100 INFO controller1 synced heights 1..1\n")
    code, out, err = run_cli(capsys, "--dir", spec.dir, "logs")
    assert code == 0, err
    assert out.splitlines() == [
        "consensus0  | Dec 05 13:39:35.179 INFO became leader",
        "controller1 | 2026-12-05 13:39:36,100 INFO controller1 synced heights 1..1",
        "consensus0  | Dec 05 13:39:37.000 INFO committed block height=1",
        "consensus0  |   continuation line",
    ]
    code, out, err = run_cli(capsys, "--dir", spec.dir, "logs", "1")
    assert out.splitlines() == ["controller1 | 2026-12-05 13:39:36,100 INFO controller1 synced heights 1..1"]


def test_every_command_and_flag_has_help_and_an_example():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.epilog and "example" in p.epilog, f"`devnet {name} -h` shows no example"
        for action in p._actions:
            if action.dest in ("help",):
                continue
            assert action.help, f"devnet {name}: {action.option_strings or action.dest} has no help text"


def test_up_after_down_resumes_the_devnet(tmp_path, capsys):
    d = str(tmp_path / "resume")
    assert run_cli(capsys, "--dir", d, "up", "--nodes", "2", "--stub", "--block-interval", "0")[0] == 0
    try:
        code, out, err = run_cli(capsys, "--dir", d, "down")
        assert code == 0 and "up` resumes it" in out
        code, out, err = run_cli(capsys, "--dir", d, "up")
        assert code == 0 and "resuming the devnet" in out, err
        assert all(Devnet.open(d).running().values())
    finally:
        run_cli(capsys, "--dir", d, "down")


def test_a_process_inside_execve_counts_as_running(tmp_path, monkeypatch):
    """Popen returns once close-on-exec fires inside execve, before the kernel has
    set up the new program's arguments: /proc/<pid>/cmdline reads empty for that
    moment. `up` then `running()` saw a just-started node as down (1 run in 6 of
    test_up_after_down_resumes_the_devnet on a loaded machine). A live process
    whose cmdline is empty for a while is waited for, not declared gone."""
    from devnet import procs
    marker = str(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        pid_file = str(tmp_path / "child.pid")
        with open(pid_file, "w") as f:
            f.write(str(child.pid))
        real = procs._cmdline
        reads = []

        def mid_exec(pid):   # the first reads fall inside execve
            reads.append(pid)
            return "" if len(reads) <= 3 else real(pid)
        monkeypatch.setattr(procs, "_cmdline", mid_exec)
        assert procs.alive(pid_file, marker) == child.pid
        assert len(reads) == 4
        monkeypatch.setattr(procs, "_cmdline", lambda pid: "")   # never any arguments: not ours
        assert procs.alive(pid_file, marker) is None
    finally:
        child.kill()
        child.wait()
    monkeypatch.setattr(procs, "_cmdline", real)
    assert procs.alive(pid_file, marker) is None   # gone
