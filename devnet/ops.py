"""The operations behind the `devnet` command, as a Python API (tests use it directly).

`Devnet.create()` lays out a devnet dir (spec, per-node config.toml, address
files); every other operation opens the dir again, so separate commands act
on the same running devnet. Processes: one network hub, one controller and
one consensus per node, all detached, tracked by pid files under
<dir>/pids and logging to <dir>/logs. Nothing is ever killed by name.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import urllib.request

import grpc

from cita_raft_pb import health_check_pb2, health_check_pb2_grpc
from raft import peer_id as raft_peer_id

from . import admin, procs
from .chain import compare_chains, read_chain
from .layout import Spec, atomic_write_json, load_schedule, make_addresses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES = {0: "follower", 1: "candidate", 2: "leader", 3: "precandidate"}


def default_python() -> str:
    venv = os.path.join(REPO, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def ports_free(ports: list[int]) -> bool:
    for p in ports:
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))
        except OSError:
            return False
        finally:
            s.close()
    return True


def find_base_port(nodes: int, rng_seed: int | None = None, low: int = 20000, high: int = 32000) -> int:
    """A base port whose whole slot range is free (below the ephemeral range 32768+)."""
    import random
    rng = random.Random(rng_seed if rng_seed is not None else os.getpid() * 7919 + time.time_ns())
    span = 10 * (nodes + 1)
    for _ in range(200):
        base = rng.randrange(low, high - span) // 10 * 10
        probe = Spec(dir="", nodes=nodes, validators=[], addresses=[], base_port=base)
        if ports_free(probe.all_ports()):
            return base
    raise RuntimeError("no free port range found")


def config_toml(spec: Spec, i: int) -> str:
    addr_file = os.path.join(spec.node_dir(i), "node_address")
    return f"""# devnet node{i}: written by `devnet up`
[consensus_raft]
node_addr = "{addr_file}"
grpc_listen_port = {spec.consensus_port(i)}
network_port = {spec.network_port(i)}
controller_port = {spec.controller_port(i)}
enable_metrics = true
metrics_port = {spec.metrics_port(i)}
tick_interval_in_millis = {spec.tick_ms}
heartbeat_tick = {spec.heartbeat_tick}
election_tick = {spec.election_tick}
raft_data_path = "{spec.raft_dir(i)}"
log_level = "{spec.log_level}"
"""


def scrape_metrics(port: int, timeout: float = 0.5) -> dict[str, float]:
    """The consensus_raft_* gauges of a node's /metrics (empty if unreachable)."""
    return scrape(port, timeout)[0]


