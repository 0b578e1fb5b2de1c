"""Majority and joint-majority arithmetic: which index is committed, who won a vote.

Raft paper §5.3 (an entry is committed once stored on a majority) and thesis §4.3 (joint
consensus: decisions need a majority of both the old and the new configuration).
Pure functions over sets and dicts; no Raft state lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import IntEnum

# An empty configuration commits everything and never blocks a joint decision (raft-rs u64::MAX).
INF_INDEX = (1 << 64) - 1


class VoteResult(IntEnum):
    Pending = 0
    Lost = 1
    Won = 2


def majority_index(acked: list[int]) -> int:
    """Largest index a majority reached, given each voter's acknowledged index."""
    n = len(acked)
    if n == 0:
        return INF_INDEX
    if n == 1:
        return acked[0]
    return sorted(acked, reverse=True)[n // 2]


def majority_committed_index(voters: Iterable[int], matched: Mapping[int, int]) -> int:
    """Largest index acknowledged by a majority of `voters` (missing ids count as 0)."""
    get = matched.get
    return majority_index([get(v, 0) for v in voters])


def majority_vote_result(voters: Iterable[int], votes: Mapping[int, bool]) -> VoteResult:
    """Won with a majority of yes, Lost once a majority is impossible, else Pending."""
    ids = list(voters)
    if not ids:
        return VoteResult.Won  # an empty config wins by convention (joint with empty outgoing)
    yes = no = missing = 0
    for v in ids:
        r = votes.get(v)
        if r is None:
            missing += 1
        elif r:
            yes += 1
        else:
            no += 1
    q = len(ids) // 2 + 1
    if yes >= q:
        return VoteResult.Won
    if yes + missing >= q:
        return VoteResult.Pending
    return VoteResult.Lost


def joint_committed_index(incoming: Iterable[int], outgoing: Iterable[int], matched: Mapping[int, int]) -> int:
    return min(majority_committed_index(incoming, matched), majority_committed_index(outgoing, matched))


def joint_vote_result(incoming: Iterable[int], outgoing: Iterable[int], votes: Mapping[int, bool]) -> VoteResult:
    r1 = majority_vote_result(incoming, votes)
    r2 = majority_vote_result(outgoing, votes)
    if r1 == r2:
        return r1
    if VoteResult.Lost in (r1, r2):
        return VoteResult.Lost
    return VoteResult.Pending


def has_quorum(incoming: Iterable[int], outgoing: Iterable[int], ids: set[int]) -> bool:
    """Whether `ids` holds a (joint) majority, e.g. the recently active peers for check-quorum."""
    votes = {i: True for i in ids}
    return joint_vote_result(incoming, outgoing, votes) == VoteResult.Won
