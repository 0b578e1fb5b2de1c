"""The seeded raft message fuzzer in CI (issue 14 §2): >= 20,000 inputs into RawNode.step of
in-memory 3-node clusters, invariants checked after each (see tests/raft_fuzz.py).
`RAFT_FUZZ_INPUTS=100000` (make fuzz) runs the long variant; `RAFT_FUZZ_SEED` moves the
seeds (each seed is one cluster; a failure names the seed and input that replay it)."""

from __future__ import annotations

import os
import time

from tests.raft_fuzz import run_many

INPUTS = int(os.environ.get("RAFT_FUZZ_INPUTS", "20000"))
FIRST_SEED = int(os.environ.get("RAFT_FUZZ_SEED", "1"))


def test_fuzz_raft_messages_into_a_three_node_cluster():
    seeds = max(10, INPUTS // 1000)
    t0 = time.monotonic()
    done, stats = run_many(INPUTS, seeds, hostile_share=0.3, first_seed=FIRST_SEED)
    took = time.monotonic() - t0
    assert done >= INPUTS - seeds
    generated = sum(s.generated for s in stats)
    replays = sum(s.replays for s in stats)
    print(f"\nraft fuzz: {done} inputs ({generated} generated messages, {replays} replays) over {seeds} "
          f"seeds from {FIRST_SEED} in {took:.1f} s; highest commit {max(s.max_commit for s in stats)}; "
          f"terms with a leader {sum(s.leaders for s in stats)}; "
          f"fail-stops on forged input {sum(s.invariant_stops for s in stats)}")
    # the clusters did real work: leaders were elected and entries committed
    assert sum(s.leaders for s in stats) >= seeds // 2
    assert max(s.max_commit for s in stats) >= 50
