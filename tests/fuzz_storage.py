"""Seeded, structure-aware fuzzer of the storage decoders (issue 14 §2).

Inputs are real data directories (WAL segments, LAST, snapshot files, the Rust
service's files) made by DiskStorage, then damaged: bit flips, truncation,
zeroed ranges, garbage written over or inserted, and, knowing the record
framing, whole records duplicated, dropped, swapped, or re-framed with a valid
checksum around a wrong payload (a payload of another kind, random bytes, a
cut-short one). Each input is opened with `DiskStorage.open`, which must
either recover (cutting a torn tail) and then serve reads and take a write,
or refuse with `CorruptLog`: any other exception is a crasher. The snapshot
file decoder (`decode_snapshot_file`: ValueError only) and the Rust import
(`migrate.read_rust_state`: CorruptLog only) are also fed directly.

    python -m tests.fuzz_storage [--inputs N] [--seed S]

A crasher prints its seed and input number; `--seed S --only K` replays input K.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field

from cita_raft_pb import eraftpb_pb2 as pb
from raft import migrate
from raft.disk import DiskStorage
from raft.errors import CorruptLog
from raft.snapshot import decode_snapshot_file
from raft.wal import HEADER, HEADER_SIZE, Kind, SegmentScan, read_records
from tests.crash_explore.fsmodel import materialize, snapshot_dir
from tests.crash_explore.workloads import rust_files

LOG = logging.getLogger("fuzz-storage")
LOG.disabled = True
SEGMENT_BYTES = 2000
DATA = "data"


# ---- seed corpus -------------------------------------------------------------------------


def _ents(lo: int, hi: int, term: int, rng: random.Random) -> list[pb.Entry]:
    return [
        pb.Entry(index=i, term=term, data=rng.randbytes(rng.choice([0, 5, 60, 300])))
        for i in range(lo, hi + 1)
    ]


def _build(root: str, kind: str) -> dict[str, bytes | None]:
    rng = random.Random(kind)
    path = os.path.join(root, DATA)
    if kind == "rust":
        os.makedirs(path)
        for name, data in rust_files().items():
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
    s = DiskStorage.open(path, logger=LOG, segment_bytes=SEGMENT_BYTES)
    last = s.last_index()
    term = max(s.initial_state().hard_state.term, 1)
    if kind == "snapshots":
        snap = pb.Snapshot(data=b"boot")
        snap.metadata.index = snap.metadata.term = 5
        snap.metadata.conf_state.voters.extend([1, 2, 3])
        s.apply_snapshot(snap)
        s.sync()
        last, term = 5, 5
    for k in range(12 if kind != "small" else 3):
        s.append(_ents(last + 1, last + 3, term, rng))
        last += 3
        s.set_hardstate(pb.HardState(term=term, vote=1, commit=last - 1))
        s.sync()
        if kind == "snapshots" and k % 4 == 3:
            s.set_applied(last - 1, pb.ConfState(voters=[1, 2, 3]), b"cfg-%d" % k)
            s.sync()
            s.create_snapshot(last - 1, pb.ConfState(voters=[1, 2, 3]), b"snap-%d" % k)
            s.compact(last - 1)
        if kind == "snapshots" and k == 6:
            s.set_abort_height(40)
            s.append([pb.Entry(index=last, term=term + 1, data=b"overwrite")])  # a TRUNCATE record
            term = term + 1
            s.set_hardstate(pb.HardState(term=term, vote=2, commit=last - 1))
            s.sync()
    s.close()
    state = snapshot_dir(root)
    state.pop(f"{DATA}/raft-store.lock", None)
    return state


def corpus(scratch: str) -> dict[str, dict[str, bytes | None]]:
    out = {}
    for kind in ("small", "plain", "snapshots", "rust"):
        root = os.path.join(scratch, "seed-" + kind)
        os.makedirs(root)
        out[kind] = _build(root, kind)
        shutil.rmtree(root)
    return out


# ---- mutations ------------------------------------------------------------------------------


def _records(data: bytes) -> list[tuple[int, int]]:
    scan = SegmentScan(seq=0, path="")
    read_records(data, scan)
    return [(off, off + HEADER_SIZE + len(p)) for _k, p, off in scan.records]


def _frame(kind: int, payload: bytes, batch: int) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<BI", kind, batch)))
    return HEADER.pack(len(payload), crc, kind, batch) + payload


def _junk_payload(rng: random.Random) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return rng.randbytes(rng.randint(0, 40))
    if choice == 1:
        return rng.randbytes(rng.choice([1, 3, 7, 9, 16]))  # wrong sizes for a u64
    if choice == 2:
        return pb.Entry(
            index=rng.choice([0, 1, 2**63, 2**64 - 1]), term=rng.randint(0, 9)
        ).SerializeToString()
    if choice == 3:
        return pb.HardState(
            term=rng.choice([0, 2**64 - 1]), commit=rng.choice([0, 10**6, 2**64 - 1])
        ).SerializeToString()
    if choice == 4:
        sn = pb.Snapshot(data=rng.randbytes(4))
        sn.metadata.index, sn.metadata.term = rng.choice([0, 3, 2**64 - 1]), rng.randint(0, 9)
        return sn.SerializeToString()
    return struct.pack("<Q", rng.choice([0, 7, 2**64 - 1]))


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random damage of a file's bytes; returns (bytes, what was done)."""
    n = len(data)
    buf = bytearray(data)
    recs = _records(data) if n else []
    op = rng.randrange(12)
    if op == 0 and n:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(buf), "bit flips"
    if op == 1:
        cut = rng.randint(0, n)
        return bytes(buf[:cut]), f"truncated at {cut}"
    if op == 2 and n:
        a = rng.randrange(n)
        b = min(n, a + rng.choice([1, 13, 100, 512, 4096, n]))
        buf[a:b] = bytes(b - a)
        return bytes(buf), f"zeroed {a}..{b}"
    if op == 3 and n:
        a = rng.randrange(n)
        g = rng.randbytes(rng.randint(1, 64))
        buf[a : a + len(g)] = g
        return bytes(buf[: max(n, a + len(g))]), f"garbage over {a}"
    if op == 4:
        a = rng.randint(0, n)
        return bytes(buf[:a]) + rng.randbytes(rng.randint(1, 64)) + bytes(buf[a:]), f"garbage inserted at {a}"
    if op == 5:
        return bytes(buf) + bytes(rng.randint(1, 5000)), "zeros appended"
    if recs:
        i = rng.randrange(len(recs))
        a, b = recs[i]
        if op == 6:
            j = rng.randrange(len(recs) + 1)
            at = recs[j][0] if j < len(recs) else recs[-1][1]
            return bytes(buf[:at]) + bytes(buf[a:b]) + bytes(buf[at:]), f"record {i} duplicated at {at}"
        if op == 7:
            return bytes(buf[:a]) + bytes(buf[b:]), f"record {i} dropped"
        if op == 8 and len(recs) > 1:
            j = rng.randrange(len(recs))
            (a, b), (c, d) = sorted([recs[i], recs[j]])
            if b <= c:
                return bytes(buf[:a] + buf[c:d] + buf[b:c] + buf[a:b] + buf[d:]), f"records {i},{j} swapped"
        if op in (9, 10):
            kind = rng.choice([k.value for k in Kind] + [0, 99]) if op == 9 else data[a + 8]
            batch = struct.unpack_from("<I", data, a + 9)[0]
            new = _frame(kind, _junk_payload(rng), batch)
            return bytes(buf[:a]) + new + bytes(buf[b:]), f"record {i} re-framed as kind {kind}"
        if op == 11:
            keep = rng.randint(0, b - a - HEADER_SIZE)
            kind = data[a + 8]
            batch = struct.unpack_from("<I", data, a + 9)[0]
            new = _frame(kind, bytes(data[a + HEADER_SIZE : a + HEADER_SIZE + keep]), batch)
            return bytes(buf[:a]) + new + bytes(buf[b:]), f"record {i} payload cut to {keep} (valid crc)"
    a = rng.randint(0, n)
    return bytes(buf[:a]) + bytes(buf[a + 1 :]), f"byte {a} deleted"


