"""Safety checkers of the simulation: the Raft invariants, checked as events happen.

The checker keeps a global oracle of the committed sequence (every entry any
node handed out as committed, with the state-machine digest after it) and
raises `InvariantViolation` the moment a node contradicts it. Checked
(Raft paper §5.2-§5.4, thesis §3.6.3, Figure 3.2):

* election safety: at most one leader per term;
* vote safety: a node grants at most one vote per term, across restarts;
* log matching: an (index, term) pair names one entry and one predecessor term;
* leader completeness: a new leader of term T holds every entry committed in a
  term below T;
* state-machine safety: committed/applied entries form one sequence, each node
  applies it in order, once, and ends in the same digest (snapshots included);
* persist-before-send: a granted vote or an append ack leaves a node only once
  the state it vouches for is durable.

It never drives the cluster; runner.py does.
"""

from __future__ import annotations

import hashlib
import struct

from cita_raft_pb import eraftpb_pb2 as pb

BOOT_INDEX = 5
BOOT_TERM = 5
BOOT_DIGEST = b"boot\x00\x00\x00\x00"


class InvariantViolation(AssertionError):
    """A Raft safety property was broken."""


def entry_key(e: pb.Entry) -> bytes:
    return hashlib.blake2b(bytes([e.entry_type]) + e.data, digest_size=8).digest()


def chain_digest(prev: bytes, e: pb.Entry) -> bytes:
    """State-machine digest after applying `e` on top of `prev`."""
    h = hashlib.blake2b(prev, digest_size=8)
    h.update(struct.pack(">QQB", e.index, e.term, e.entry_type))
    h.update(e.data)
    return h.digest()


def encode_snapshot_data(index: int, digest: bytes) -> bytes:
    return struct.pack(">Q", index) + digest


def decode_snapshot_data(data: bytes) -> tuple[int, bytes]:
    if len(data) != 16:
        raise InvariantViolation(f"snapshot data of {len(data)} bytes is not an (index, digest) record")
    (index,) = struct.unpack(">Q", data[:8])
    return index, data[8:]


def conf_key(cs: pb.ConfState) -> tuple:
    return (
        tuple(sorted(cs.voters)),
        tuple(sorted(cs.learners)),
        tuple(sorted(cs.voters_outgoing)),
        tuple(sorted(cs.learners_next)),
        bool(cs.auto_leave),
    )


