"""Regressions found by the randomized simulation (tests/sim), each shrunk to a
few RawNode calls. The docstring names the seed that found it."""

from __future__ import annotations

from cita_raft_pb import eraftpb_pb2 as pb
from raft import Config, MemoryStorage, RawNode
from tests.raft_harness import bootstrapped_storage, msg


def _bootstrapped_follower(node_id: int, voters: list[int]) -> tuple[RawNode, MemoryStorage]:
    st = bootstrapped_storage(voters)
    return RawNode(Config(id=node_id, applied=5), st), st


def _persist(raw: RawNode, st: MemoryStorage) -> list[pb.Entry]:
    rd = raw.ready()
    if rd.snapshot is not None and rd.snapshot.metadata.index:
        st.apply_snapshot(rd.snapshot)
    st.append(list(rd.entries))
    if rd.hard_state is not None:
        st.set_hardstate(rd.hard_state)
    handed = list(rd.committed_entries)
    raw.advance(rd)
    return handed


def test_snapshot_does_not_switch_the_config_under_unapplied_conf_changes():
    """Seed 201779 (make soak): a follower had a committed conf change handed to its
    applier but not yet applied when a newer snapshot arrived. The core restored the
    snapshot's config at once, so the late apply_conf_change of that entry was computed
    on top of the *new* config and the node ended in a joint config whose outgoing half
    differed from everyone else's (voters_outgoing [1,2,4] instead of [1,2,3])."""
    raw, st = _bootstrapped_follower(2, [1, 2, 3])
    cc = pb.ConfChangeV2(changes=[pb.ConfChangeSingle(change_type=pb.AddNode, node_id=4),
                                  pb.ConfChangeSingle(change_type=pb.RemoveNode, node_id=3)])
    entry = pb.Entry(entry_type=pb.EntryConfChangeV2, term=6, index=6, data=cc.SerializeToString())
    raw.step(msg(pb.MsgAppend, 1, 2, 6, index=5, log_term=5, commit=6, entries=[entry]))
    handed = _persist(raw, st)
    if not handed:  # committed entries are handed out once persisted: the next Ready
        handed = _persist(raw, st)
    assert [e.index for e in handed] == [6]

    # The leader meanwhile left the joint config and compacted: snapshot at 8 with voters [1, 2, 4].
    snap = pb.Snapshot()
    snap.metadata.index = 8
    snap.metadata.term = 6
    snap.metadata.conf_state.voters.extend([1, 2, 4])
    raw.step(msg(pb.MsgSnapshot, 1, 2, 6, snapshot=snap))

    # The applier now applies entry 6: the result must be the joint config every node computes.
    cs = raw.apply_conf_change(cc)
    raw.advance_apply_to(6)
    assert sorted(cs.voters) == [1, 2, 4]
    assert sorted(cs.voters_outgoing) == [1, 2, 3], f"conf change applied on the wrong config: {cs}"


def test_no_append_ack_for_an_entry_truncated_before_it_was_persisted():
    """Seed 200173 (make soak): a follower acked index 7 to the term-7 leader, but the
    Ready carrying that ack was not taken yet when a term-8 leader's append truncated
    the (unpersisted) entry 7. The old ack then left with the next Ready, whose log
    ended at 6: the term-7 leader could count an entry this node does not hold."""
    raw, st = _bootstrapped_follower(3, [1, 2, 3])
    e6, e7 = pb.Entry(term=6, index=6, data=b"a"), pb.Entry(term=6, index=7, data=b"b")
    raw.step(msg(pb.MsgAppend, 1, 3, 6, index=5, log_term=5, commit=5, entries=[e6, e7]))
    _persist(raw, st)
    # Term 7 leader 2 overwrites index 7; the ack waits for the next Ready (slow disk).
    raw.step(msg(pb.MsgAppend, 2, 3, 7, index=6, log_term=6, commit=5,
                  entries=[pb.Entry(term=7, index=7, data=b"c")]))
    # Term 8 leader 1 overwrites from index 6 before that Ready is taken.
    raw.step(msg(pb.MsgAppend, 1, 3, 8, index=5, log_term=5, commit=5,
                  entries=[pb.Entry(term=8, index=6, data=b"d")]))
    rd = raw.ready()
    last = rd.entries[-1].index if rd.entries else st.last_index()
    acks = [(m.to, m.term, m.index) for m in rd.persisted_messages + rd.messages
            if m.msg_type == pb.MsgAppendResponse and not m.reject]
    assert all(index <= last for _, _, index in acks), f"acks {acks} beyond the persisted log end {last}"
