"""Quorum arithmetic, property-checked against a naive version (seeded)."""

import itertools
import random

from raft.quorum import (
    INF_INDEX,
    VoteResult,
    joint_committed_index,
    joint_vote_result,
    majority_committed_index,
    majority_vote_result,
)


def naive_committed(voters, matched):
    """Largest index i such that a majority of voters have match >= i."""
    if not voters:
        return INF_INDEX
    best = 0
    for i in sorted({matched.get(v, 0) for v in voters} | {0}):
        if sum(1 for v in voters if matched.get(v, 0) >= i) > len(voters) // 2:
            best = max(best, i)
    return best


def naive_vote(voters, votes):
    if not voters:
        return VoteResult.Won
    yes = sum(1 for v in voters if votes.get(v) is True)
    no = sum(1 for v in voters if votes.get(v) is False)
    q = len(voters) // 2 + 1
    if yes >= q:
        return VoteResult.Won
    if len(voters) - no >= q:
        return VoteResult.Pending
    return VoteResult.Lost


def test_majority_committed_index_matches_naive():
    rng = random.Random(7)
    for _ in range(3000):
        n = rng.randint(0, 7)
        voters = set(rng.sample(range(1, 12), n))
        matched = {i: rng.randint(0, 20) for i in range(1, 12) if rng.random() < 0.8}
        assert majority_committed_index(voters, matched) == naive_committed(voters, matched), (voters, matched)


def test_joint_committed_index_is_min_of_both():
    rng = random.Random(8)
    for _ in range(2000):
        a = set(rng.sample(range(1, 9), rng.randint(1, 5)))
        b = set(rng.sample(range(1, 9), rng.randint(0, 5)))
        matched = {i: rng.randint(0, 10) for i in range(1, 9)}
        expect = min(naive_committed(a, matched), naive_committed(b, matched))
        assert joint_committed_index(a, b, matched) == expect


def test_vote_results_match_naive_exhaustively_for_small_configs():
    for n in range(0, 6):
        voters = set(range(1, n + 1))
        for assignment in itertools.product([None, True, False], repeat=n):
            votes = {v: a for v, a in zip(sorted(voters), assignment, strict=True) if a is not None}
            assert majority_vote_result(voters, votes) == naive_vote(voters, votes)


def test_joint_vote_needs_both_majorities():
    inc, out = {1, 2, 3}, {3, 4, 5}
    assert joint_vote_result(inc, out, {1: True, 2: True}) == VoteResult.Pending
    assert joint_vote_result(inc, out, {1: True, 2: True, 4: True, 5: True}) == VoteResult.Won
    assert joint_vote_result(inc, out, {4: False, 5: False, 1: True, 2: True}) == VoteResult.Lost
    rng = random.Random(9)
    for _ in range(2000):
        a = set(rng.sample(range(1, 8), rng.randint(1, 5)))
        b = set(rng.sample(range(1, 8), rng.randint(0, 5)))
        votes = {i: rng.random() < 0.5 for i in range(1, 8) if rng.random() < 0.7}
        r1, r2 = naive_vote(a, votes), naive_vote(b, votes)
        if r1 == r2:
            expect = r1
        elif VoteResult.Lost in (r1, r2):
            expect = VoteResult.Lost
        else:
            expect = VoteResult.Pending
        assert joint_vote_result(a, b, votes) == expect
