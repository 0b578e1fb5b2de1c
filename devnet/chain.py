"""The simulated chain: block encoding, the controller's block rules, the chain file.

Blocks are what the real controller hands to consensus (cita-cloud.md §1.2):
`Proposal.data` is a protobuf `common.ProposalInner{pre_state_root,
CompactBlock{header{prevhash, timestamp, height, transactions_root,
proposer}, body{tx_hashes}}}`. A block's hash is sha256 of its encoded
header, so blocks are hash-linked through `prevhash`. Validator changes ride
in blocks as "system transactions" (a tx whose bytes start with
SYSTEM_TX_PREFIX), so every node, including one that syncs the block later,
derives the same validator set from the chain itself: a change carried by
block h takes effect from h+1 (§1.4).

The chain file is JSON lines, one committed block per line, appended and
fsynced before CommitBlock answers; a torn last line (crash mid-write) is cut
off on load. This module holds pure rules and file I/O only, no gRPC.

The height rules of CommitBlock and CheckProposal and the configuration every
reply carries are the same for the in-process fake controller of the service
tests (tests/service/fakes.py): both use `commit_route`,
`proposal_height_code` and `consensus_config` from here. What differs stays
with each: the block format (hash-linked ProposalInner here, a short text
block there), where blocks live, how validator changes arrive (system txs
here, a height schedule there), faults and block sync.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from cita_raft_pb import blockchain_pb2, common_pb2

U64_MAX = 2**64 - 1

# Status codes (cita-cloud.md §1.1).
SUCCESS = 0
NONE_PROPOSAL, NONE_BLOCK_BODY, NONE_BLOCK_HEADER = 112, 113, 114
DECODE_ERROR = 123
NO_CANDIDATE = 124
NO_FORK_TREE = 126
PROPOSAL_TOO_HIGH = 128
PROPOSAL_TOO_LOW = 129
PROPOSAL_CHECK_ERROR = 130
BLOCK_CHECK_ERROR = 132
NODE_IN_SYNC_MODE = 139
CODE_NAMES = {0: "Success", 112: "NoneProposal", 113: "NoneBlockBody", 114: "NoneBlockHeader",
              123: "DecodeError", 124: "NoCandidate", 126: "NoForkTree", 128: "ProposalTooHigh",
              129: "ProposalTooLow", 130: "ProposalCheckError", 132: "BlockCheckError",
              139: "NodeInSyncMode", 200: "ConsensusServerNotReady"}

SYSTEM_TX_PREFIX = b"devnet/validators:"

# What CommitBlock of a height is, at a chain height (commit_route).
PING, STORED, GAP, NEXT = "ping", "stored", "gap", "next"


def commit_route(height: int, current: int) -> str:
    """CommitBlock of `height` at chain height `current` (§1.2): PING (height 2^64-1: answer
    the current configuration, commit nothing), STORED (at or below current: idempotent
    SUCCESS), GAP (above current+1: PROPOSAL_TOO_HIGH, and the controller syncs) or NEXT
    (current+1: check the block, then append it)."""
    if height == U64_MAX:
        return PING
    if height <= current:
        return STORED
    if height > current + 1:
        return GAP
    return NEXT


def proposal_height_code(height: int, current: int) -> tuple[int, str]:
    """CheckProposal's height check at chain height `current`: (code, why)."""
    if height <= current:
        return PROPOSAL_TOO_LOW, f"height {height} <= current {current}"
    if height > current + 1:
        return PROPOSAL_TOO_HIGH, f"height {height} > current+1 {current + 1}"
    return SUCCESS, "ok"


def consensus_config(height: int, block_interval: int,
                     validators: list[bytes]) -> common_pb2.ConsensusConfiguration:
    """The configuration every CommitBlock reply (and Reconfigure) carries: the validators
    in effect after `height`."""
    return common_pb2.ConsensusConfiguration(height=height, block_interval=block_interval,
                                             validators=validators)


def config_reply(code: int, config: common_pb2.ConsensusConfiguration) -> common_pb2.ConsensusConfigurationResponse:
    return common_pb2.ConsensusConfigurationResponse(status=common_pb2.StatusCode(code=code), config=config)


def now_ms() -> int:
    return int(time.time() * 1000)


def header_hash(header: blockchain_pb2.BlockHeader) -> bytes:
    return hashlib.sha256(header.SerializeToString(deterministic=True)).digest()


def state_root(block_hash: bytes) -> bytes:
    """The fake executor state root after a block: derived from its hash."""
    return hashlib.sha256(b"state-root" + block_hash).digest()


def tx_root(tx_hashes: list[bytes]) -> bytes:
    return hashlib.sha256(b"".join(tx_hashes)).digest()


def system_tx(change_id: int, validators: list[str]) -> bytes:
    return SYSTEM_TX_PREFIX + json.dumps({"id": change_id, "validators": validators}).encode()


