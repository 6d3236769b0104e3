"""The kernel's hash functions that IPVS schedulers use (core layer, pure functions).

- `hsiphash_u32` is Linux's `hsiphash(&v, 4, key)` on a 64-bit kernel, where HalfSipHash-1-3 is
  really SipHash-1-3 with 64-bit words (lib/siphash.c: "on 64-bit, we make HalfSipHash1-3 actually
  be SipHash1-3"), truncated to 32 bits. ip_vs_mh.c hashes a host-order u32 with it, so the four
  message bytes are that integer in little-endian order (x86).
- `siphash` is the general SipHash-c-d it is built from (SipHash-2-4 reproduces the reference
  vectors of Aumasson and Bernstein, which the tests check).
- `hash_32` is include/linux/hash.h's multiplicative hash with GOLDEN_RATIO_32.
- `golden_multiply_low_bits` is the older `(x * 2654435761UL) & mask` of ip_vs_sh.c / ip_vs_dh.c.
"""

from __future__ import annotations

__all__ = ["GOLDEN_RATIO_32", "KNUTH_GOLDEN", "golden_multiply_low_bits", "hash_32", "hsiphash_u32", "siphash"]

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
GOLDEN_RATIO_32 = 0x61C88647   # include/linux/hash.h
KNUTH_GOLDEN = 2654435761      # the constant ip_vs_sh.c / ip_vs_dh.c / ip_vs_mh.c use


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK64


def _sipround(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _MASK64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _MASK64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _MASK64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _MASK64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash(data: bytes, k0: int, k1: int, c_rounds: int = 2, d_rounds: int = 4) -> int:
    """SipHash-c-d of `data` with the 128-bit key (k0, k1) as two 64-bit words; a 64-bit result."""
    v0 = 0x736F6D6570736575 ^ k0
    v1 = 0x646F72616E646F6D ^ k1
    v2 = 0x6C7967656E657261 ^ k0
    v3 = 0x7465646279746573 ^ k1
    full = len(data) - len(data) % 8
    for i in range(0, full, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        for _ in range(c_rounds):
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
    b = ((len(data) & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v3 ^= b
    for _ in range(c_rounds):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(d_rounds):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def hsiphash_u32(value: int, key: tuple[int, int]) -> int:
    """`hsiphash(&value, sizeof(u32), key)` as a 64-bit little-endian kernel computes it."""
    return siphash((value & _MASK32).to_bytes(4, "little"), key[0], key[1], 1, 3) & _MASK32


def hash_32(value: int, bits: int) -> int:
    """hash_32(): the top `bits` bits of value * GOLDEN_RATIO_32 (mod 2^32)."""
    return ((value * GOLDEN_RATIO_32) & _MASK32) >> (32 - bits)


def golden_multiply_low_bits(value: int, mask: int) -> int:
    """`(value * 2654435761UL) & mask`: only the low bits survive, so C's wrap-around is moot."""
    return (value * KNUTH_GOLDEN) & mask