class Checker:
    """Global knowledge of the run, and the invariants over it."""

    def __init__(self) -> None:
        self.leaders: dict[int, int] = {}  # term -> leader id
        self.votes: dict[tuple[int, int], int] = {}  # (node, term) -> candidate
        self.log_pairs: dict[tuple[int, int], tuple[bytes, int]] = {}  # (index, term) -> (entry key, prev term)
        # oracle of the committed sequence, index BOOT_INDEX+1 at position 0
        self.terms: list[int] = []
        self.keys: list[bytes] = []
        self.digests: list[bytes] = []
        self.commit_seen_term: list[int] = []
        self.conf_at: dict[int, tuple] = {}  # index of a conf-change entry -> conf_key after applying it
        self.latest_conf: tuple[int, pb.ConfState] | None = None
        self.committed_data: dict[bytes, int] = {}  # payload of a committed normal entry -> index
        self.completeness_checked: set[tuple[int, int]] = set()
        self.checks = 0

    # ---- oracle ------------------------------------------------------------------

    @property
    def last_committed(self) -> int:
        return BOOT_INDEX + len(self.terms)

    def digest_at(self, index: int) -> bytes:
        if index == BOOT_INDEX:
            return BOOT_DIGEST
        if not BOOT_INDEX < index <= self.last_committed:
            raise InvariantViolation(f"no committed entry known at index {index} (oracle ends at {self.last_committed})")
        return self.digests[index - BOOT_INDEX - 1]

    def term_at(self, index: int) -> int:
        if index == BOOT_INDEX:
            return BOOT_TERM
        return self.terms[index - BOOT_INDEX - 1]

    def on_committed(self, node: int, e: pb.Entry, node_term: int) -> None:
        """Node `node` (at term `node_term`) hands out `e` as committed."""
        self.checks += 1
        pos = e.index - BOOT_INDEX - 1
        if pos < 0:
            raise InvariantViolation(f"node {node} handed out entry index={e.index} at or below the bootstrap snapshot")
        if pos < len(self.terms):
            if self.terms[pos] != e.term or self.keys[pos] != entry_key(e):
                raise InvariantViolation(
                    f"state-machine safety: node {node} committed index={e.index} term={e.term} "
                    f"but index={e.index} was committed before with term={self.terms[pos]} (different entry)"
                )
            if node_term < self.commit_seen_term[pos]:
                self.commit_seen_term[pos] = node_term
            return
        if pos > len(self.terms):
            raise InvariantViolation(
                f"node {node} handed out committed index={e.index} but the committed sequence ends at "
                f"{self.last_committed}: a gap nobody committed"
            )
        self.terms.append(e.term)
        self.keys.append(entry_key(e))
        self.digests.append(chain_digest(self.digest_at(e.index - 1), e))
        self.commit_seen_term.append(node_term)
        if e.entry_type == pb.EntryNormal and e.data:
            self.committed_data[e.data] = e.index

    def on_applied(self, node: int, index: int, digest: bytes) -> None:
        self.checks += 1
        want = self.digest_at(index)
        if digest != want:
            raise InvariantViolation(
                f"state-machine safety: node {node} state digest after index={index} differs from the committed sequence"
            )

    def on_conf_applied(self, node: int, index: int, cs: pb.ConfState) -> None:
        key = conf_key(cs)
        known = self.conf_at.get(index)
        if known is None:
            self.conf_at[index] = key
            if self.latest_conf is None or index > self.latest_conf[0]:
                c = pb.ConfState()
                c.CopyFrom(cs)
                self.latest_conf = (index, c)
        elif known != key:
            raise InvariantViolation(
                f"node {node} applied the conf change at index={index} and got {key}, another node got {known}"
            )

    def on_snapshot_restored(self, node: int, snap: pb.Snapshot) -> None:
        meta = snap.metadata
        index, digest = decode_snapshot_data(snap.data)
        if index != meta.index:
            raise InvariantViolation(f"node {node} got a snapshot with metadata index={meta.index} but data for {index}")
        if meta.index > self.last_committed:
            raise InvariantViolation(
                f"node {node} restored snapshot index={meta.index} beyond anything committed ({self.last_committed})"
            )
        if self.digest_at(meta.index) != digest or self.term_at(meta.index) != meta.term:
            raise InvariantViolation(
                f"node {node} restored snapshot index={meta.index} term={meta.term} that differs from the committed sequence"
            )

    # ---- elections -----------------------------------------------------------------

    def on_leader(self, node: int, term: int) -> None:
        self.checks += 1
        other = self.leaders.setdefault(term, node)
        if other != node:
            raise InvariantViolation(f"election safety: nodes {other} and {node} are both leader in term={term}")

    def on_vote(self, node: int, term: int, candidate: int, how: str) -> None:
        self.checks += 1
        if candidate == 0:
            return
        other = self.votes.setdefault((node, term), candidate)
        if other != candidate:
            raise InvariantViolation(
                f"double vote: node {node} voted for {other} and then for {candidate} in term={term} ({how})"
            )

    # ---- logs ----------------------------------------------------------------------

    def on_log_entry(self, node: int, e: pb.Entry, prev_term: int) -> None:
        self.checks += 1
        key = (e.index, e.term)
        val = (entry_key(e), prev_term)
        old = self.log_pairs.setdefault(key, val)
        if old != val:
            what = "a different entry" if old[0] != val[0] else f"predecessor term {old[1]} vs {prev_term}"
            raise InvariantViolation(
                f"log matching: node {node} has index={e.index} term={e.term} with {what} than another log"
            )

    def check_leader_completeness(self, node: int, term: int, term_of) -> None:
        """`term_of(i)` gives the leader's log term at i, or None if compacted (covered by its snapshot)."""
        if (node, term) in self.completeness_checked:
            return
        self.completeness_checked.add((node, term))
        for pos, seen in enumerate(self.commit_seen_term):
            if seen >= term:
                continue
            index = BOOT_INDEX + 1 + pos
            got = term_of(index)
            if got is not None and got != self.terms[pos]:
                raise InvariantViolation(
                    f"leader completeness: leader {node} of term={term} has term={got} at index={index}, "
                    f"but term={self.terms[pos]} was committed there in an earlier term"
                )

    # ---- durability ----------------------------------------------------------------

    def on_send(self, node: int, m: pb.Message, durable_hs: pb.HardState, durable_last: int) -> None:
        """A message leaves `node`; what it vouches for must already be durable."""
        if m.msg_type == pb.MsgRequestVoteResponse and not m.reject:
            # A durable higher term also makes a second vote in m.term impossible.
            if durable_hs.term < m.term or (durable_hs.term == m.term and durable_hs.vote != m.to):
                raise InvariantViolation(
                    f"vote sent before persisted: node {node} grants term={m.term} to {m.to} while its durable "
                    f"hard state is term={durable_hs.term} vote={durable_hs.vote}"
                )
            self.on_vote(node, m.term, m.to, "granted")
        elif m.msg_type == pb.MsgRequestVote:
            # The candidate's own vote counts toward its quorum: it must be durable
            # before anyone is asked, or a restart could vote for someone else in m.term.
            if durable_hs.term < m.term or (durable_hs.term == m.term and durable_hs.vote != node):
                raise InvariantViolation(
                    f"vote request before self-vote persisted: node {node} asks {m.to} for term={m.term} while "
                    f"its durable hard state is term={durable_hs.term} vote={durable_hs.vote}"
                )
        elif m.msg_type == pb.MsgAppendResponse and not m.reject:
            if m.index > durable_last:
                raise InvariantViolation(
                    f"append ack before persisted: node {node} acks index={m.index} to {m.to} "
                    f"while its durable log ends at {durable_last}"
                )
            if durable_hs.term < m.term:
                raise InvariantViolation(
                    f"append ack before term persisted: node {node} acks at term={m.term} with durable term={durable_hs.term}"
                )
