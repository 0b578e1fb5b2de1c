"""Tests of consensus.py. Importing it monkey-patches the process with
gevent, so these tests run in a pytest process of their own (see the
Makefile's `test` target) and never share it with the pure raft tests."""
import consensus  # noqa: F401  (patch first, before anything else imports sockets/threads)
