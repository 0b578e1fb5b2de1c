"""Recording of file-system operations and the crash states they allow.

`Recorder` wraps, while a workload runs, the os-level calls raft/ storage uses
(os.open with O_CREAT/O_TRUNC, os.write, os.fsync, os.fdatasync,
os.ftruncate, os.rename/os.replace, os.unlink, os.mkdir, os.rmdir and
shutil.rmtree) and records every one that touches the workload's directory,
with the bytes written. raft/ itself is not changed: the wrappers call the
real functions.

`FsModel` replays such a recording and, at any operation boundary, builds the
on-disk states a crash may leave (docs/internals.md, "Crash-state explorer"):

* process crash: every completed operation is kept (the page cache survives);
* power loss: metadata operations (create, rename, unlink, mkdir, rmdir) reach
  the disk in program order (a journaled file system), so a prefix of them
  survives, at least up to the last one a directory fsync of its directory
  made durable; a file's data is durable up to its last fsync/fdatasync, and
  each later write (or ftruncate) is independently dropped, kept, turned to
  zeros (the size grew, the data never came), or torn at a 512-byte sector
  boundary (a prefix kept, the rest missing or zeros).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
from dataclasses import dataclass, field

SECTOR = 512

# Operations that change what is on disk: the boundaries after them are crash points.
SIGNIFICANT = frozenset(
    {"create", "write", "fsync", "dirsync", "ftruncate", "rename", "unlink", "mkdir", "rmdir", "rmtree"}
)


def parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


class Recorder:
    """Context manager: record the file-system operations under `root`."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.ops: list[tuple] = []
        self.fds: dict[int, str] = {}  # fd -> relpath, for fds opened under root
        self.suspended = 0
        self._saved: dict[str, object] = {}

    def rel(self, path) -> str | None:  # type: ignore[no-untyped-def]
        if self.suspended or not isinstance(path, str | bytes):
            return None
        p = os.path.abspath(os.fsdecode(path))
        if p == self.root:
            return ""
        if p.startswith(self.root + os.sep):
            return p[len(self.root) + 1 :]
        return None

    def __enter__(self) -> Recorder:
        real = {
            n: getattr(os, n)
            for n in (
                "open",
                "write",
                "close",
                "fsync",
                "fdatasync",
                "ftruncate",
                "rename",
                "replace",
                "unlink",
                "remove",
                "mkdir",
                "rmdir",
            )
        }
        real_rmtree = shutil.rmtree
        self._saved = dict(real)
        self._saved["rmtree"] = real_rmtree
        rec = self

        def w_open(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
            r = rec.rel(path) if dir_fd is None else None
            existed = r is not None and os.path.lexists(path)
            fd = real["open"](path, flags, mode, dir_fd=dir_fd)
            if r is not None:
                rec.fds[fd] = r
                rec.ops.append(("open", r, flags, fd, existed))
            return fd

        def w_write(fd, data):  # type: ignore[no-untyped-def]
            n = real["write"](fd, data)
            if fd in rec.fds and not rec.suspended:
                rec.ops.append(("write", fd, bytes(data[:n])))
            return n

        def w_close(fd):  # type: ignore[no-untyped-def]
            real["close"](fd)
            if fd in rec.fds:
                del rec.fds[fd]
                rec.ops.append(("close", fd))

        def w_fsync(fd):  # type: ignore[no-untyped-def]
            real["fsync"](fd)
            if fd in rec.fds and not rec.suspended:
                rec.ops.append(("fsync", fd))

        def w_fdatasync(fd):  # type: ignore[no-untyped-def]
            real["fdatasync"](fd)
            if fd in rec.fds and not rec.suspended:
                rec.ops.append(("fsync", fd))

        def w_ftruncate(fd, size):  # type: ignore[no-untyped-def]
            real["ftruncate"](fd, size)
            if fd in rec.fds and not rec.suspended:
                rec.ops.append(("ftruncate", fd, size))

        def w_rename(name):  # type: ignore[no-untyped-def]
            def f(src, dst, *, src_dir_fd=None, dst_dir_fd=None):  # type: ignore[no-untyped-def]
                real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
                a, b = rec.rel(src), rec.rel(dst)
                if a is not None and b is not None and src_dir_fd is None and dst_dir_fd is None:
                    rec.ops.append(("rename", a, b))

            return f

        def w_path_op(name, kind):  # type: ignore[no-untyped-def]
            def f(path, *args, dir_fd=None, **kw):  # type: ignore[no-untyped-def]
                real[name](path, *args, dir_fd=dir_fd, **kw)
                r = rec.rel(path) if dir_fd is None else None
                if r is not None:
                    rec.ops.append((kind, r))

            return f

        def w_rmtree(path, *args, **kw):  # type: ignore[no-untyped-def]
            r = rec.rel(path)
            rec.suspended += 1
            try:
                real_rmtree(path, *args, **kw)
            finally:
                rec.suspended -= 1
            if r is not None:
                rec.ops.append(("rmtree", r))

        os.open = w_open
        os.write = w_write
        os.close = w_close
        os.fsync = w_fsync
        os.fdatasync = w_fdatasync
        os.ftruncate = w_ftruncate
        os.rename = w_rename("rename")
        os.replace = w_rename("replace")
        os.unlink = w_path_op("unlink", "unlink")
        os.remove = w_path_op("remove", "unlink")
        os.mkdir = w_path_op("mkdir", "mkdir")
        os.rmdir = w_path_op("rmdir", "rmdir")
        shutil.rmtree = w_rmtree
        return self

    def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
        for name, fn in self._saved.items():
            if name == "rmtree":
                shutil.rmtree = fn  # type: ignore[assignment]
            else:
                setattr(os, name, fn)

    def mark(self) -> int:
        """The current boundary (number of recorded operations)."""
        return len(self.ops)


def snapshot_dir(root: str) -> dict[str, bytes | None]:
    """relpath -> file bytes (None for a directory) of everything under root."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel
        for d in dirnames:
            out[f"{rel}/{d}" if rel else d] = None
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[f"{rel}/{f}" if rel else f] = fh.read()
    return out


@dataclass
class Choice:
    """What a power loss did to one unsynced data operation."""

    how: str  # drop | keep | zeros | torn | torn-zeros
    cut: int = 0  # torn: bytes kept from the write's start


@dataclass
class FsModel:
    """Replays recorded operations; builds crash states at the current boundary."""

    initial: dict[str, bytes | None]
    ns: dict[str, int] = field(default_factory=dict)  # relpath -> inode (0: directory)
    content: dict[int, bytearray] = field(default_factory=dict)  # volatile
    durable: dict[int, bytes] = field(default_factory=dict)  # as of the last fsync
    pending: dict[int, list[tuple]] = field(default_factory=dict)  # data ops since then
    meta: list[tuple] = field(default_factory=list)  # metadata ops in order
    ns_durable: dict[str, int] = field(default_factory=dict)  # namespace after meta[:meta_durable]
    meta_durable: int = 0
    fdtab: dict[int, list] = field(default_factory=dict)  # fd -> [inode or relpath(dir), append, pos]
    next_ino: int = 1

    def __post_init__(self) -> None:
        for rel in sorted(self.initial):
            data = self.initial[rel]
            if data is None:
                self.ns[rel] = 0
            else:
                ino = self._new_inode()
                self.content[ino] = bytearray(data)
                self.durable[ino] = data
                self.ns[rel] = ino
        self.ns_durable = dict(self.ns)

    def _new_inode(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        self.content[ino] = bytearray()
        self.durable[ino] = b""
        self.pending[ino] = []
        return ino

    # ---- replay ---------------------------------------------------------------

    @staticmethod
    def apply_meta(ns: dict[str, int], op: tuple) -> None:
        kind = op[0]
        if kind == "create":
            ns[op[1]] = op[2]
        elif kind == "mkdir":
            ns[op[1]] = 0
        elif kind in ("unlink", "rmdir"):
            ns.pop(op[1], None)
        elif kind == "rmtree":
            r = op[1]
            for k in [k for k in ns if k == r or k.startswith(r + "/")]:
                del ns[k]
        elif kind == "rename":
            a, b = op[1], op[2]
            if a not in ns:
                return
            moved = {k: v for k, v in ns.items() if k == a or k.startswith(a + "/")}
            for k in moved:
                del ns[k]
            for k, v in moved.items():
                ns[b + k[len(a) :]] = v

    @staticmethod
    def meta_dirs(op: tuple) -> tuple[str, ...]:
        if op[0] == "rename":
            return parent(op[1]), parent(op[2])
        return (parent(op[1]),)

    def _meta(self, op: tuple) -> None:
        self.meta.append(op)
        self.apply_meta(self.ns, op)

    def _data(self, ino: int, op: tuple) -> None:
        self.pending[ino].append(op)
        apply_data(self.content[ino], op, Choice("keep"))

    def apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "open":
            _k, rel, flags, fd, existed = op
            if rel in self.ns:
                ino = self.ns[rel]
            elif flags & os.O_CREAT:
                ino = self._new_inode()
                self._meta(("create", rel, ino))
            else:
                raise AssertionError(f"model: open of missing {rel}")
            if ino == 0:
                self.fdtab[fd] = [rel, False, 0]
                return
            if flags & os.O_TRUNC and existed:
                self._data(ino, ("trunc", 0))
            self.fdtab[fd] = [ino, bool(flags & os.O_APPEND), 0]
        elif kind == "close":
            self.fdtab.pop(op[1], None)
        elif kind == "write":
            ent = self.fdtab[op[1]]
            ino = ent[0]
            off = len(self.content[ino]) if ent[1] else ent[2]
            self._data(ino, ("write", off, op[2]))
            ent[2] = off + len(op[2])
        elif kind == "ftruncate":
            self._data(self.fdtab[op[1]][0], ("trunc", op[2]))
        elif kind == "fsync":
            target = self.fdtab[op[1]][0]
            if isinstance(target, str):  # a directory: its entries become durable
                last = -1
                for k in range(self.meta_durable, len(self.meta)):
                    if target in self.meta_dirs(self.meta[k]):
                        last = k
                for k in range(self.meta_durable, last + 1):
                    self.apply_meta(self.ns_durable, self.meta[k])
                self.meta_durable = max(self.meta_durable, last + 1)
            else:
                self.durable[target] = bytes(self.content[target])
                self.pending[target] = []
        elif kind in ("rename", "unlink", "mkdir", "rmdir", "rmtree"):
            self._meta(op)
        else:
            raise AssertionError(f"model: unknown op {op!r}")

    # ---- crash states ------------------------------------------------------------

    def process_crash(self) -> dict[str, bytes | None]:
        return {rel: (None if ino == 0 else bytes(self.content[ino])) for rel, ino in self.ns.items()}

    def power_losses(self, max_cuts: int | None, cap: int | None, rng: random.Random):
        """Yield (state, has_hole) for the power-loss states at this boundary.

        `max_cuts` bounds the sector cuts tried per torn write (None: all);
        `cap` bounds the states per boundary (sampled with `rng` beyond it)."""
        namespaces = []
        ns = dict(self.ns_durable)
        namespaces.append(dict(ns))
        for op in self.meta[self.meta_durable :]:
            self.apply_meta(ns, op)
            namespaces.append(dict(ns))
        for nsl in namespaces:
            inodes = sorted({ino for ino in nsl.values() if ino and self.pending[ino]})
            per_op: list[tuple[int, int, list[Choice]]] = []
            for ino in inodes:
                for k, op in enumerate(self.pending[ino]):
                    per_op.append((ino, k, choices(op, max_cuts)))
            combos = itertools.product(*(c for _i, _k, c in per_op))
            total = 1
            for _i, _k, c in per_op:
                total *= len(c)
            if cap is not None and total > cap:
                picked = [[rng.choice(c) for _i, _k, c in per_op] for _ in range(cap)]
                combos = iter(picked)
            for combo in combos:
                files: dict[int, bytes] = {}
                hole = False
                for ino in inodes:
                    mine = [(k, ch) for (i, k, _c), ch in zip(per_op, combo, strict=True) if i == ino]
                    buf = bytearray(self.durable[ino])
                    lost = False
                    for k, ch in mine:
                        op = self.pending[ino][k]
                        if ch.how != "drop" and lost and op[0] == "write":
                            hole = True
                        if ch.how != "keep":
                            lost = True
                        apply_data(buf, op, ch)
                    files[ino] = bytes(buf)
                state = {
                    rel: (None if ino == 0 else files.get(ino, self.durable.get(ino, b"")))
                    for rel, ino in nsl.items()
                }
                yield state, hole


def choices(op: tuple, max_cuts: int | None) -> list[Choice]:
    if op[0] == "trunc":
        return [Choice("drop"), Choice("keep")]
    _w, off, data = op
    out = [Choice("drop"), Choice("keep")]
    if not data:
        return out
    out.append(Choice("zeros"))
    first = (off // SECTOR + 1) * SECTOR
    cuts = list(range(first - off, len(data), SECTOR))
    if max_cuts is not None and len(cuts) > max_cuts:
        step = (len(cuts) - 1) / (max_cuts - 1) if max_cuts > 1 else 0
        cuts = sorted({cuts[round(i * step)] for i in range(max_cuts)})
    for c in cuts:
        out.append(Choice("torn", c))
        out.append(Choice("torn-zeros", c))
    return out


def apply_data(buf: bytearray, op: tuple, ch: Choice) -> None:
    if ch.how == "drop":
        return
    if op[0] == "trunc":
        size = op[1]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        return
    _w, off, data = op
    if ch.how == "keep":
        new = data
    elif ch.how == "zeros":
        new = bytes(len(data))
    elif ch.how == "torn":
        new = data[: ch.cut]
    else:  # torn-zeros
        new = data[: ch.cut] + bytes(len(data) - ch.cut)
    if len(buf) < off:
        buf.extend(bytes(off - len(buf)))
    buf[off : off + len(new)] = new


def state_key(state: dict[str, bytes | None]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for rel in sorted(state):
        data = state[rel]
        h.update(rel.encode() + b"\0")
        h.update(
            b"D" if data is None else b"F%d:" % len(data) + hashlib.blake2b(data, digest_size=16).digest()
        )
    return h.digest()


def materialize(state: dict[str, bytes | None], root: str) -> None:
    """Make `root` hold exactly `state` (root itself is recreated)."""
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    for rel in sorted(state, key=lambda r: r.count("/")):
        p = os.path.join(root, rel)
        if state[rel] is None:
            os.makedirs(p, exist_ok=True)
    for rel, data in state.items():
        if data is not None:
            p = os.path.join(root, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
