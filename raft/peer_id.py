"""Raft peer ids derived from validator addresses, exactly as the Rust consensus_raft does.

consensus_raft feeds the raw address bytes to Rust's `std::collections::hash_map::DefaultHasher`
(`Hasher::write`, no length prefix) and calls `finish()`. That hasher is SipHash-1-3 with both
keys zero. A node of this project and a Rust node must derive the same id from one address,
so this module owns that hash and nothing else.
"""

_MASK = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def siphash13(data: bytes, k0: int = 0, k1: int = 0) -> int:
    """SipHash-1-3 (one compression round, three finalization rounds) of `data`."""
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573

    def sipround() -> None:
        nonlocal v0, v1, v2, v3
        v0 = (v0 + v1) & _MASK
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _MASK
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _MASK
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _MASK
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)

    n = len(data)
    full = n - (n % 8)
    for off in range(0, full, 8):
        m = int.from_bytes(data[off : off + 8], "little")
        v3 ^= m
        sipround()
        v0 ^= m
    # The last block carries the tail bytes and the total length in its top byte.
    b = ((n & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v3 ^= b
    sipround()
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        sipround()
    return (v0 ^ v1 ^ v2 ^ v3) & _MASK


def peer_id(address: bytes) -> int:
    """The raft peer id of a validator address (raw bytes, usually 20), as consensus_raft computes it."""
    return siphash13(bytes(address))
