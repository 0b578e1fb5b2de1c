"""The fault injector: decides, from the run's RNG, what goes wrong and when.

Network shapes (isolation, bipartitions, bridges, one-way cuts, random link
sets, a leader that can hear but not speak), loss/duplication rates, stale
redelivery, crashes between steps and at any boundary inside the host's Ready
loop, restarts, pauses and slow voters (high link latency plus a slow disk
that defers Readies). Every crash is a power cut: what was not synced is lost
(with the fsync shortcut, a commit-only hard state too). Lost state
(docs/internals.md, "Lost state"): a wipe of the data dir, a damaged synced WAL
tail that recovery cuts, a wipe right after a vote; on a minority of each voter
set at a time. It mutates the network and the nodes; it checks nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .checkers import conf_key

if TYPE_CHECKING:
    from .host import SimNode
    from .runner import Simulation


class FaultInjector:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.enabled = True
        self.restart_at: dict[int, int] = {}
        self.counts: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # ---- hooks from the host -------------------------------------------------------

    def crash_at_boundary(self, node: SimNode, stage: str) -> bool:
        p = self.sim.params
        if self.enabled and self.sim.rng.random() < p.boundary_crash_rate:
            self._count("crash@" + stage)
            return True
        return False

    def on_crash(self, node: SimNode) -> None:
        rng = self.sim.rng
        down = rng.choice([1, 5, 20, 60, 150]) * rng.randint(1, 3)
        self.restart_at[node.id] = self.sim.now + down

    # ---- per step ------------------------------------------------------------------

    def before_step(self) -> None:
        sim, rng, p = self.sim, self.sim.rng, self.sim.params
        if rng.random() < p.reshape_rate:
            self.reshape_network()
        if rng.random() < p.crash_rate:
            live = sim.live_nodes()
            if live:
                self._count("crash between steps")
                rng.choice(live).crash("between steps")
        if rng.random() < p.wipe_rate:
            self.lose_state("wipe")
        if rng.random() < p.synced_loss_rate:
            self.lose_state("synced tail")
        for nid in sorted(self.restart_at):
            if sim.now >= self.restart_at[nid]:
                del self.restart_at[nid]
                node = sim.nodes[nid]
                if not node.alive and not node.decommissioned:
                    self._count("restart")
                    node.start()
        if rng.random() < p.pause_rate:
            live = sim.live_nodes()
            if live:
                node = rng.choice(live)
                node.paused_until = sim.now + rng.randint(4, 25) * p.tick_every
                self._count("pause")
                sim.trace("pause", node.id, f"until step {node.paused_until}")
        if rng.random() < p.slow_rate:
            self.toggle_slow_voter()
        if rng.random() < p.rate_change:
            net = sim.net
            net.drop_rate = rng.choice([0.0, 0.0, 0.02, 0.05, 0.15, 0.3]) * p.intensity
            net.dup_rate = rng.choice([0.0, 0.02, 0.1])
            net.max_latency = rng.choice([1, 2, 4, 8, 20])
            sim.trace("net", 0, f"drop={net.drop_rate:.2f} dup={net.dup_rate} max_latency={net.max_latency}")

    # ---- lost state ----------------------------------------------------------------

    def lost_nodes(self) -> set[int]:
        return {n.id for n in self.sim.nodes.values() if n.lost_marker or n.pending_loss}

    def loss_allowed(self, nid: int) -> bool:
        """Lost state on a minority of every voter set at most: a majority that lost its
        votes (and maybe committed entries) is beyond what any rule can repair, and with
        the protection on it could elect nobody."""
        # Every voter set a node may elect with: the newest committed one and each node's
        # own applied one (a node that has not applied a change still counts the old set).
        sim = self.sim
        leader = sim.leader()
        if leader is not None and leader.raw.raft.pending_conf_index > leader.applied:
            return False  # a change in flight may make a lost node a voter (seed 2380)
        for n in sim.nodes.values():
            # ... also with no leader known: a change in some log may still commit (seed
            # 3401: a wipe between elections, then the change left 2 of 4 voters lost).
            if n.raw is not None and n.raw.raft._has_conf_change_in(n.applied + 1, n.raw.raft.log.last_index() + 1):
                return False
        lc = sim.checker.latest_conf
        confs = [n.conf_state for n in sim.nodes.values() if not n.decommissioned] + ([lc[1]] if lc else [])
        if len({conf_key(cs) for cs in confs if cs.voters}) > 1:
            return False  # not every node applied the newest change yet
        sets = [set(cs.voters) for cs in confs] + [set(cs.voters_outgoing) for cs in confs]
        if lc is None:
            sets.append(set(range(1, sim.params.n_nodes + 1)))
        lost = self.lost_nodes() | {nid}
        return all(len(lost & s) <= (len(s) - 1) // 2 for s in sets if s)

    def lose_state(self, kind: str, node: SimNode | None = None) -> bool:
        """A node loses durable state: a power cut first (if it runs), then its data dir
        is wiped, or the newest synced tail of its log is damaged so that recovery cuts
        it. Its next start (scheduled as after any crash) finds the loss."""
        sim, rng = self.sim, self.sim.rng
        if node is None:
            candidates = [n for n in sim.nodes.values() if not n.decommissioned and self.loss_allowed(n.id)]
            if not candidates:
                return False
            node = rng.choice(candidates)
        elif node.decommissioned or not self.loss_allowed(node.id):
            return False
        if node.alive:
            node.crash(f"power cut before {kind}")
        if kind == "wipe" or kind == "wipe after vote":
            had = node.had_state()
            node.backend.wipe()
            what = "data dir wiped" if had else "data dir wiped (it held nothing yet)"
            if had:
                node.pending_loss = "wipe"
        else:
            what = node.backend.lose_synced_tail(rng)
            if what is None:
                return False
            node.pending_loss = "synced tail"
        self._count(kind)
        sim.trace("lose-state", node.id, what)
        return True

    def after_vote(self, node: SimNode) -> None:
        """Right after a node granted a vote: sometimes wipe it and restart it at once, the
        sharpest way to make it vote twice in one term if nothing stops it."""
        sim = self.sim
        if self.enabled and sim.rng.random() < sim.params.wipe_after_vote_rate:
            sim.after_step.append(lambda: self._wipe_after_vote(node))

    def _wipe_after_vote(self, node: SimNode) -> None:
        if self.enabled and node.alive and self.lose_state("wipe after vote", node):
            self.restart_at[node.id] = self.sim.now + self.sim.rng.randint(1, 4)

    def toggle_slow_voter(self) -> None:
        sim, rng = self.sim, self.sim.rng
        candidates = [n for n in sim.nodes.values() if not n.decommissioned]
        if not candidates:
            return
        node = rng.choice(candidates)
        if node.id in sim.net.slow or node.io_delay:
            sim.net.slow.pop(node.id, None)
            node.io_delay = 0.0
            sim.trace("slow", node.id, "back to normal")
        else:
            sim.net.slow[node.id] = rng.choice([4, 10, 30, 60])
            node.io_delay = rng.choice([0.0, 0.5, 0.9])
            self._count("slow voter")
            sim.trace("slow", node.id, f"extra latency={sim.net.slow[node.id]} io_delay={node.io_delay}")

    def reshape_network(self) -> None:
        """Replace the set of cut links by a new partition shape."""
        sim, rng = self.sim, self.sim.rng
        ids = sorted(n.id for n in sim.nodes.values() if not n.decommissioned)
        blocked: set[tuple[int, int]] = set()
        shape = rng.choice(
            ["heal", "heal", "isolate", "bipartition", "bridge", "oneway_out", "oneway_in", "random_links",
             "leader_mute", "leader_deaf", "isolate_leader"]
        )
        leader = sim.leader()
        if shape == "isolate" or (shape in ("isolate_leader", "leader_mute", "leader_deaf") and leader is None):
            x = rng.choice(ids)
            blocked = {(x, y) for y in ids if y != x} | {(y, x) for y in ids if y != x}
        elif shape == "isolate_leader":
            x = leader.id
            blocked = {(x, y) for y in ids if y != x} | {(y, x) for y in ids if y != x}
        elif shape == "leader_mute":
            blocked = {(leader.id, y) for y in ids if y != leader.id}
        elif shape == "leader_deaf":
            blocked = {(y, leader.id) for y in ids if y != leader.id}
        elif shape == "bipartition":
            order = ids[:]
            rng.shuffle(order)
            k = rng.randint(1, len(order) - 1)
            a, b = order[:k], order[k:]
            blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
        elif shape == "bridge" and len(ids) >= 3:
            order = ids[:]
            rng.shuffle(order)
            bridge, rest = order[0], order[1:]
            k = rng.randint(1, len(rest) - 1)
            a, b = rest[:k], rest[k:]
            blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
            shape = f"bridge via {bridge}"
        elif shape == "oneway_out":
            x = rng.choice(ids)
            blocked = {(x, y) for y in ids if y != x and rng.random() < 0.7}
        elif shape == "oneway_in":
            x = rng.choice(ids)
            blocked = {(y, x) for y in ids if y != x and rng.random() < 0.7}
        elif shape == "random_links":
            q = rng.choice([0.2, 0.4, 0.6])
            blocked = {(x, y) for x in ids for y in ids if x != y and rng.random() < q}
        sim.net.blocked = blocked
        self._count("net " + shape.split()[0])
        sim.trace("partition", 0, f"{shape}: {len(blocked)} directed links cut")
