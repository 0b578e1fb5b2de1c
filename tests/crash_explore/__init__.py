"""Crash-state explorer for raft/ storage: see explore.py and docs/internals.md."""