def damage(state: dict[str, bytes | None], rng: random.Random) -> tuple[dict, list[str]]:
    """Apply 1-3 damages to files of `state` (WAL segments most often)."""
    files = [k for k, v in state.items() if v is not None]
    segs = [k for k in files if k.endswith(".wal")]
    out = dict(state)
    what = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        r = rng.random()
        if r < 0.6 and segs:
            name = rng.choice(segs[-2:] if rng.random() < 0.7 else segs)
        else:
            name = rng.choice(files)
        if rng.random() < 0.03:
            out.pop(name, None)
            what.append(f"{name} removed")
            continue
        if out.get(name) is None:
            continue
        out[name], how = mutate(out[name], rng)
        what.append(f"{name}: {how}")
    return out, what


# ---- running ---------------------------------------------------------------------------------


@dataclass
class Result:
    inputs: int = 0
    opened: int = 0
    refused: int = 0
    crashers: list[str] = field(default_factory=list)


def run_one(state: dict, root: str, rng: random.Random, write_after: bool) -> str:
    """'opened' | 'refused'; raises on anything else."""
    materialize(state, root)
    path = os.path.join(root, DATA)
    try:
        s = DiskStorage.open(path, logger=LOG, segment_bytes=SEGMENT_BYTES)
    except CorruptLog:
        return "refused"
    try:
        first, last = s.first_index(), s.last_index()
        s.initial_state()
        s.snapshot(0, 0)
        if last >= first:
            s.entries(first, last + 1)
        s.term(first - 1)
        if write_after:
            hs = s.initial_state().hard_state
            s.append([pb.Entry(index=last + 1, term=max(hs.term, s.term(last), 1), data=b"after")])
            s.sync()
    finally:
        s.close()
    if write_after:
        s = DiskStorage.open(path, logger=LOG, segment_bytes=SEGMENT_BYTES)  # what recovery kept stays valid
        assert s.last_index() == last + 1, "the write after recovery did not survive a restart"
        s.close()
    return "opened"


