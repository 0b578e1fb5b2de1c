"""Benchmark of DiskStorage durability cost (`make bench-wal`); prints figures.

* raw os.fsync rate of the disk (write 1 small record + fsync, in a loop),
  measured in rounds alternating with the batch-1 appends;
* durable appends, one Ready = append(batch) + set_hardstate + sync(), at
  batch sizes 1, 16 and 256: Readies/s, entries/s, MB/s of entry payload, and
  Readies/s as a ratio of the raw fsync rate (target >= 70% at batch 1);
* recovery time (DiskStorage.open) of a log of 100,000 entries (target < 1 s),
  for a plain log and for the record mix the service writes per block.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cita_raft_pb import eraftpb_pb2 as pb  # noqa: E402
from raft.disk import DiskStorage  # noqa: E402


def raw_fsync_count(dirpath: str, seconds: float) -> tuple[int, float]:
    """(fsyncs, seconds) of a file growing by one small record per fsync, like a WAL."""
    path = os.path.join(dirpath, "raw-fsync.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    record = b"r" * 128
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    try:
        while True:
            os.write(fd, record)
            os.fsync(fd)
            n += 1
            if n % 8 == 0 and time.perf_counter() >= deadline:
                break
    finally:
        os.close(fd)
        os.unlink(path)
    return n, time.perf_counter() - start


class DurableAppends:
    """One store written Ready after Ready: append(batch) + set_hardstate + sync()."""

    def __init__(self, dirpath: str, batch: int, payload: int) -> None:
        self.path = os.path.join(dirpath, f"appends-{batch}")
        self.storage = DiskStorage.open(self.path, logger=logging.getLogger("bench"))
        self.batch, self.payload = batch, payload
        self.data = os.urandom(payload)
        self.readies = self.entries = 0
        self.elapsed = 0.0

    def run(self, seconds: float) -> None:
        s, batch = self.storage, self.batch
        index = s.last_index()
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            ents = [pb.Entry(term=1, index=index + i + 1, data=self.data) for i in range(batch)]
            index += batch
            s.append(ents)
            s.set_hardstate(pb.HardState(term=1, vote=1, commit=index))
            s.sync()
            self.readies += 1
            self.entries += batch
            if self.readies % 8 == 0 and time.perf_counter() >= deadline:
                break
        self.elapsed += time.perf_counter() - start

    def close(self) -> tuple[float, float, float]:
        """(Readies/s, entries/s, MB/s of entry payload)."""
        self.storage.close()
        shutil.rmtree(self.path)
        e = self.elapsed
        return self.readies / e, self.entries / e, self.entries * self.payload / e / 1e6


def build_log(path: str, count: int, payload: int, service_pattern: bool) -> int:
    """A WAL of `count` entries; returns its size in bytes.

    Plain: entries appended 1,000 per Ready. Service pattern: what consensus.py
    writes per block (1 entry + hard state, a commit hard state, an applied
    record carrying a ConsensusConfiguration of 4 validators).
    """
    storage = DiskStorage.open(path, logger=logging.getLogger("bench"))
    data = os.urandom(payload)
    config = os.urandom(4 * 22 + 8)
    if service_pattern:
        for i in range(1, count + 1):
            storage.append([pb.Entry(term=1, index=i, data=data)])
            storage.set_hardstate(pb.HardState(term=1, vote=1, commit=i - 1))
            storage.set_hardstate(pb.HardState(term=1, vote=1, commit=i))
            storage.set_applied(i, data=config)
            if i % 500 == 0:
                storage.sync()
    else:
        for lo in range(1, count + 1, 1000):
            hi = min(lo + 1000, count + 1)
            storage.append([pb.Entry(term=1, index=i, data=data) for i in range(lo, hi)])
    storage.set_hardstate(pb.HardState(term=1, vote=1, commit=count))
    storage.close()
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def recovery_time(dirpath: str, count: int, payload: int, service_pattern: bool) -> tuple[float, float, int]:
    """(best wall s, its CPU s, WAL bytes) of DiskStorage.open on a log of `count` entries."""
    path = os.path.join(dirpath, "recovery")
    size = build_log(path, count, payload, service_pattern)
    best = (float("inf"), 0.0)
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        storage = DiskStorage.open(path, logger=logging.getLogger("bench"))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = min(best, (wall, cpu))
        assert storage.last_index() == count, storage.last_index()
        storage.close()
    shutil.rmtree(path)
    return best[0], best[1], size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each timed run")
    ap.add_argument("--payload", type=int, default=128, help="entry data bytes")
    ap.add_argument("--entries", type=int, default=100_000, help="log size for the recovery test")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = tempfile.mkdtemp(prefix="bench-wal-", dir=args.dir)
    try:
        # Raw fsync and batch-1 appends alternate in short rounds, so that a
        # neighbour's load hits both alike and the ratio stays meaningful.
        rounds = 6
        raw_n = raw_t = 0.0
        single = DurableAppends(base, 1, args.payload)
        for _ in range(rounds):
            n, t = raw_fsync_count(base, args.seconds / rounds)
            raw_n, raw_t = raw_n + n, raw_t + t
            single.run(args.seconds / rounds)
        raw = raw_n / raw_t
        runs = [(1, *single.close())]
        for batch in (16, 256):
            run = DurableAppends(base, batch, args.payload)
            run.run(args.seconds)
            runs.append((batch, *run.close()))
        print(f"disk: {base}  payload={args.payload} B/entry  {args.seconds:.1f} s per run")
        print(f"raw os.fsync (write 128 B + fsync), interleaved with batch 1: {raw:,.0f}/s")
        print(f"{'batch':>6} {'readies/s':>11} {'entries/s':>11} {'MB/s':>8} {'vs raw fsync':>13}")
        for batch, rps, eps, mbps in runs:
            print(f"{batch:>6} {rps:>11,.0f} {eps:>11,.0f} {mbps:>8.2f} {rps / raw:>12.0%}")
        print(f"single-entry durable appends: {runs[0][1] / raw:.0%} of raw fsync rate (target >= 70%)")
        for pattern, label in (
            (False, "entries only"),
            (True, "service pattern: entry+2 hard states+applied"),
        ):
            wall, cpu, size = recovery_time(base, args.entries, args.payload, pattern)
            print(
                f"recovery of {args.entries:,} entries, {label} ({size / 1e6:.1f} MB WAL): "
                f"{wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms CPU (target < 1000 ms)"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
