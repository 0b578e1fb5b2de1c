"""Tests of consensus.py. Importing it monkey-patches the process with
gevent, so these tests run in a pytest process of their own (see the
Makefile's `test` target) and never share it with the pure raft tests."""
import os

# gRPC's fork handlers, with gevent's fork, now and then abort a child process
# between fork and exec ("epoll_wait error: Bad file descriptor", SIGABRT) in the
# tests that run consensus.py as a real process; the service itself never forks.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest  # noqa: E402

import consensus  # noqa: E402  (patch first, before anything else imports sockets/threads)

from .fakes import FakeNetwork  # noqa: E402
from .harness import Node, addr  # noqa: E402


@pytest.fixture(autouse=True)
def fast_loops(monkeypatch):
    monkeypatch.setattr(consensus, "SUPERVISE_SECONDS", 0.2)
    monkeypatch.setattr(consensus, "REREGISTER_SECONDS", 0.5)


@pytest.fixture
def cluster(tmp_path):
    made = []
    net = FakeNetwork()

    def make(n, block_interval=0, start=True, **kw):
        validators = [addr(i) for i in range(n)]
        nodes = [Node(tmp_path, i, net, validators, block_interval, **kw) for i in range(n)]
        made.extend(nodes)
        if start:
            for node in nodes:
                node.start()
        return net, nodes

    yield make
    for node in made:
        node.close()
    net.stop()
