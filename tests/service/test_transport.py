"""The transport's outboxes: a network slower than the heartbeat rate must not
turn a peer's outbox into a queue of stale heartbeats in front of its appends
(under load, the delay grew by seconds per block until followers campaigned)."""
import logging
import types

import gevent
import gevent.event

import consensus
from cita_raft_pb import eraftpb_pb2 as pb


def msg(t, term=3, entries=0, commit=0, index=0, context=b""):
    m = pb.Message(msg_type=t, to=2, term=term, commit=commit, index=index, context=context)
    setattr(m, "from", 1)
    for i in range(entries):
        m.entries.add(index=index + 1 + i, term=term, data=b"block")
    return m


def test_coalesce_keeps_every_append_with_entries_and_the_order():
    batch = [msg(pb.MsgHeartbeat, commit=1), msg(pb.MsgAppend, entries=1, index=5),
             msg(pb.MsgHeartbeat, commit=2), msg(pb.MsgAppend, index=6),
             msg(pb.MsgAppend, entries=2, index=6), msg(pb.MsgAppend, index=8),
             msg(pb.MsgRequestVote), msg(pb.MsgHeartbeat, commit=3)]
    kept = consensus.coalesce_outbox(batch)
    assert [(m.msg_type, len(m.entries), m.commit, m.index) for m in kept] == [
        (pb.MsgAppend, 1, 0, 5), (pb.MsgAppend, 2, 0, 6), (pb.MsgAppend, 0, 0, 8),
        (pb.MsgRequestVote, 0, 0, 0), (pb.MsgHeartbeat, 0, 3, 0)]


def test_coalesce_keeps_messages_of_different_terms_and_read_index_contexts():
    batch = [msg(pb.MsgHeartbeat, term=3), msg(pb.MsgHeartbeat, term=4),
             msg(pb.MsgHeartbeatResponse, term=3), msg(pb.MsgHeartbeatResponse, term=3),
             msg(pb.MsgHeartbeat, term=4, context=b"read-1"), msg(pb.MsgHeartbeat, term=4, context=b"read-2"),
             msg(pb.MsgAppendResponse, index=4), msg(pb.MsgAppendResponse, index=5)]
    kept = consensus.coalesce_outbox(batch)
    assert kept == [batch[0], batch[1], batch[3], batch[4], batch[5], batch[6], batch[7]]


def test_coalesce_of_a_batch_without_superseded_messages_is_the_batch():
    batch = [msg(pb.MsgAppend, entries=1, index=i) for i in range(5)] + [msg(pb.MsgHeartbeat)]
    assert consensus.coalesce_outbox(batch) == batch


class StalledNetwork:
    """A network whose first SendMsg hangs until released; records what it sent."""

    def __init__(self):
        self.release = gevent.event.Event()
        self.sent = []

    def send(self, origin, msg_type, payload):
        self.sent.append(pb.Message.FromString(payload))
        if len(self.sent) == 1:
            self.release.wait(10)
        return 0


def test_a_stalled_network_does_not_put_stale_heartbeats_in_front_of_an_append():
    net = StalledNetwork()
    posted = []
    svc = types.SimpleNamespace(
        log=logging.getLogger("test-transport"), metrics=consensus.Metrics([0.1, 1.0]), network=net,
        peer=types.SimpleNamespace(post=posted.append), spawn=gevent.spawn)
    transport = consensus.Transport(svc)
    transport.mailbook[2] = 77
    transport.open_outbox(msg(pb.MsgHeartbeat, commit=1))
    deadline = gevent.Timeout(10)
    with deadline:
        while not net.sent:
            gevent.sleep(0.01)
    # While the network hangs, the leader goes on: 200 heartbeats, one block, 50 heartbeats.
    transport.send_raft([msg(pb.MsgHeartbeat, commit=1) for _ in range(200)])
    transport.send_raft([msg(pb.MsgAppend, entries=1, index=9, commit=1)])
    transport.send_raft([msg(pb.MsgHeartbeat, commit=2) for _ in range(50)])
    net.release.set()
    with gevent.Timeout(10):
        while not any(m.entries for m in net.sent) or len(net.sent) < 3 or not transport.outboxes[2].empty():
            gevent.sleep(0.01)
    kinds = [(m.msg_type, len(m.entries), m.commit) for m in net.sent]
    assert kinds == [(pb.MsgHeartbeat, 0, 1), (pb.MsgAppend, 1, 1), (pb.MsgHeartbeat, 0, 2)], kinds[:10]
    assert svc.metrics.messages.labels("out", "superseded")._value.get() == 249
    assert posted == []
