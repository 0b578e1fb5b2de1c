"""peer_id must equal the Rust consensus_raft's DefaultHasher ids for every shared vector."""

from pathlib import Path

import pytest

from raft import peer_id
from raft.peer_id import siphash13

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "peer_id.tsv"
if not VECTORS.exists():
    VECTORS = Path("/work/shared/vectors/peer_id.tsv")


def _rows() -> list[tuple[str, int]]:
    rows = []
    for line in VECTORS.read_text().splitlines():
        if not line or line.startswith("#") or line.startswith("address_hex"):
            continue
        addr, pid = line.split("\t")
        rows.append((addr, int(pid)))
    return rows


def test_vector_file_has_rows():
    assert len(_rows()) >= 3


@pytest.mark.parametrize("addr,expected", _rows())
def test_peer_id_matches_rust_default_hasher(addr, expected):
    assert peer_id(bytes.fromhex(addr)) == expected


def test_siphash13_reference_vector_with_keys():
    # SipHash-1-3 of the empty input with the reference key 00..0f (first row of Rust libcore's SipHasher13 test vectors: dc c4 0f 05 58 01 ac ab).
    k0 = int.from_bytes(bytes(range(8)), "little")
    k1 = int.from_bytes(bytes(range(8, 16)), "little")
    assert siphash13(b"", k0, k1) == 0xABAC0158050FC4DC


def test_peer_id_depends_on_every_byte_and_length():
    base = bytes(20)
    ids = {peer_id(base)}
    for i in range(20):
        ids.add(peer_id(base[:i] + b"\x01" + base[i + 1 :]))
    ids.add(peer_id(bytes(19)))
    assert len(ids) == 22