def parse_system_tx(tx: bytes) -> dict | None:
    """The validator change in a system tx, or None for an ordinary tx. Raises ValueError if malformed."""
    if not tx.startswith(SYSTEM_TX_PREFIX):
        return None
    body = json.loads(tx[len(SYSTEM_TX_PREFIX):])
    vals = body["validators"]
    if not vals or not all(isinstance(v, str) and len(bytes.fromhex(v)) == 20 for v in vals):
        raise ValueError("validators must be a non-empty list of 20-byte hex addresses")
    return {"id": int(body["id"]), "validators": [v.lower() for v in vals]}


@dataclasses.dataclass
class Block:
    """One committed block as the chain file keeps it."""

    height: int
    hash: bytes
    prevhash: bytes
    timestamp: int
    proposer: bytes
    data: bytes                 # the ProposalInner bytes consensus agreed on
    proof: bytes = b""
    validators: list[str] = dataclasses.field(default_factory=list)   # in effect from height+1
    block_interval: int = 3
    changes: list[int] = dataclasses.field(default_factory=list)      # system-tx ids applied

    def to_json(self) -> str:
        return json.dumps({"h": self.height, "hash": self.hash.hex(), "prev": self.prevhash.hex(),
                           "ts": self.timestamp, "proposer": self.proposer.hex(), "data": self.data.hex(),
                           "proof": self.proof.hex(), "vals": self.validators, "bi": self.block_interval,
                           "changes": self.changes})

    @classmethod
    def from_json(cls, line: str) -> Block:
        r = json.loads(line)
        return cls(height=r["h"], hash=bytes.fromhex(r["hash"]), prevhash=bytes.fromhex(r["prev"]),
                   timestamp=r["ts"], proposer=bytes.fromhex(r["proposer"]), data=bytes.fromhex(r["data"]),
                   proof=bytes.fromhex(r["proof"]), validators=r["vals"], block_interval=r["bi"],
                   changes=r.get("changes", []))


class DecodeFailed(Exception):
    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


def decode_proposal(data: bytes) -> common_pb2.ProposalInner:
    """Decode Proposal.data, raising DecodeFailed with the controller's code (§1.3 step 1)."""
    inner = common_pb2.ProposalInner()
    try:
        inner.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError, sometimes others on garbage
        raise DecodeFailed(DECODE_ERROR, f"not a ProposalInner: {e}") from None
    if not inner.HasField("proposal"):
        raise DecodeFailed(NONE_PROPOSAL, "no compact block")
    if not inner.proposal.HasField("header"):
        raise DecodeFailed(NONE_BLOCK_HEADER, "no header")
    if not inner.proposal.HasField("body"):
        raise DecodeFailed(NONE_BLOCK_BODY, "no body")
    return inner


def build_proposal(height: int, prev: Block | None, genesis_hash: bytes, proposer: bytes,
                   tx_hashes: list[bytes], prev_timestamp: int) -> bytes:
    prevhash = prev.hash if prev else genesis_hash
    header = blockchain_pb2.BlockHeader(prevhash=prevhash, timestamp=max(now_ms(), prev_timestamp),
                                        height=height, transactions_root=tx_root(tx_hashes), proposer=proposer)
    block = blockchain_pb2.CompactBlock(version=0, header=header,
                                        body=blockchain_pb2.CompactBlockBody(tx_hashes=tx_hashes))
    return common_pb2.ProposalInner(pre_state_root=state_root(prevhash), proposal=block).SerializeToString()


