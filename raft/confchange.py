"""Membership changes with ConfChangeV2: simple changes, entering and leaving a joint
configuration (thesis §4.3), and rebuilding a configuration from a ConfState.

A Changer works on copies; the caller installs the result only if no error was raised,
so a rejected change leaves the tracker untouched. Rules as etcd/raft-rs:
* a simple change may alter at most one voter (otherwise joint consensus is needed);
* a joint config can only be entered from a non-joint one and only left from a joint one;
* no change may leave the incoming config without voters.
"""

from __future__ import annotations

from cita_raft_pb import eraftpb_pb2 as pb

from .errors import ConfChangeError
from .progress import Configuration, Progress, ProgressTracker


def enter_joint(cc: pb.ConfChangeV2) -> bool | None:
    """None if `cc` is a simple change; else whether the joint config is left automatically."""
    if cc.transition != pb.Auto or len(cc.changes) > 1:
        return cc.transition in (pb.Auto, pb.Implicit)
    return None


def leave_joint(cc: pb.ConfChangeV2) -> bool:
    """An empty Auto ConfChangeV2 means: leave the joint configuration."""
    return cc.transition == pb.Auto and len(cc.changes) == 0


class Changer:
    def __init__(self, tracker: ProgressTracker, last_index: int) -> None:
        self.tracker = tracker
        self.last_index = last_index

    def _check_and_copy(self) -> tuple[Configuration, dict[int, Progress]]:
        return self.tracker.conf.copy(), dict(self.tracker.progress)

    def enter_joint(self, auto_leave: bool, changes) -> tuple[Configuration, dict[int, Progress]]:
        cfg, prs = self._check_and_copy()
        if cfg.is_joint():
            raise ConfChangeError("config is already joint")
        if not cfg.incoming:
            raise ConfChangeError("can't make a zero-voter config joint")
        cfg.outgoing = set(cfg.incoming)
        self._apply(cfg, prs, changes)
        cfg.auto_leave = auto_leave
        _check_invariants(cfg, prs)
        return cfg, prs

    def leave_joint(self) -> tuple[Configuration, dict[int, Progress]]:
        cfg, prs = self._check_and_copy()
        if not cfg.is_joint():
            raise ConfChangeError("can't leave a non-joint config")
        cfg.learners |= cfg.learners_next
        cfg.learners_next = set()
        for pid in cfg.outgoing:
            if pid not in cfg.incoming and pid not in cfg.learners:
                prs.pop(pid, None)
        cfg.outgoing = set()
        cfg.auto_leave = False
        _check_invariants(cfg, prs)
        return cfg, prs

    def simple(self, changes) -> tuple[Configuration, dict[int, Progress]]:
        cfg, prs = self._check_and_copy()
        if cfg.is_joint():
            raise ConfChangeError("can't apply simple config change in joint config")
        before = set(cfg.incoming)
        self._apply(cfg, prs, changes)
        if len(before ^ cfg.incoming) > 1:
            raise ConfChangeError("more than one voter changed without entering joint config")
        _check_invariants(cfg, prs)
        return cfg, prs

    def _apply(self, cfg: Configuration, prs: dict[int, Progress], changes) -> None:
        for cc in changes:
            nid = cc.node_id
            if nid == 0:
                continue  # etcd/raft-rs: a zero id is a no-op
            t = cc.change_type
            if t == pb.AddNode:
                self._make_voter(cfg, prs, nid)
            elif t == pb.AddLearnerNode:
                self._make_learner(cfg, prs, nid)
            elif t == pb.RemoveNode:
                self._remove(cfg, prs, nid)
            else:
                raise ConfChangeError(f"unknown change type {t}")
        if not cfg.incoming:
            raise ConfChangeError("removed all voters")

    def _init_progress(self, cfg: Configuration, prs: dict[int, Progress], nid: int, learner: bool) -> None:
        if learner:
            cfg.learners.add(nid)
        else:
            cfg.incoming.add(nid)
        # Probe from the last index: a follower that has it answers at once (etcd's choice).
        pr = Progress(max(self.last_index, 1), self.tracker.max_inflight)
        pr.recent_active = True  # do not let check-quorum count a fresh member against us
        prs[nid] = pr

    def _make_voter(self, cfg: Configuration, prs: dict[int, Progress], nid: int) -> None:
        if nid not in prs:
            self._init_progress(cfg, prs, nid, learner=False)
            return
        cfg.learners.discard(nid)
        cfg.learners_next.discard(nid)
        cfg.incoming.add(nid)

    def _make_learner(self, cfg: Configuration, prs: dict[int, Progress], nid: int) -> None:
        if nid not in prs:
            self._init_progress(cfg, prs, nid, learner=True)
            return
        if nid in cfg.learners:
            return
        cfg.incoming.discard(nid)
        cfg.learners.discard(nid)
        cfg.learners_next.discard(nid)
        # A voter of the outgoing config can only become a learner once the joint config is left.
        if nid in cfg.outgoing:
            cfg.learners_next.add(nid)
        else:
            cfg.learners.add(nid)

    def _remove(self, cfg: Configuration, prs: dict[int, Progress], nid: int) -> None:
        if nid not in prs:
            return
        cfg.incoming.discard(nid)
        cfg.learners.discard(nid)
        cfg.learners_next.discard(nid)
        if nid not in cfg.outgoing:
            del prs[nid]


