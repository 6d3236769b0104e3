"""Maglev consistent hashing as Cilium computes it, and the tuple hash its datapath indexes with.

Layer: core, sans-IO. Follows cilium/cilium pkg/maglev/maglev.go (the table), pkg/murmur3 (the
permutation hash: MurmurHash3 x64 128, seed in both halves), bpf/lib/hash.h and bpf/lib/jhash.h
(the per-packet index), and the Maglev paper (Eisenbud et al., NSDI 2016) that both follow.

Rules this module keeps
- Table size M is one of Cilium's primes (`SUPPORTED_TABLE_SIZES`), 16381 by default.
- The seed is Cilium's 12-byte base64 `--bpf-lb-maglev-hash-seed`: bytes 0-3 (big-endian) seed
  murmur3, bytes 4-7 seed the datapath's jhash (`hash_init4_seed`, SeedJhash0).
- Backends are identified by their hash string ("[10.0.0.1:80/TCP,State:active]", BackendInfo
  .setHashString), sorted by it, so every node builds the same table although backend ids are
  node-local. offset = h1 % M, skip = h2 % (M-1) + 1, permutation[j] = (offset + j*skip) % M.
- Population: M turns, turn n goes to backend n % N, which takes its next preferred free slot.
  With weights (only when weightSum / N > 1, integer division, as in Go), a backend whose
  (n+1)*weight is below its counter passes the turn on; its counter starts at weight/N and grows
  by weightSum each time it takes a slot (Envoy's scheme, envoyproxy/envoy#2982). Equal weights
  never pass a turn, so they give the unweighted table.
- The per-packet index is jhash_3words(saddr, dport << 16 | sport, proto, seed) % M with the
  words read as the little-endian host does from network-order fields; with session affinity the
  source port is 0, so a client maps to one backend.
"""

from __future__ import annotations

import base64
from array import array
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["DEFAULT_HASH_SEED", "DEFAULT_TABLE_SIZE", "DEFAULT_WEIGHT", "MaglevBackend", "MaglevSeed",
           "SUPPORTED_TABLE_SIZES", "backend_hash_string", "jhash_3words", "lookup_table", "murmur3_128",
           "parse_seed", "permutation", "tuple_hash"]

DEFAULT_TABLE_SIZE = 16381
DEFAULT_HASH_SEED = "JLfvgnHc2kaSUFaI"
SUPPORTED_TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_WEIGHT = 100          # loadbalancer.DefaultBackendWeight
SENTINEL = 0xFFFFFFFF

_M64 = (1 << 64) - 1
_M32 = 0xFFFFFFFF
_C1, _C2 = 0x87C37B91114253D5, 0x4CF5AD432745937F
JHASH_INITVAL = 0xDEADBEEF


