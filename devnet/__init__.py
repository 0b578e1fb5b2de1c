"""devnet -- a local CITA-Cloud chain for the Raft consensus service.

It owns the simulated neighbours of `consensus.py`: a controller per node
(`devnet.controller`, the chain and its block rules), one network hub for all
nodes with fault injection (`devnet.network`), the process bookkeeping
(`devnet.procs`) and the operator command (`python -m devnet`, `devnet.cli`).
It never implements consensus itself (`devnet.stub_consensus` is a
single-proposer stand-in used only to test the plumbing).
"""
