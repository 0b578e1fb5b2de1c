"""Locating and building the etcd-raft oracle (`raftnode`) into a writable cache.

Owns: where the read-only oracle sources live, where its binary and etcd's
generated `raftpb_pb2` go (a gitignored cache under the repo's tmp/ or
$INTEROP_CACHE), and running the oracle's own build scripts. It never edits
the oracle; a failed build raises `OracleBuildError` with the script's output,
so the tests that need the oracle fail with the reason instead of skipping.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _default_oracle_dir() -> Path:
    """../shared/oracle beside the checkout, else the workplace's /work/shared."""
    for candidate in (REPO.parent / "shared" / "oracle", Path("/work/shared/oracle")):
        if (candidate / "build_raftnode.sh").is_file():
            return candidate
    return REPO.parent / "shared" / "oracle"


ORACLE_DIR = Path(os.environ.get("INTEROP_ORACLE_DIR") or _default_oracle_dir())


class OracleBuildError(RuntimeError):
    """The oracle could not be built; the message carries the build output."""


@dataclass(frozen=True)
class Oracle:
    """A built oracle: the `raftnode` binary and the folder holding raftpb_pb2.py."""

    raftnode: Path
    raftpb_dir: Path
    oracle_dir: Path


def cache_dir() -> Path:
    """The writable folder for the oracle build ($INTEROP_CACHE or <repo>/tmp/interop-oracle)."""
    return Path(os.environ.get("INTEROP_CACHE", REPO / "tmp" / "interop-oracle"))


def _run(argv: list[str], what: str, timeout: float) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OracleBuildError(f"{what}: {exc}") from exc
    if res.returncode != 0:
        raise OracleBuildError(
            f"{what} failed rc={res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}")


def build(dest: Path | None = None) -> Oracle:
    """Build `raftnode` and etcd's raftpb_pb2 into `dest` (default `cache_dir()`).

    The build script apt-installs Go and etcd's sources when missing (the
    first run on a fresh machine takes minutes); with them present a rebuild
    takes well under a second thanks to Go's build cache, so callers simply
    build once per test session instead of trusting a stale binary.
    """
    dest = dest or cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    if not (ORACLE_DIR / "build_raftnode.sh").is_file():
        raise OracleBuildError(f"oracle sources not found in {ORACLE_DIR} (set INTEROP_ORACLE_DIR)")
    binary = dest / "raftnode"
    gen = dest / "gen"
    # Build beside the target and rename over it: other test runs in this checkout may be
    # executing the old binary (a rewrite in place fails with ETXTBSY or truncates it).
    tmp = dest / f".build-{os.getpid()}"
    try:
        _run(["sh", str(ORACLE_DIR / "build_raftnode.sh"), str(tmp / "raftnode")], "build_raftnode.sh",
             timeout=1800)
        _run(["sh", str(ORACLE_DIR / "gen_raftpb_pb2.sh"), str(tmp / "gen")], "gen_raftpb_pb2.sh", timeout=300)
        if not (tmp / "raftnode").is_file() or not (tmp / "gen" / "raftpb_pb2.py").is_file():
            raise OracleBuildError(f"build reported success but {tmp}/raftnode or raftpb_pb2.py is missing")
        gen.mkdir(exist_ok=True)
        os.replace(tmp / "raftnode", binary)
        os.replace(tmp / "gen" / "raftpb_pb2.py", gen / "raftpb_pb2.py")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Oracle(raftnode=binary, raftpb_dir=gen, oracle_dir=ORACLE_DIR)


def import_drive_cluster():
    """The oracle's read-only router module, imported in place (never copied)."""
    if not (ORACLE_DIR / "drive_cluster.py").is_file():
        raise OracleBuildError(f"the oracle's drive_cluster.py is not in {ORACLE_DIR} (set INTEROP_ORACLE_DIR)")
    d = str(ORACLE_DIR)
    if d not in sys.path:
        sys.path.append(d)
    import drive_cluster

    return drive_cluster


def import_raftpb(oracle: Oracle):
    """etcd's own message classes (proto2), generated from Debian's raft.proto."""
    d = str(oracle.raftpb_dir)
    if d not in sys.path:
        sys.path.append(d)
    import raftpb_pb2

    return raftpb_pb2
