"""Deterministic randomized simulation of the Raft core (issue 3, Tests).

A seeded cluster of 3-7 RawNodes on an in-memory network and pluggable
crashable storage (MemoryStorage, DiskStorage), driven through faults
(including lost state: wipes and damaged synced tails, with Config.lost_state's
vote rule on, or off with --no-protect) and client actions while checkers
verify Raft's safety properties after every Ready. Modules: network (links,
loss, cuts), stores (crash semantics), host (the per-node Ready loop), checkers
(invariants), faults, workload, runner (phases). Replay a seed:
`.venv/bin/python -m tests.sim --seed N [--no-protect] [-v]`.
"""

from .runner import Result, SimFailure, replay_command, run_seed

__all__ = ["Result", "SimFailure", "replay_command", "run_seed"]