class Chain:
    """A node's committed blocks: in memory plus the fsynced chain file."""

    def __init__(self, path: str, genesis_hash: bytes, validators: list[str], block_interval: int):
        self.path = path
        self.genesis_hash = genesis_hash
        self.genesis_validators = list(validators)
        self.genesis_interval = block_interval
        self.blocks: list[Block] = []          # blocks[k].height == k + 1
        self.truncated_bytes = 0
        self._load()
        self._file = open(self.path, "a")

    def _load(self) -> None:
        if not os.path.exists(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            return
        good = 0
        with open(self.path, "rb") as f:
            raw = f.read()
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                b = Block.from_json(line.decode())
            except (ValueError, KeyError):
                break
            if b.height != len(self.blocks) + 1 or b.prevhash != self.tip_hash:
                break
            self.blocks.append(b)
            good += len(line)
        if good < len(raw):
            # A torn tail from a crash mid-append: the block was never acknowledged.
            self.truncated_bytes = len(raw) - good
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())

    # ---- read side -------------------------------------------------------------
    @property
    def height(self) -> int:
        return len(self.blocks)

    @property
    def tip_hash(self) -> bytes:
        return self.blocks[-1].hash if self.blocks else self.genesis_hash

    @property
    def tip_timestamp(self) -> int:
        return self.blocks[-1].timestamp if self.blocks else 0

    @property
    def validators(self) -> list[str]:
        return self.blocks[-1].validators if self.blocks else list(self.genesis_validators)

    @property
    def block_interval(self) -> int:
        return self.blocks[-1].block_interval if self.blocks else self.genesis_interval

    def block(self, height: int) -> Block | None:
        return self.blocks[height - 1] if 1 <= height <= len(self.blocks) else None

    def applied_changes(self) -> set[int]:
        return {c for b in self.blocks for c in b.changes}

    # ---- rules -----------------------------------------------------------------
    def check_proposal(self, height: int, data: bytes, now: int | None = None) -> tuple[int, str]:
        """CheckProposal's checks after the own-proposal shortcut (§1.3 steps 1, 2, 4-9)."""
        try:
            inner = decode_proposal(data)
        except DecodeFailed as e:
            return e.code, str(e)
        header = inner.proposal.header
        if header.height != height:
            return PROPOSAL_CHECK_ERROR, f"header height {header.height} != proposal height {height}"
        code, why = proposal_height_code(height, self.height)
        if code != SUCCESS:
            return code, why
        if inner.pre_state_root != state_root(self.tip_hash) or header.prevhash != self.tip_hash:
            return PROPOSAL_CHECK_ERROR, f"parent mismatch at height {height}"
        if header.proposer.hex() not in self.validators:
            return PROPOSAL_CHECK_ERROR, f"proposer {header.proposer.hex()} is not a validator"
        now = now_ms() if now is None else now
        if not self.tip_timestamp <= header.timestamp <= now + self.block_interval * 1000:
            return PROPOSAL_CHECK_ERROR, f"timestamp {header.timestamp} outside [{self.tip_timestamp}, now]"
        txs = list(inner.proposal.body.tx_hashes)
        try:
            for tx in txs:
                parse_system_tx(tx)
        except (ValueError, KeyError) as e:
            return PROPOSAL_CHECK_ERROR, f"bad system tx: {e}"
        if header.transactions_root != tx_root(txs):
            return PROPOSAL_CHECK_ERROR, "transactions root mismatch"
        return SUCCESS, "ok"

    def make_block(self, height: int, data: bytes, proof: bytes = b"") -> tuple[int, Block | None, str]:
        """Execute a block for height current+1: (code, block, why). Does not append."""
        try:
            inner = decode_proposal(data)
        except DecodeFailed as e:
            return (NO_FORK_TREE if e.code == NONE_PROPOSAL else e.code), None, str(e)
        header = inner.proposal.header
        if header.prevhash != self.tip_hash:
            return PROPOSAL_CHECK_ERROR, None, f"prevhash mismatch at height {height}"
        validators, changes = list(self.validators), []
        for tx in inner.proposal.body.tx_hashes:
            try:
                change = parse_system_tx(tx)
            except (ValueError, KeyError) as e:
                return PROPOSAL_CHECK_ERROR, None, f"bad system tx: {e}"
            if change is not None:
                validators = change["validators"]
                changes.append(change["id"])
        block = Block(height=height, hash=header_hash(header), prevhash=header.prevhash,
                      timestamp=header.timestamp, proposer=header.proposer, data=data, proof=proof,
                      validators=validators, block_interval=self.block_interval, changes=changes)
        return SUCCESS, block, "ok"

    def append(self, block: Block) -> None:
        assert block.height == self.height + 1 and block.prevhash == self.tip_hash, "chain must stay linked"
        self._file.write(block.to_json() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.blocks.append(block)

    def close(self) -> None:
        self._file.close()


def read_chain(path: str) -> list[Block]:
    """Blocks of a chain file, read-only (for `devnet chains`); stops at a torn or unlinked line."""
    out: list[Block] = []
    try:
        with open(path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    out.append(Block.from_json(line))
                except (ValueError, KeyError):
                    break
    except FileNotFoundError:
        pass
    return out


def compare_chains(chains: dict[int, list[Block]]) -> list[str]:
    """Every height committed differently on two nodes, as readable lines (empty: they agree)."""
    problems: list[str] = []
    by_height: dict[int, dict[bytes, list[int]]] = {}
    for node, blocks in chains.items():
        for k, b in enumerate(blocks):
            if b.height != k + 1:
                problems.append(f"node{node}: block at position {k} has height {b.height}")
                break
            by_height.setdefault(b.height, {}).setdefault(b.hash, []).append(node)
    for h in sorted(by_height):
        if len(by_height[h]) > 1:
            alts = "; ".join(f"{hsh.hex()[:12]} on nodes {nodes}" for hsh, nodes in by_height[h].items())
            problems.append(f"height {h} committed differently: {alts}")
    return problems
