"""Where everything of a devnet lives: the spec file, per-node dirs, ports.

A devnet is described by `<dir>/devnet.json` (written once by `up`), so
separate `devnet` commands, the simulators and tests all derive the same
ports, paths and addresses from it. This module does no I/O beyond reading
and writing that file and the schedule file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

SPEC_FILE = "devnet.json"
SCHEDULE_FILE = "schedule.json"
# Port slots: the hub's admin port is base+0; node i uses base+10*(i+1)+k.
SLOT = 10
NET_OFF, CONSENSUS_OFF, CONTROLLER_OFF, METRICS_OFF = 0, 1, 4, 5


@dataclasses.dataclass
class Spec:
    """The fixed shape of one devnet."""

    dir: str
    nodes: int
    validators: list[str]           # initial validators (hex addresses)
    addresses: list[str]            # node i's 20-byte address, hex
    base_port: int = 30000
    block_interval: int = 3         # seconds, the controller's system config
    tick_ms: int = 200
    heartbeat_tick: int = 15
    election_tick: int = 50
    seed: int = 1
    consensus: str = "real"         # "real": consensus.py; "stub": devnet.stub_consensus
    repo: str = ""                  # checkout holding consensus.py
    python: str = ""                # interpreter for every process
    log_level: str = "info"

    # ---- ports -------------------------------------------------------------
    def hub_admin_port(self) -> int:
        return self.base_port

    def _port(self, i: int, off: int) -> int:
        return self.base_port + SLOT * (i + 1) + off

    def network_port(self, i: int) -> int:
        return self._port(i, NET_OFF)

    def consensus_port(self, i: int) -> int:
        return self._port(i, CONSENSUS_OFF)

    def controller_port(self, i: int) -> int:
        return self._port(i, CONTROLLER_OFF)

    def metrics_port(self, i: int) -> int:
        return self._port(i, METRICS_OFF)

    def all_ports(self) -> list[int]:
        ports = [self.hub_admin_port()]
        for i in range(self.nodes):
            ports += [self.network_port(i), self.consensus_port(i), self.controller_port(i), self.metrics_port(i)]
        return ports

    # ---- paths -------------------------------------------------------------
    def node_dir(self, i: int) -> str:
        return os.path.join(self.dir, f"node{i}")

    def raft_dir(self, i: int) -> str:
        return os.path.join(self.node_dir(i), "raft-data-dir")

    def chain_file(self, i: int) -> str:
        return os.path.join(self.node_dir(i), "chain.jsonl")

    def conflicts_file(self, i: int) -> str:
        return os.path.join(self.node_dir(i), "conflicts.log")

    def config_file(self, i: int) -> str:
        return os.path.join(self.node_dir(i), "config.toml")

    def log_file(self, name: str) -> str:
        return os.path.join(self.dir, "logs", f"{name}.log")

    def pid_file(self, name: str) -> str:
        return os.path.join(self.dir, "pids", f"{name}.pid")

    def schedule_file(self) -> str:
        return os.path.join(self.dir, SCHEDULE_FILE)

    # ---- identities ------------------------------------------------------------
    def address(self, i: int) -> bytes:
        return bytes.fromhex(self.addresses[i])

    def index_of(self, address_hex: str) -> int:
        return self.addresses.index(address_hex.lower().removeprefix("0x"))

    def genesis_hash(self) -> bytes:
        return hashlib.sha256(b"devnet genesis " + ",".join(self.addresses).encode()).digest()

    # ---- persistence -----------------------------------------------------------
    def save(self) -> None:
        atomic_write_json(os.path.join(self.dir, SPEC_FILE), dataclasses.asdict(self))

    @classmethod
    def load(cls, dir: str) -> Spec:
        path = os.path.join(dir, SPEC_FILE)
        with open(path) as f:
            raw = json.load(f)
        raw["dir"] = os.path.abspath(dir)
        return cls(**raw)


def origin_of(address: bytes) -> int:
    """network_zenoh's origin of a node: its address's first 8 bytes, big-endian."""
    return int.from_bytes(address[:8], "big")


def make_addresses(n: int, seed: int) -> list[str]:
    """n distinct 20-byte addresses derived from the seed (distinct origins too)."""
    out: list[str] = []
    k = 0
    while len(out) < n:
        a = hashlib.sha256(f"devnet node {seed} {k}".encode()).digest()[:20]
        k += 1
        if all(origin_of(a) != origin_of(bytes.fromhex(b)) for b in out):
            out.append(a.hex())
    return out


def atomic_write_json(path: str, obj) -> None:
    """Write temp, fsync, rename, fsync dir: readers see the old or the new file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_schedule(spec: Spec) -> list[dict]:
    """Scheduled validator changes: [{"id", "height", "validators": [hex]}]."""
    try:
        with open(spec.schedule_file()) as f:
            return json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return []
