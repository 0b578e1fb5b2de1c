"""Real crash test: a forked child (tests/crash_child.py) writes Readies to
DiskStorage and reports each one over a pipe before it starts and after its
sync() returned; the parent SIGKILLs it at random moments, reopens the
store, and checks that every acknowledged Ready is there and nothing
unacknowledged is half-present (the only states allowed are "the last
acknowledged state" or "that plus a whole-record prefix of the announced
Ready"). Then a new child continues from the recovered store.

CRASH_ITERATIONS (default 300) sets the number of kills; `make soak-wal`
runs many more. CRASH_SEED picks the op sequence (kill moments still vary).
"""

from __future__ import annotations

import logging
import os
import random
import select
import shutil
import signal
import tempfile
import time

from raft.disk import DiskStorage
from tests.crash_child import SEGMENT_BYTES, entry_data, quiet_logger, run

LOG = logging.getLogger("test.crash")
READ_TIMEOUT = 20.0  # seconds without a line from the child = a hung child


class Model:
    """The last acknowledged durable state: term of every index from `first`, hard state."""

    def __init__(self, s: DiskStorage) -> None:
        self.first = s.first_index()
        self.terms = {i: s.term(i) for i in range(self.first - 1, s.last_index() + 1)}
        self.last = s.last_index()
        hs = s.initial_state().hard_state
        self.hs = (hs.term, hs.vote, hs.commit)

    def apply(self, ready: list[str]) -> None:
        """Advance by one acknowledged Ready (a `P` or `S` line)."""
        if ready[0] == "S":
            index, term = int(ready[1]), int(ready[2])
            self.first, self.last, self.terms = index + 1, index, {index: term}
            self.hs = (term, 1, index)
            return
        start, term, count, commit, hs_term = map(int, ready[1:])
        for i in range(start, self.last + 1):
            del self.terms[i]
        for i in range(start, start + count):
            self.terms[i] = term
        self.last = start + count - 1
        self.hs = (hs_term, 1, commit)


def spawn(path: str, seed: int) -> tuple[int, int]:
    r, w = os.pipe()
    log = quiet_logger()  # made before the fork: the child takes no logging lock
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            run(path, seed, w, log)
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def read_lines(fd: int, buf: bytearray, deadline: float) -> list[str] | None:
    """Lines available now (waiting until `deadline`); None at EOF."""
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        raise AssertionError("crash child stopped reporting (hung?)")
    chunk = os.read(fd, 65536)
    if not chunk:
        return None
    buf += chunk
    *lines, rest = bytes(buf).split(b"\n")
    buf[:] = rest
    return [line.decode() for line in lines]


def check_recovered(s: DiskStorage, acked: Model, pending: list[str] | None, where: str) -> None:
    """`s` must hold the acknowledged state, possibly advanced by part of `pending`."""
    first, last = s.first_index(), s.last_index()
    hs = s.initial_state().hard_state
    got_hs = (hs.term, hs.vote, hs.commit)
    assert first - 1 <= hs.commit, f"{where}: log starts after the commit index"
    for e in s.entries(first, last + 1):
        assert e.data == entry_data(e.index, e.term), f"{where}: entry {e.index} is damaged"
    terms = {i: s.term(i) for i in range(first - 1, last + 1)}
    common = range(max(first - 1, acked.first - 1), min(last, acked.last) + 1)

    def same_as_acked() -> bool:
        return last == acked.last and got_hs == acked.hs and all(terms[i] == acked.terms[i] for i in common)

    if pending is None or same_as_acked():
        assert same_as_acked(), (
            f"{where}: acknowledged state lost: hs {got_hs} vs {acked.hs}, last {last} vs {acked.last}"
        )
        return
    if pending[0] == "S":
        index, term = int(pending[1]), int(pending[2])
        assert (first, last, terms[index]) == (index + 1, index, term), f"{where}: half-installed snapshot"
        return
    start, term, count, commit, hs_term = map(int, pending[1:])
    # Everything before the Ready's first index is as acknowledged ...
    for i in range(max(first - 1, acked.first - 1), min(start - 1, acked.last) + 1):
        assert terms[i] == acked.terms[i], f"{where}: entry {i} changed by an unfinished Ready"
    # ... then a whole-record prefix of the Ready's entries (the TRUNCATE may have landed alone).
    assert start - 1 <= last <= start + count - 1 or last == acked.last, f"{where}: last={last}"
    if last >= start:
        assert all(terms[i] == term for i in range(start, last + 1)), f"{where}: mixed tail"
    raised = last >= start and got_hs[:2] == (
        term,
        0,
    )  # recovery lifts the term to the entries', vote cleared
    assert got_hs in (acked.hs, (hs_term, 1, commit)) or got_hs[2] == last or raised, (
        f"{where}: hard state {got_hs}"
    )
    if got_hs == (hs_term, 1, commit) != acked.hs:  # (an unchanged hard state writes no record)
        assert last == start + count - 1, f"{where}: hard state durable but not the entries before it"


def test_sigkill_at_random_moments_never_loses_acknowledged_readies(tmp_path, request):
    iterations = int(os.environ.get("CRASH_ITERATIONS", "300"))
    seed = int(os.environ.get("CRASH_SEED", "1"))
    rng = random.Random(seed)
    # A SIGKILL loses no page cache, so the disk adds nothing but fsync latency
    # here: use tmpfs when there is one (power loss is modelled by simulate_crash).
    shm = "/dev/shm"
    base = tempfile.mkdtemp(prefix="crash-", dir=shm) if os.access(shm, os.W_OK) else str(tmp_path)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    path = os.path.join(base, "data")
    s = DiskStorage.open(path, logger=LOG, segment_bytes=SEGMENT_BYTES)
    acked = Model(s)
    s.close()
    total_acks = 0
    for it in range(iterations):
        pid, fd = spawn(path, seed * 1_000_003 + it)
        buf = bytearray()
        pending: list[str] | None = None
        kill_after = rng.choice([0, 1, 2, 3, 6, 12])
        acks = 0
        deadline = time.monotonic() + READ_TIMEOUT
        killed = False
        try:
            while True:
                lines = read_lines(fd, buf, deadline)
                if lines is None:
                    break  # EOF: the child is dead and every report has been read
                for line in lines:
                    fields = line.split()
                    if fields[0] in ("P", "S"):
                        pending = fields
                    elif fields[0] == "A":
                        assert pending is not None, f"iteration {it}: ack without a Ready"
                        acked.apply(pending)
                        pending = None
                        acks += 1
                if not killed and acks >= kill_after:
                    # Land the kill anywhere: at once, or after a random slice of a Ready.
                    spin_until = time.perf_counter() + rng.choice([0.0, rng.uniform(0, 0.0015)])
                    while time.perf_counter() < spin_until:
                        pass
                    os.kill(pid, signal.SIGKILL)
                    killed = True
        finally:
            if not killed:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            os.close(fd)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"iteration {it}: child exited by itself (status {status}): it failed before the kill"
        )
        total_acks += acks
        s = DiskStorage.open(path, logger=LOG, segment_bytes=SEGMENT_BYTES)
        try:
            check_recovered(s, acked, pending, f"seed={seed} iteration={it} in-flight={pending}")
            acked = Model(s)  # the next child continues from what was recovered
        finally:
            s.close()
    assert total_acks > iterations, "the children made progress between kills"