def scrape(port: int, timeout: float = 0.5) -> tuple[dict[str, float], int | None]:
    """(the unlabelled consensus_raft_* samples, the raft id of the leader this
    node knows or None) from a node's /metrics; ({}, None) if unreachable. The
    leader's id is a label (`consensus_raft_leader{leader_id="..."} 1`): 64-bit
    raft ids do not survive a float sample."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return {}, None
    out: dict[str, float] = {}
    leader = None
    for line in text.splitlines():
        if line.startswith('consensus_raft_leader{leader_id="'):
            leader = int(line.split('"')[1])
        elif line.startswith("consensus_raft_") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out, leader


class Devnet:
    """One devnet dir and the processes it runs."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.marker = spec.dir

    # ---- layout ---------------------------------------------------------------------
    @classmethod
    def create(cls, dir: str, nodes: int, validators: int | None = None, base_port: int | None = None,
               block_interval: int = 3, tick_ms: int = 200, heartbeat_tick: int = 15, election_tick: int = 50,
               seed: int = 1, consensus: str = "real", log_level: str = "info") -> Devnet:
        dir = os.path.abspath(dir)
        if os.path.exists(os.path.join(dir, "devnet.json")):
            raise FileExistsError(f"{dir} already holds a devnet (run `devnet down` and remove it first)")
        addresses = make_addresses(nodes, seed)
        k = nodes if validators is None else validators
        if not 1 <= k <= nodes:
            raise ValueError(f"validators must be in 1..{nodes}")
        spec = Spec(dir=dir, nodes=nodes, validators=addresses[:k], addresses=addresses,
                    base_port=base_port if base_port is not None else find_base_port(nodes),
                    block_interval=block_interval, tick_ms=tick_ms, heartbeat_tick=heartbeat_tick,
                    election_tick=election_tick, seed=seed, consensus=consensus, repo=REPO,
                    python=default_python(), log_level=log_level)
        if base_port is not None and not ports_free(spec.all_ports()):
            raise ValueError(f"some of the ports {spec.all_ports()} are in use; pick another --base-port")
        os.makedirs(dir, exist_ok=True)
        for i in range(nodes):
            os.makedirs(spec.node_dir(i), exist_ok=True)
            with open(os.path.join(spec.node_dir(i), "node_address"), "w") as f:
                f.write(addresses[i])
            with open(spec.config_file(i), "w") as f:
                f.write(config_toml(spec, i))
        spec.save()
        return cls(spec)

    @classmethod
    def open(cls, dir: str) -> Devnet:
        return cls(Spec.load(dir))

    # ---- processes ------------------------------------------------------------------
    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _pid(self, name: str) -> str:
        return self.spec.pid_file(name)

    def start_hub(self) -> int:
        if procs.alive(self._pid("network"), self.marker):
            return procs.read_pid(self._pid("network"))
        pid = procs.spawn([self.spec.python, "-m", "devnet.network", self.spec.dir], self._pid("network"),
                          self.spec.log_file("network"), cwd=self.spec.dir, env=self._env())
        self._wait_admin(self.spec.hub_admin_port(), "network hub")
        return pid

    def stop_hub(self, kill: bool = False) -> bool:
        return (procs.kill9 if kill else procs.stop)(self._pid("network"), self.marker)

    def start_controller(self, i: int) -> int:
        name = f"controller{i}"
        if procs.alive(self._pid(name), self.marker):
            return procs.read_pid(self._pid(name))
        pid = procs.spawn([self.spec.python, "-m", "devnet.controller", self.spec.dir, str(i)], self._pid(name),
                          self.spec.log_file(name), cwd=self.spec.node_dir(i), env=self._env())
        self._wait_admin(self.spec.controller_port(i), name)
        return pid

    def stop_controller(self, i: int, kill: bool = False) -> bool:
        return (procs.kill9 if kill else procs.stop)(self._pid(f"controller{i}"), self.marker)

    def consensus_argv(self, i: int) -> list[str]:
        if self.spec.consensus == "stub":
            return [self.spec.python, "-m", "devnet.stub_consensus", self.spec.config_file(i)]
        return [self.spec.python, os.path.join(self.spec.repo, "consensus.py"), "run", "-c",
                self.spec.config_file(i), "--stdout"]

    def start(self, i: int) -> int:
        """Start node i's consensus (its controller too, if it is not running)."""
        self.start_controller(i)
        name = f"consensus{i}"
        if procs.alive(self._pid(name), self.marker):
            return procs.read_pid(self._pid(name))
        return procs.spawn(self.consensus_argv(i), self._pid(name), self.spec.log_file(name),
                           cwd=self.spec.node_dir(i), env=self._env())

    def kill(self, i: int) -> bool:
        """SIGKILL node i's consensus."""
        return procs.kill9(self._pid(f"consensus{i}"), self.marker)

    def stop(self, i: int, timeout: float = 10.0) -> bool:
        """SIGTERM node i's consensus (SIGKILL after timeout)."""
        return procs.stop(self._pid(f"consensus{i}"), self.marker, timeout)

    def consensus_pid(self, i: int) -> int | None:
        return procs.alive(self._pid(f"consensus{i}"), self.marker)

    def wipe(self, i: int) -> bool:
        """Delete node i's raft data dir (its consensus is SIGKILLed first if running)."""
        was_running = self.kill(i)
        shutil.rmtree(self.spec.raft_dir(i), ignore_errors=True)
        return was_running

    def up(self, wait_serving: float = 0.0) -> None:
        self.start_hub()
        for i in range(self.spec.nodes):
            self.start_controller(i)
        for i in range(self.spec.nodes):
            self.start(i)
        if wait_serving:
            deadline = time.monotonic() + wait_serving
            for i in range(self.spec.nodes):
                self.wait_serving(i, max(0.1, deadline - time.monotonic()))

    def down(self) -> dict[str, bool]:
        stopped = {}
        for i in range(self.spec.nodes):
            stopped[f"consensus{i}"] = self.stop(i)
        for i in range(self.spec.nodes):
            stopped[f"controller{i}"] = self.stop_controller(i)
        stopped["network"] = self.stop_hub()
        return stopped

    def running(self) -> dict[str, int | None]:
        names = ["network"] + [f"{k}{i}" for i in range(self.spec.nodes) for k in ("controller", "consensus")]
        return {n: procs.alive(self._pid(n), self.marker) for n in names}

    def _wait_admin(self, port: int, what: str, timeout: float = 15.0) -> None:
        """Until the simulator answers an admin call (a TCP connect is not enough: gRPC
        binds and listens before the server is started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                admin.call(port, {"op": "status"}, timeout=0.5)
                return
            except grpc.RpcError:
                time.sleep(0.03)
        raise TimeoutError(f"{what} not listening on 127.0.0.1:{port} after {timeout} s (see {self.spec.dir}/logs)")

    def health(self, i: int, timeout: float = 0.5) -> bool:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.spec.consensus_port(i)}") as ch:
                r = health_check_pb2_grpc.HealthStub(ch).Check(health_check_pb2.HealthCheckRequest(), timeout=timeout)
                return r.status == health_check_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def wait_serving(self, i: int, timeout: float) -> float:
        """Seconds until node i's consensus answers health SERVING."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.health(i, 0.3):
                return time.monotonic() - t0
            time.sleep(0.02)
        raise TimeoutError(f"consensus{i} not serving after {timeout} s (see {self.spec.log_file(f'consensus{i}')})")

    # ---- faults --------------------------------------------------------------------------
    def hub(self, req: dict) -> dict:
        return admin.call(self.spec.hub_admin_port(), req)

    def partition(self, groups: list[list[int]], oneway: bool = False) -> dict:
        return self.hub({"op": "partition", "groups": groups, "oneway": oneway})

    def heal(self, all_faults: bool = False) -> dict:
        return self.hub({"op": "heal", "all": all_faults})

    def net(self, **faults) -> dict:
        return self.hub({"op": "net", **faults})

    def controller(self, i: int, req: dict, timeout: float = 3.0) -> dict:
        return admin.call(self.spec.controller_port(i), req, timeout)

    def controller_fault(self, i: int, delay_ms: int = 0, fail_rate: float = 0.0, duration_s: float = 3600.0) -> dict:
        return self.controller(i, {"op": "fault", "delay_ms": delay_ms, "fail_rate": fail_rate,
                                   "duration_s": duration_s})

    def schedule_validators(self, at_height: int, validators: list[str]) -> dict:
        """Schedule a validator-set change carried by block `at_height` (effective from at_height+1)."""
        vals = []
        for v in validators:
            v = str(v).lower().removeprefix("0x")
            if v.isdigit() and int(v) < self.spec.nodes:
                v = self.spec.addresses[int(v)]
            if len(bytes.fromhex(v)) != 20:
                raise ValueError(f"not a 20-byte address: {v}")
            vals.append(v)
        if not vals:
            raise ValueError("at least one validator")
        sched = load_schedule(self.spec)
        entry = {"id": len(sched) + 1, "height": int(at_height), "validators": vals}
        atomic_write_json(self.spec.schedule_file(), sched + [entry])
        return entry

    # ---- observation -------------------------------------------------------------------
    def metrics(self, i: int) -> dict[str, float]:
        return scrape_metrics(self.spec.metrics_port(i))

    def heights(self) -> list[int]:
        """Committed height per node, read from the chain files (works with processes down)."""
        return [len(read_chain(self.spec.chain_file(i))) for i in range(self.spec.nodes)]

    def leader(self) -> int | None:
        """The node whose metrics say leader with the highest term (None if none)."""
        best = None
        for i in range(self.spec.nodes):
            if self.consensus_pid(i) is None:
                continue
            m = self.metrics(i)
            if m.get("consensus_raft_role") == 2 and (best is None or m.get("consensus_raft_term", 0) > best[1]):
                best = (i, m.get("consensus_raft_term", 0))
        return best[0] if best else None

    def status(self) -> dict:
        """Per node: processes, raft (role, term, commit/applied index, lag behind
        the leader, stuck flag, in raft or not) and chain (controller height, tip);
        `leader` is the node index of the leader with the highest term, and a
        node that says leader at a lower term, or whose own check says stuck,
        is a leader without quorum (`stale_leader`)."""
        running = self.running()
        nodes = []
        raft_ids = {raft_peer_id(bytes.fromhex(a)): i for i, a in enumerate(self.spec.addresses)}
        for i in range(self.spec.nodes):
            row = {"node": i, "address": self.spec.addresses[i], "consensus_pid": running[f"consensus{i}"],
                   "controller_pid": running[f"controller{i}"]}
            m, leader_id = scrape(self.spec.metrics_port(i)) if row["consensus_pid"] else ({}, None)
            in_raft = bool(m.get("consensus_raft_peer_running", 0)) if m else None

            def num(name, m=m):
                return int(m[name]) if name in m else None
            row.update(role=(ROLES.get(int(m["consensus_raft_role"])) if in_raft else "not in raft")
                       if "consensus_raft_role" in m else None,
                       in_raft=in_raft,
                       term=num("consensus_raft_term"),
                       raft_height=num("consensus_raft_block_height"),
                       commit_index=num("consensus_raft_commit_index"),
                       applied_index=num("consensus_raft_applied_index"),
                       last_index=num("consensus_raft_last_index"),
                       stuck=bool(m["consensus_raft_stuck"]) if "consensus_raft_stuck" in m else None,
                       ready=bool(m["consensus_raft_ready"]) if "consensus_raft_ready" in m else None,
                       withholding_votes=bool(m["consensus_raft_withholding_votes"])
                       if "consensus_raft_withholding_votes" in m else None,
                       knows_leader=raft_ids.get(leader_id) if leader_id is not None else None,
                       lag=None, stale_leader=False)
            try:
                c = self.controller(i, {"op": "status"}, 1.0) if row["controller_pid"] else {}
            except grpc.RpcError:
                c = {}
            row.update(height=c.get("height"), tip=(c.get("hash") or "")[:12],
                       validator=(self.spec.addresses[i] in c.get("validators", [])) if c else None,
                       syncing=c.get("syncing"), conflicts=c.get("conflicts"))
            nodes.append(row)
        leaders = [n for n in nodes if n["role"] == "leader"]
        top = max(leaders, key=lambda n: (not n["stuck"], n["term"] or 0), default=None)
        for n in leaders:
            n["stale_leader"] = n is not top or bool(n["stuck"])
        if top is not None and top["stale_leader"]:
            top = None
        for n in nodes:
            if top is not None and n["in_raft"] and n["commit_index"] is not None:
                n["lag"] = max(0, top["commit_index"] - n["commit_index"])
        try:
            hub = self.hub({"op": "status"}) if running["network"] else None
        except grpc.RpcError:
            hub = None
        return {"dir": self.spec.dir, "leader": top["node"] if top else None, "nodes": nodes, "network": hub}

    def chains(self) -> tuple[list[dict], list[str]]:
        """Per node (height, tip hash) from the chain files, and every disagreement found
        (heights committed differently, or conflicts a controller recorded)."""
        chains = {i: read_chain(self.spec.chain_file(i)) for i in range(self.spec.nodes)}
        rows = [{"node": i, "height": len(b), "tip": b[-1].hash.hex() if b else self.spec.genesis_hash().hex()}
                for i, b in chains.items()]
        problems = compare_chains(chains)
        for i in range(self.spec.nodes):
            try:
                with open(self.spec.conflicts_file(i)) as f:
                    problems += [f"node{i}: {line.strip()}" for line in f if line.strip()]
            except FileNotFoundError:
                pass
        return rows, problems

    def timings(self, i: int, from_height: int = 1) -> dict[int, list[float]]:
        r = self.controller(i, {"op": "timings", "from": from_height}, 10.0)
        return {int(h): t for h, t in r["timings"].items()}


def dump_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