def direct_decoders(state: dict, rng: random.Random) -> None:
    """The snapshot-file and Rust-import decoders fed damaged bytes directly."""
    snaps = [k for k, v in state.items() if k.endswith(".snap") and v is not None]
    if snaps:
        name = rng.choice(snaps)
        index, term = (int(x, 16) for x in os.path.basename(name)[:-5].split("-"))
        data, _how = mutate(state[name], rng)
        try:
            decode_snapshot_file(data, index, term)
        except ValueError:
            pass


def fuzz(inputs: int, seed: int, scratch: str, only: int | None = None, out=None) -> Result:  # type: ignore[no-untyped-def]
    out = out or sys.stdout
    seeds = corpus(scratch)
    kinds = sorted(seeds)
    res = Result()
    root = os.path.join(scratch, "input")
    rust_root = os.path.join(scratch, "rust")
    for k in range(inputs) if only is None else [only]:
        rng = random.Random(f"{seed}/{k}")
        kind = rng.choice(kinds)
        res.inputs += 1
        if kind == "rust" and rng.random() < 0.5:
            # The Rust files alone, damaged: the import must refuse (CorruptLog) or skip them.
            state = {DATA: None, **{f"{DATA}/{n}": v for n, v in rust_files().items()}}
            bad, what = damage(state, rng)
            if rng.random() < 0.3:
                bad[f"{DATA}/abort_height"] = rng.choice(
                    [b"-1", b"18446744073709551616", b"1e3", b"\xff", b" 7 \n"]
                )
                what.append("abort_height replaced")
        else:
            bad, what = damage(seeds[kind], rng)
        try:
            if kind == "rust" and f"{DATA}/raft-store" not in bad:
                materialize(bad, rust_root)
                try:
                    migrate.read_rust_state(os.path.join(rust_root, DATA), LOG)
                except CorruptLog:
                    pass
            direct_decoders(bad, rng)
            outcome = run_one(bad, root, rng, write_after=rng.random() < 0.25)
            if outcome == "opened":
                res.opened += 1
            else:
                res.refused += 1
        except Exception as err:  # noqa: BLE001 - a crasher
            tb = "".join(traceback.format_exception(err)[-4:])
            msg = f"seed={seed} input={k} base={kind} damage={what}: {type(err).__name__}: {err}\n{tb}"
            res.crashers.append(msg)
            print("fuzz-storage: CRASHER " + msg, file=out)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz_storage", description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", type=int, help="replay one input number")
    args = ap.parse_args(argv)
    scratch = tempfile.mkdtemp(
        prefix="fuzz-storage-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    )
    try:
        t0 = time.monotonic()
        res = fuzz(args.inputs, args.seed, scratch, args.only)
        print(
            f"fuzz-storage: {res.inputs} inputs (seed {args.seed}) in {time.monotonic() - t0:.1f}s: "
            f"{res.opened} recovered, {res.refused} refused with CorruptLog, {len(res.crashers)} crashers"
        )
        return 1 if res.crashers else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
