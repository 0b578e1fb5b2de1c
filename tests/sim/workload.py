"""The simulated clients and operators: proposals, membership changes
(ConfChangeV2: add, remove incl. the leader, replace one, replace all, joint
with auto or explicit leave, learners added/promoted/demoted), leader
transfers, forced campaigns, compaction.

Changes are computed from the leader's applied conf state, as the service's
`maybe_pending_conf_change` does; the core refuses what it must refuse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cita_raft_pb import eraftpb_pb2 as pb

if TYPE_CHECKING:
    from .runner import Simulation

MIN_VOTERS = 3
MAX_VOTERS = 7


def conf_change(
    adds: list[int], removes: list[int], transition: int = pb.Auto, learners: list[int] | None = None
) -> pb.ConfChangeV2:
    cc = pb.ConfChangeV2(transition=transition)
    for nid in adds:
        cc.changes.add(change_type=pb.AddNode, node_id=nid)
    for nid in learners or []:
        cc.changes.add(change_type=pb.AddLearnerNode, node_id=nid)
    for nid in removes:
        cc.changes.add(change_type=pb.RemoveNode, node_id=nid)
    return cc


class Workload:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.proposed = 0
        self.counts: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def act(self) -> None:
        sim, rng, p = self.sim, self.sim.rng, self.sim.params
        if rng.random() < p.propose_rate:
            self.propose()
        if rng.random() < p.confchange_rate:
            self.change_membership()
        if rng.random() < p.transfer_rate:
            leader = sim.leader()
            if leader is not None:
                voters = [v for v in leader.conf_state.voters if v != leader.id]
                if voters:
                    target = rng.choice(voters)
                    self._count("transfer")
                    sim.trace("transfer", leader.id, f"to {target}")
                    leader.transfer_leader(target)
        if rng.random() < p.campaign_rate:
            live = sim.live_nodes()
            if live:
                node = rng.choice(live)
                self._count("campaign")
                node.campaign()
        if rng.random() < p.compact_rate:
            live = sim.live_nodes()
            if live:
                rng.choice(live).snapshot_now(compact=True)

    def propose(self, prefix: str = "p") -> bytes | None:
        """Propose a unique payload; its bytes if the node accepted it."""
        sim = self.sim
        leader = sim.leader()
        live = sim.live_nodes()
        if not live:
            return None
        # Mostly the leader; sometimes a follower, which forwards (or drops) it.
        node = leader if leader is not None and sim.rng.random() < 0.8 else sim.rng.choice(live)
        self.proposed += 1
        data = f"{prefix}{sim.seed}-{self.proposed}".encode()
        ok = node.propose(data)
        self._count("propose ok" if ok else "propose refused")
        return data if ok else None

    def change_membership(self) -> None:
        sim, rng = self.sim, self.sim.rng
        leader = sim.leader()
        if leader is None:
            return
        if sim.faults.lost_nodes():
            # A change could leave the nodes that lost state a majority of the new voters
            # (then nobody could be elected), e.g. by promoting one: the operator waits
            # until they vote again.
            self._count("cc deferred (lost state)")
            return
        cs = leader.conf_state
        if cs.voters_outgoing:
            if not cs.auto_leave:
                self._count("cc leave joint")
                sim.trace("confchange", leader.id, "propose explicit leave of the joint config")
                leader.propose_conf_change(pb.ConfChangeV2())
            return
        voters = sorted(cs.voters)
        learners = sorted(cs.learners)
        kind = rng.choice(["add", "remove", "remove_leader", "replace_one", "replace_all",
                           "add_learner", "promote_learner", "demote_voter"])
        transition = rng.choice([pb.Auto, pb.Auto, pb.Implicit, pb.Explicit])
        if kind == "add" and len(voters) < MAX_VOTERS and sim.can_add(1):
            cc = conf_change([sim.new_node()], [], pb.Auto)
        elif kind == "add_learner" and len(learners) < 2 and sim.can_add(1):
            cc = conf_change([], [], pb.Auto, learners=[sim.new_node()])
        elif kind == "promote_learner" and learners and len(voters) < MAX_VOTERS:
            cc = conf_change([rng.choice(learners)], [], pb.Auto)
        elif kind == "demote_voter" and len(voters) > MIN_VOTERS:
            # Through a joint config when the transition asks for one: the voter waits
            # in learners_next until the joint config is left.
            cc = conf_change([], [], transition, learners=[rng.choice(voters)])
        elif kind == "remove" and len(voters) > MIN_VOTERS:
            others = [v for v in voters if v != leader.id]
            cc = conf_change([], [rng.choice(others)], pb.Auto)
        elif kind == "remove_leader" and len(voters) > MIN_VOTERS and leader.id in voters:
            cc = conf_change([], [leader.id], pb.Auto)
        elif kind == "replace_one" and sim.can_add(1):
            cc = conf_change([sim.new_node()], [rng.choice(voters)], transition)
        elif kind == "replace_all" and sim.can_add(MIN_VOTERS):
            n = rng.randint(MIN_VOTERS, min(MAX_VOTERS, 5))
            cc = conf_change([sim.new_node() for _ in range(n)], voters, transition)
        else:
            return
        self._count("cc " + kind)
        desc = ", ".join(f"{pb.ConfChangeType.Name(c.change_type)} {c.node_id}" for c in cc.changes)
        ok = leader.propose_conf_change(cc)
        sim.trace("confchange", leader.id, f"{kind} [{desc}] {pb.ConfChangeTransition.Name(cc.transition)} "
                  f"{'accepted' if ok else 'refused'}")