def _check_invariants(cfg: Configuration, prs: dict[int, Progress]) -> None:
    for pid in cfg.incoming | cfg.outgoing | cfg.learners | cfg.learners_next:
        if pid not in prs:
            raise ConfChangeError(f"no progress for {pid}")
    for pid in cfg.learners_next:
        if pid not in cfg.outgoing:
            raise ConfChangeError(f"{pid} is in learners_next but not in outgoing voters")
        if pid in cfg.learners:
            raise ConfChangeError(f"{pid} is in learners and learners_next")
    for pid in cfg.learners:
        if pid in cfg.outgoing or pid in cfg.incoming:
            raise ConfChangeError(f"{pid} is a learner and a voter")
    if not cfg.is_joint() and (cfg.learners_next or cfg.auto_leave):
        raise ConfChangeError("learners_next or auto_leave set outside a joint config")


def apply_change(tracker: ProgressTracker, last_index: int, cc: pb.ConfChangeV2) -> tuple[Configuration, dict[int, Progress]]:
    """The configuration `cc` leads to (not installed)."""
    changer = Changer(tracker, last_index)
    if leave_joint(cc):
        return changer.leave_joint()
    auto = enter_joint(cc)
    if auto is not None:
        return changer.enter_joint(auto, cc.changes)
    return changer.simple(cc.changes)


def restore(tracker: ProgressTracker, last_index: int, cs: pb.ConfState) -> None:
    """Install the configuration described by `cs` (start-up or snapshot), as raft-rs's restore:
    build the outgoing config with simple changes, then enter the joint config towards the incoming one."""
    tracker.apply_conf(Configuration(), {})
    outgoing = [pb.ConfChangeSingle(change_type=pb.AddNode, node_id=v) for v in cs.voters_outgoing]
    incoming = [pb.ConfChangeSingle(change_type=pb.AddNode, node_id=v) for v in cs.voters]
    incoming += [pb.ConfChangeSingle(change_type=pb.AddLearnerNode, node_id=v) for v in cs.learners]
    incoming += [pb.ConfChangeSingle(change_type=pb.AddLearnerNode, node_id=v) for v in cs.learners_next]
    if not outgoing:
        # No joint state: add everything one by one (each step changes at most one voter).
        for ch in incoming:
            cfg, prs = Changer(tracker, last_index).simple([ch])
            tracker.apply_conf(cfg, prs)
        return
    for ch in outgoing:
        cfg, prs = Changer(tracker, last_index).simple([ch])
        tracker.apply_conf(cfg, prs)
    # Enter the joint state: the incoming voters replace the outgoing ones.
    changes = [pb.ConfChangeSingle(change_type=pb.RemoveNode, node_id=v) for v in cs.voters_outgoing] + incoming
    cfg, prs = Changer(tracker, last_index).enter_joint(cs.auto_leave, changes)
    tracker.apply_conf(cfg, prs)
