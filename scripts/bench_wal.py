"""Benchmark of DiskStorage durability cost (`make bench-wal`); prints figures.

* raw os.fsync rate of the disk (write 1 small record + fsync, in a loop),
  measured before and after the append runs in the same process;
* durable appends, one Ready = append(batch) + set_hardstate + sync(), at
  batch sizes 1, 16 and 256: Readies/s, entries/s, MB/s of entry payload, and
  Readies/s as a ratio of the raw fsync rate (target >= 70% at batch 1);
* recovery time (DiskStorage.open) of a log of 100,000 entries (target < 1 s).
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


def raw_fsync_rate(dirpath: str, seconds: float) -> float:
    """fsyncs/s of a file that grows by one small record per fsync, like a WAL."""
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
            if n % 32 == 0 and time.perf_counter() >= deadline:
                break
    finally:
        os.close(fd)
        os.unlink(path)
    return n / (time.perf_counter() - start)


def durable_appends(dirpath: str, batch: int, payload: int, seconds: float) -> tuple[float, float, float]:
    """(Readies/s, entries/s, MB/s) of append + set_hardstate + sync per Ready."""
    path = os.path.join(dirpath, f"appends-{batch}")
    storage = DiskStorage.open(path, logger=logging.getLogger("bench"))
    data = os.urandom(payload)
    index = storage.last_index()
    readies = entries = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        ents = [pb.Entry(term=1, index=index + i + 1, data=data) for i in range(batch)]
        index += batch
        storage.append(ents)
        storage.set_hardstate(pb.HardState(term=1, vote=1, commit=index))
        storage.sync()
        readies += 1
        entries += batch
        if readies % 16 == 0 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    storage.close()
    shutil.rmtree(path)
    return readies / elapsed, entries / elapsed, entries * payload / elapsed / 1e6


def recovery_time(dirpath: str, count: int, payload: int) -> tuple[float, int]:
    """Seconds to DiskStorage.open a log of `count` entries, and its size in bytes."""
    path = os.path.join(dirpath, "recovery")
    storage = DiskStorage.open(path, logger=logging.getLogger("bench"))
    data = os.urandom(payload)
    for lo in range(1, count + 1, 1000):
        hi = min(lo + 1000, count + 1)
        storage.append([pb.Entry(term=1, index=i, data=data) for i in range(lo, hi)])
    storage.set_hardstate(pb.HardState(term=1, vote=1, commit=count))
    storage.sync()
    storage.close()
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        storage = DiskStorage.open(path, logger=logging.getLogger("bench"))
        best = min(best, time.perf_counter() - start)
        assert storage.last_index() == count, storage.last_index()
        storage.close()
    shutil.rmtree(path)
    return best, size


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
        raw_before = raw_fsync_rate(base, args.seconds)
        runs = [(b, *durable_appends(base, b, args.payload, args.seconds)) for b in (1, 16, 256)]
        raw_after = raw_fsync_rate(base, args.seconds)
        raw = (raw_before + raw_after) / 2
        print(f"disk: {base}  payload={args.payload} B/entry  {args.seconds:.1f} s per run")
        print(
            f"raw os.fsync (write 128 B + fsync): {raw:,.0f}/s  (before {raw_before:,.0f}, after {raw_after:,.0f})"
        )
        print(f"{'batch':>6} {'readies/s':>11} {'entries/s':>11} {'MB/s':>8} {'vs raw fsync':>13}")
        for batch, rps, eps, mbps in runs:
            print(f"{batch:>6} {rps:>11,.0f} {eps:>11,.0f} {mbps:>8.2f} {rps / raw:>12.0%}")
        ratio = runs[0][1] / raw
        print(f"single-entry durable appends: {ratio:.0%} of raw fsync rate (target >= 70%)")
        seconds, size = recovery_time(base, args.entries, args.payload)
        print(
            f"recovery of {args.entries:,} entries ({size / 1e6:.1f} MB WAL): {seconds * 1000:.0f} ms (target < 1000 ms)"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
