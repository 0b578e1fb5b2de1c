"""Progress states, the in-flight window and back-off."""

import pytest

from raft.errors import RaftInvariantError
from raft.progress import Inflights, Progress, ProgressState


def test_inflights_window():
    ins = Inflights(3)
    ins.add(5)
    ins.add(7)
    ins.add(9)
    assert ins.full()
    with pytest.raises(RaftInvariantError):
        ins.add(10)
    ins.free_to(7)
    assert len(ins) == 1 and not ins.full()
    ins.free_first_one()
    assert len(ins) == 0


def test_probe_pauses_after_one_append_and_resumes_on_update():
    pr = Progress(5, 4)
    assert not pr.is_paused()
    pr.update_state(7)
    assert pr.is_paused()
    assert pr.maybe_update(7)
    assert not pr.is_paused() and pr.next_idx == 8


def test_replicate_optimistic_and_window():
    pr = Progress(1, 2)
    pr.maybe_update(3)
    pr.become_replicate()
    assert pr.next_idx == 4
    pr.update_state(5)
    pr.update_state(8)
    assert pr.next_idx == 9 and pr.is_paused()
    pr.maybe_update(5)
    pr.ins.free_to(5)
    assert not pr.is_paused()


def test_stale_rejection_is_ignored_in_replicate():
    pr = Progress(1, 8)
    pr.maybe_update(10)
    pr.become_replicate()
    assert not pr.maybe_decr_to(9, 9, 0)
    assert pr.maybe_decr_to(12, 11, 0)
    assert pr.next_idx == 11


def test_probe_back_off_uses_hint_but_not_below_match():
    pr = Progress(11, 8)
    pr.matched = 3
    # Probe at 10 rejected, follower hints its log matches up to 6.
    assert pr.maybe_decr_to(10, 6, 0)
    assert pr.next_idx == 7
    # A rejection of some other index than next-1 is stale.
    assert not pr.maybe_decr_to(10, 2, 0)
    assert pr.maybe_decr_to(6, 0, 0)
    assert pr.next_idx == 4  # never below match + 1


def test_snapshot_state():
    pr = Progress(1, 8)
    pr.become_snapshot(20)
    assert pr.is_paused() and pr.state == ProgressState.Snapshot
    pr.maybe_update(20)
    assert pr.is_snapshot_caught_up()
    pr.become_probe()
    assert pr.next_idx == 21
