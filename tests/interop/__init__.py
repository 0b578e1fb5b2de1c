"""Interop harness: this project's RawNode against etcd raft (the oracle in ../shared/oracle)."""
