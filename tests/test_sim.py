"""CI share of the randomized Raft simulation (tests/sim): 300 seeds on
MemoryStorage and 20 on DiskStorage, every one with the lost-state faults
(wipe, a damaged synced WAL tail that recovery cuts, a wipe right after a vote)
and the service's fsync shortcut drawn from its seed, plus checks that the
harness itself can fail (a host that sends acks before fsync, a disk that forgets
synced data, checkers fed impossible histories, nodes that lost state voting
without Config.lost_state's rule) and replays a seed exactly.

The seeds run in a pool of SIM_JOBS processes (default 2). A failing seed prints
the one-line command that replays it with a trace. `make soak` runs 10,000 seeds.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import tempfile

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from tests.sim import Result, SimFailure, run_seed
from tests.sim.checkers import Checker, InvariantViolation
from tests.sim.host import SimNode
from tests.sim.stores import MemoryBackend, scratch_dir

MEMORY_SEEDS = range(0, 300)
DISK_SEEDS = range(100_000, 100_020)
# Seeds `make soak` failed on, each fixed since (also run in CI): 1669, a node that lost
# its vote in term 16 counted an election right after its restart as witnessed (core);
# 2687, the host's bound on Readies without input counted a backlog applied one entry
# per Ready (harness); 3401, a wipe while no leader was known and a conf change sat in a
# log left 2 of 4 voters lost (harness: the fault model allows a lost minority only);
# 100422 (disk), recovery that adopted a snapshot file of a newer term kept the vote of
# the older term in it (raft/recovery.py); 100030 and 100476 (disk), the simulated crash
# kept a torn prefix ending in mid-sector and then zeros, which is not a crash state, so
# recovery (rightly) said synced data was lost; after a crash of every node a majority
# withheld votes (harness: tests/crash_sim.py).
SOAK_REGRESSION_SEEDS = ((1669, "memory"), (2687, "memory"), (3401, "memory"), (100422, "disk"),
                         (100030, "disk"), (100476, "disk"))
CHUNK = 25
JOBS = int(os.environ.get("SIM_JOBS", "2"))


def _run_one(args: tuple[int, str]) -> tuple[int, Result | str]:
    seed, storage = args
    try:
        with tempfile.TemporaryDirectory(prefix="sim-", dir=scratch_dir()) as workdir:
            return seed, run_seed(seed, storage, workdir=workdir)  # DiskStorage dirs on tmpfs when there is one
    except SimFailure as e:
        return seed, str(e)


@functools.cache
def _results(storage: str) -> dict[int, Result | str]:
    """Every seed of a storage kind runs once per session, JOBS at a time (spawned
    workers: this pytest process may hold threads of other tests, which fork does not
    mix well with); the chunk tests and the coverage test below read the outcomes."""
    seeds = MEMORY_SEEDS if storage == "memory" else DISK_SEEDS
    work = [(seed, storage) for seed in seeds]
    if JOBS <= 1:
        return dict(map(_run_one, work))
    with multiprocessing.get_context("spawn").Pool(JOBS) as pool:
        return dict(pool.imap_unordered(_run_one, work, chunksize=2))


def _memory_result(seed: int) -> Result:
    r = _results("memory")[seed]
    assert isinstance(r, Result), r
    return r


def _run_chunk(seeds: range, storage: str) -> None:
    outcomes = _results(storage)
    failures = [outcomes[seed] for seed in seeds if isinstance(outcomes[seed], str)]
    assert not failures, f"{len(failures)} seed(s) failed:\n\n" + "\n\n".join(failures)


@pytest.mark.parametrize("start", range(MEMORY_SEEDS.start, MEMORY_SEEDS.stop, CHUNK))
def test_simulation_memory_storage(start):
    _run_chunk(range(start, min(start + CHUNK, MEMORY_SEEDS.stop)), "memory")


@pytest.mark.parametrize("start", range(DISK_SEEDS.start, DISK_SEEDS.stop, 10))
def test_simulation_disk_storage(start):
    _run_chunk(range(start, min(start + 10, DISK_SEEDS.stop)), "disk")


def test_a_seed_replays_exactly():
    a = run_seed(7)
    b = run_seed(7)
    assert (a.steps, a.committed, a.checks, a.messages, a.faults) == (b.steps, b.committed, b.checks, b.messages, b.faults)
    assert a.committed > 5, "the run should commit entries, or it checks nothing"
    assert a.checks > 100


def test_runs_exercise_the_faults_they_claim():
    """Across the CI seeds every fault and operator action actually happens (the
    outcomes are computed once per session, so reading all of them costs nothing)."""
    seen: dict[str, int] = {}
    for seed in MEMORY_SEEDS:
        r = _memory_result(seed)
        for k, v in {**r.faults, **r.workload}.items():
            seen[k] = seen.get(k, 0) + v
    boundaries = ["ready taken", "messages sent", "written, not synced", "synced", "persisted messages sent",
                  "committed entries handed out", "advanced"]
    lost_state = ["wipe", "synced tail", "wipe after vote", "lost state settled", "commit-only ready not synced",
                  "power cut lost unsynced writes", "power cut lost a commit-only hard state"]
    for kind in [f"crash@{b}" for b in boundaries] + lost_state + [
                 "crash between steps", "restart", "pause", "slow voter", "stale redelivery", "cc leave joint",
                 "cc add_learner", "cc demote_voter",
                 "net isolate", "net bipartition", "net bridge", "net oneway_in", "net oneway_out",
                 "net leader_mute", "net leader_deaf", "net random_links", "transfer", "cc add", "cc remove",
                 "cc remove_leader", "cc replace_one", "cc replace_all", "propose ok"]:
        assert seen.get(kind, 0) > 0, f"no '{kind}' in {len(MEMORY_SEEDS)} seeds: {sorted(seen)}"


def test_disk_runs_damage_real_wal_files():
    """The disk seeds' lost-state faults act on DiskStorage's files, and a WAL whose
    damage recovery refuses to cut gets the operator's wipe."""
    seen: dict[str, int] = {}
    for r in _results("disk").values():
        assert isinstance(r, Result), r
        for k, v in r.faults.items():
            seen[k] = seen.get(k, 0) + v
    for kind in ["wipe", "synced tail", "wipe after vote", "lost state settled", "commit-only ready not synced"]:
        assert seen.get(kind, 0) > 0, f"no '{kind}' in the disk seeds: {sorted(seen)}"