def _rotl64(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _M64
    return k ^ (k >> 33)


def murmur3_128(data: bytes, seed: int) -> tuple[int, int]:
    """MurmurHash3_x64_128 (smhasher), little-endian blocks, the 32-bit seed in both halves."""
    h1 = h2 = seed & _M32
    nblocks = len(data) // 16
    for i in range(nblocks):
        k1 = int.from_bytes(data[16 * i:16 * i + 8], "little")
        k2 = int.from_bytes(data[16 * i + 8:16 * i + 16], "little")
        k1 = (_rotl64((k1 * _C1) & _M64, 31) * _C2) & _M64
        h1 ^= k1
        h1 = (((_rotl64(h1, 27) + h2) & _M64) * 5 + 0x52DCE729) & _M64
        k2 = (_rotl64((k2 * _C2) & _M64, 33) * _C1) & _M64
        h2 ^= k2
        h2 = (((_rotl64(h2, 31) + h1) & _M64) * 5 + 0x38495AB5) & _M64
    tail = data[16 * nblocks:]
    if len(tail) > 8:
        k2 = int.from_bytes(tail[8:], "little")
        h2 ^= (_rotl64((k2 * _C2) & _M64, 33) * _C1) & _M64
    if tail:
        k1 = int.from_bytes(tail[:8], "little")
        h1 ^= (_rotl64((k1 * _C1) & _M64, 31) * _C2) & _M64
    h1 ^= len(data)
    h2 ^= len(data)
    h1 = (h1 + h2) & _M64
    h2 = (h2 + h1) & _M64
    h1, h2 = _fmix64(h1), _fmix64(h2)
    h1 = (h1 + h2) & _M64
    return h1, (h2 + h1) & _M64


def _rol32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    """The kernel's (and bpf/lib/jhash.h's) jhash_3words: __jhash_nwords + __jhash_final."""
    initval = (initval + JHASH_INITVAL + (3 << 2)) & _M32
    a, b, c = (a + initval) & _M32, (b + initval) & _M32, (c + initval) & _M32
    c ^= b; c = (c - _rol32(b, 14)) & _M32
    a ^= c; a = (a - _rol32(c, 11)) & _M32
    b ^= a; b = (b - _rol32(a, 25)) & _M32
    c ^= b; c = (c - _rol32(b, 16)) & _M32
    a ^= c; a = (a - _rol32(c, 4)) & _M32
    b ^= a; b = (b - _rol32(a, 14)) & _M32
    c ^= b; c = (c - _rol32(b, 24)) & _M32
    return c


def _le32(value: int) -> int:
    """A network-order u32 as a little-endian host reads it (HASH_WORD32_LE of a __be32)."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def tuple_hash(saddr: int, sport: int, dport: int, proto: int, seed: int) -> int:
    """__hash_from_tuple_v4: the client address, both ports (sport 0 under affinity) and the
    protocol; the service address is left out so one client maps alike on every VIP."""
    sport_le = ((sport & 0xFF) << 8) | (sport >> 8)
    dport_le = ((dport & 0xFF) << 8) | (dport >> 8)
    return jhash_3words(_le32(saddr), (dport_le << 16) | sport_le, proto, seed)


class MaglevSeed(NamedTuple):
    murmur: int
    jhash0: int
    jhash1: int


def parse_seed(seed_b64: str) -> MaglevSeed:
    try:
        raw = base64.b64decode(seed_b64, validate=True)
    except ValueError as exc:
        raise ValueError(f"cannot decode base64 Maglev hash seed {seed_b64!r}: {exc}") from None
    if len(raw) != 12:
        raise ValueError(f"decoded hash seed is {len(raw)} bytes (not 12 bytes)")
    return MaglevSeed(*(int.from_bytes(raw[i:i + 4], "big") for i in (0, 4, 8)))


def backend_hash_string(address: str, port: int, proto: str, internal: bool = False) -> str:
    """BackendInfo.setHashString: the name a backend is sorted and hashed by."""
    return f"[{address}:{port}/{proto}{'/i' if internal else ''},State:active]"


class MaglevBackend(NamedTuple):
    backend_id: int
    name: str                     # the hash string
    weight: int = DEFAULT_WEIGHT


def permutation(name: str, m: int, seed: int) -> tuple[int, int]:
    """(offset, skip) of a backend: its preference list is (offset + j*skip) % m."""
    h1, h2 = murmur3_128(name.encode(), seed)
    return h1 % m, h2 % (m - 1) + 1


def lookup_table(backends: Iterable[MaglevBackend], m: int = DEFAULT_TABLE_SIZE,
                 seed: int | None = None) -> array:
    """The M-entry lookup table of backend ids (computeLookupTable). Empty input, empty table."""
    if m not in SUPPORTED_TABLE_SIZES:
        raise ValueError(f"Maglev table size {m}: must be one of {SUPPORTED_TABLE_SIZES}")
    if seed is None:
        seed = parse_seed(DEFAULT_HASH_SEED).murmur
    ordered = sorted(backends, key=lambda b: b.name)
    n = len(ordered)
    if n == 0:
        return array("I")
    if n > m:
        raise ValueError(f"Maglev: {n} backends do not fit a table of {m}")
    offsets, skips = [], []
    for b in ordered:
        offset, skip = permutation(b.name, m, seed)
        offsets.append(offset)
        skips.append(skip)
    ids = [b.backend_id for b in ordered]
    weights = [b.weight for b in ordered]
    weight_sum = sum(weights)
    weighted = weight_sum // n > 1
    counters = [w / n for w in weights]
    nxt = [0] * n
    entry = [SENTINEL] * m
    for turn in range(m):
        i = turn % n
        if weighted:
            while (turn + 1) * weights[i] < int(counters[i]):
                i = (i + 1) % n
            counters[i] += weight_sum
        offset, skip, j = offsets[i], skips[i], nxt[i]
        c = (offset + j * skip) % m
        while entry[c] != SENTINEL:
            j += 1
            c = (offset + j * skip) % m
        entry[c] = ids[i]
        nxt[i] = j + 1
    return array("I", entry)
