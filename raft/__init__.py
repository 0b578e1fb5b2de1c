"""A compact, sans-I/O Raft that speaks raft-rs's wire format (package eraftpb)."""