# ---- the harness must be able to fail ------------------------------------------------

# Seeds on which nodes that lost state, voting as plain Raft would (--no-protect), break
# safety. Deterministic: a seed replays exactly. If a change to the simulation moves them,
# `python -m tests.sim --soak 300 --no-protect` lists new ones (about one seed in five).
DOUBLE_VOTE_SEEDS = [2, 17, 24]
# With the double-vote check off, the second vote elects a leader that lacks a committed
# entry (leader completeness). Before the core's lost-log catch-up fix (issue 13 #4) seed
# 124 also elected two leaders in one term; 600 seeds after it show only this harm.
LOST_COMMIT_SEEDS = [41, 106]


@pytest.mark.parametrize("seed", DOUBLE_VOTE_SEEDS)
def test_without_the_lost_state_rule_a_node_votes_twice_in_a_term(seed):
    with pytest.raises(SimFailure, match=r"double vote: node \d+ voted for \d+ and then for \d+") as e:
        run_seed(seed, protect=False)
    assert "--no-protect" in str(e.value)
    run_seed(seed)  # the same faults with the rule: safe


@pytest.mark.parametrize("seed", LOST_COMMIT_SEEDS)
def test_without_the_lost_state_rule_the_second_vote_breaks_safety(monkeypatch, seed):
    monkeypatch.setattr(Checker, "on_vote", lambda self, *a: None)
    with pytest.raises(SimFailure, match=r"(leader completeness: leader \d+ of term=|election safety: nodes \d+ "
                                         r"and \d+ are both leader in term=)"):
        run_seed(seed, protect=False)
    run_seed(seed)  # with the rule: safe




