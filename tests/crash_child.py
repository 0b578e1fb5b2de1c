"""Child side of the real crash test (tests/test_crash.py): a tiny Raft host
that writes to DiskStorage and reports over a pipe, until it is SIGKILLed.

Protocol, one line per event, written to `out_fd`:

* `P <start> <term> <count> <commit> <hs_term>` - about to write one Ready:
  truncate the log to start-1 (if start <= last), append `count` entries of
  `term` from `start`, then set the hard state (hs_term, vote 1, commit);
* `S <index> <term>` - about to install a snapshot at index (beyond the log);
* `A` - sync() returned: the announced Ready is durable (acknowledged).

Entry data is a pure function of (index, term) (see `entry_data`), so the
parent can tell a whole entry from a half-written one. Local snapshots and
compaction happen without a message: they never change the log's content.

Run directly (`python tests/crash_child.py DIR SEED`) it writes to stdout.
"""

from __future__ import annotations

import logging
import os
import random
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cita_raft_pb import eraftpb_pb2 as pb  # noqa: E402
from raft.disk import DiskStorage  # noqa: E402

SEGMENT_BYTES = 64 * 1024


def entry_data(index: int, term: int) -> bytes:
    return b"%d/%d/" % (index, term) + b"x" * ((index * 7 + term * 13) % 700)


def quiet_logger() -> logging.Logger:
    """A disabled logger: it never takes the logging module's lock, which a
    thread of the forking parent might have held at fork time."""
    log = logging.getLogger("crash-child")
    log.disabled = True
    return log


def run(path: str, seed: int, out_fd: int, log: logging.Logger | None = None) -> None:
    """Append, sync and report forever (until killed)."""
    log = log or quiet_logger()
    rng = random.Random(seed)
    s = DiskStorage.open(path, logger=log, segment_bytes=SEGMENT_BYTES)

    def say(line: str) -> None:
        os.write(out_fd, line.encode() + b"\n")

    while True:
        hs = s.initial_state().hard_state
        last, commit, term = s.last_index(), hs.commit, max(hs.term, 1)
        r = rng.random()
        if r < 0.05:
            index, new_term = last + rng.randint(1, 20), term + 1
            say(f"S {index} {new_term}")
            snap = pb.Snapshot(data=b"installed@%d" % index)
            snap.metadata.index, snap.metadata.term = index, new_term
            snap.metadata.conf_state.voters.extend([1, 2, 3])
            s.apply_snapshot(snap)
            s.set_hardstate(pb.HardState(term=new_term, vote=1, commit=index))
            s.sync()
            say("A")
            continue
        if r < 0.15 and commit > s.snapshot().metadata.index and commit >= s.first_index():
            s.create_snapshot(commit, pb.ConfState(voters=[1, 2, 3]), b"local@%d" % commit)
            s.compact(max(s.first_index(), commit + 1 - rng.randint(0, 5)))
            continue
        if r < 0.27 and last > commit:
            start, term = rng.randint(commit + 1, last), term + 1  # a new leader overwrites the tail
            count = rng.randint(1, 10)
        else:
            start, count = last + 1, rng.choice([1, 1, 1, 2, 4, 16, 200])
        new_commit = rng.randint(commit, start + count - 1)
        say(f"P {start} {term} {count} {new_commit} {term}")
        s.append(
            [pb.Entry(index=i, term=term, data=entry_data(i, term)) for i in range(start, start + count)]
        )
        s.set_hardstate(pb.HardState(term=term, vote=1, commit=new_commit))
        s.sync()
        say("A")


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.stdout.fileno())