def test_acks_sent_before_fsync_are_caught(monkeypatch):
    """A host that releases persisted_messages before sync() is reported with its replay command."""

    original_handle = SimNode._handle_ready

    def handle_ready_sending_early(self):
        raw = self.raw
        real_ready = raw.ready

        def ready_and_send_everything_now():
            rd = real_ready()
            rd.messages = list(rd.messages) + list(rd.persisted_messages)
            rd.persisted_messages = []
            return rd

        raw.ready = ready_and_send_everything_now
        try:
            original_handle(self)
        finally:
            if self.raw is raw:
                del raw.ready

    monkeypatch.setattr(SimNode, "_handle_ready", handle_ready_sending_early)
    with pytest.raises(SimFailure) as e:
        for seed in range(20):
            run_seed(seed)
    text = str(e.value)
    assert re.search(r"before (self-vote )?persisted", text), text
    assert "replay: .venv/bin/python -m tests.sim --seed" in text


def test_a_disk_that_forgets_synced_state_is_caught(monkeypatch):
    """Crash = lose *everything* since start (a lying fsync): some seed must break safety or stall."""

    def crash_forgetting_all(self):
        from raft.storage import MemoryStorage
        from tests.sim.stores import _RecordingStorage

        self.storage = _RecordingStorage(MemoryStorage(), MemoryStorage())

    monkeypatch.setattr(MemoryBackend, "crash", crash_forgetting_all)
    with pytest.raises(SimFailure):
        for seed in range(40):
            run_seed(seed)


def _entry(index: int, term: int, data: bytes) -> pb.Entry:
    return pb.Entry(index=index, term=term, data=data)


def test_checker_rejects_two_leaders_in_one_term():
    ck = Checker()
    ck.on_leader(1, 7)
    ck.on_leader(1, 7)
    with pytest.raises(InvariantViolation, match="both leader in term=7"):
        ck.on_leader(2, 7)


def test_checker_rejects_a_double_vote():
    ck = Checker()
    ck.on_vote(3, 9, 1, "granted")
    with pytest.raises(InvariantViolation, match="double vote"):
        ck.on_vote(3, 9, 2, "granted")


def test_checker_rejects_divergent_committed_entries():
    ck = Checker()
    ck.on_committed(1, _entry(6, 6, b"a"), 6)
    ck.on_committed(2, _entry(6, 6, b"a"), 6)
    with pytest.raises(InvariantViolation, match="state-machine safety"):
        ck.on_committed(3, _entry(6, 7, b"b"), 7)


def test_checker_rejects_log_matching_violations():
    ck = Checker()
    ck.on_log_entry(1, _entry(7, 3, b"x"), 2)
    with pytest.raises(InvariantViolation, match="log matching"):
        ck.on_log_entry(2, _entry(7, 3, b"x"), 1)


def test_checker_rejects_a_leader_missing_committed_entries():
    ck = Checker()
    ck.on_committed(1, _entry(6, 6, b"a"), 6)
    with pytest.raises(InvariantViolation, match="leader completeness"):
        ck.check_leader_completeness(2, 8, lambda i: 7)


def test_checker_rejects_acks_ahead_of_durable_state():
    ck = Checker()
    vote = pb.Message(msg_type=pb.MsgRequestVoteResponse, to=2, term=5)
    with pytest.raises(InvariantViolation, match="vote sent before persisted"):
        ck.on_send(1, vote, pb.HardState(term=4), 10)
    ack = pb.Message(msg_type=pb.MsgAppendResponse, to=2, term=5, index=12)
    with pytest.raises(InvariantViolation, match="append ack before persisted"):
        ck.on_send(1, ack, pb.HardState(term=5), 11)
    ck.on_send(1, ack, pb.HardState(term=5), 12)


def test_checker_rejects_vote_requests_before_the_self_vote_is_durable():
    ck = Checker()
    req = pb.Message(msg_type=pb.MsgRequestVote, to=2, term=6)
    with pytest.raises(InvariantViolation, match="self-vote persisted"):
        ck.on_send(1, req, pb.HardState(term=6, vote=0), 10)
    ck.on_send(1, req, pb.HardState(term=6, vote=1), 10)


@pytest.mark.parametrize("seed,storage", SOAK_REGRESSION_SEEDS)
def test_soak_regression_seed(seed, storage):
    _, outcome = _run_one((seed, storage))
    assert not isinstance(outcome, str), outcome   # a failure names the replay command
