"""Maglev as Cilium computes it: the hashes, the permutation, weights, balance and disruption."""

from __future__ import annotations

import base64
import collections
import random

import pytest

from podnet.core.services.ebpf.maglev import (DEFAULT_HASH_SEED, DEFAULT_TABLE_SIZE, SUPPORTED_TABLE_SIZES,
                                              MaglevBackend, backend_hash_string, jhash_3words, lookup_table,
                                              murmur3_128, parse_seed, permutation, tuple_hash)

SEED = parse_seed(DEFAULT_HASH_SEED)


@pytest.mark.parametrize("seed, h1, h2, text", [
    # cilium/cilium pkg/murmur3/murmur3_test.go
    (0, 0x0000000000000000, 0x0000000000000000, ""),
    (1234, 0x1629CCE705A7069C, 0x316C1FBD953AAECD, "hello world"),
    (500, 0x188F69F0ABBD67DE, 0x1B0EEB31B4C00CB6, "lorem ipsum dolor sit amet"),
    (31, 0x24B05FFCA412286A, 0x7D81AC914B62FE96, "this is a test of 31 bytes long"),
    (0xD09, 0x5E0FD714B3169AE6, 0x2F36E811C1535DC7, "The quick brown fox jumps over the lazy dog."),
])
def test_murmur3_matches_ciliums_vectors(seed, h1, h2, text):
    assert murmur3_128(text.encode(), seed) == (h1, h2)


def test_jhash_and_the_tuple_hash_match_the_c_code():
    # values from the kernel's jhash_3words compiled with gcc
    assert jhash_3words(0, 0, 0, 0) == 459859287
    assert jhash_3words(1, 2, 3, 4) == 2164462655
    # __hash_from_tuple_v4 for 10.244.0.9:40000 -> :80/TCP reads the network-order fields as a
    # little-endian host does: saddr 0x0900f40a, ports 0x5000 << 16 | 0x409c
    assert tuple_hash(0x0AF40009, 40000, 80, 6, 0x71DCF546) == jhash_3words(0x0900F40A, 0x5000 << 16 | 0x409C, 6,
                                                                            0x71DCF546) == 2428709152


def test_the_default_seed_and_table_size_are_ciliums():
    assert DEFAULT_TABLE_SIZE == 16381 and 16381 in SUPPORTED_TABLE_SIZES
    raw = base64.b64decode("JLfvgnHc2kaSUFaI")
    assert SEED == (int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:8], "big"), int.from_bytes(raw[8:], "big"))
    with pytest.raises(ValueError, match="not 12 bytes"):
        parse_seed("AAAA")
    assert len(lookup_table([MaglevBackend(1, "a")])) == DEFAULT_TABLE_SIZE
    with pytest.raises(ValueError):
        lookup_table([MaglevBackend(1, "a")], 1000)


def test_backend_names_are_ciliums_hash_strings():
    assert backend_hash_string("10.244.0.5", 8080, "TCP") == "[10.244.0.5:8080/TCP,State:active]"
    assert backend_hash_string("10.244.0.5", 53, "UDP", internal=True) == "[10.244.0.5:53/UDP/i,State:active]"


def test_permutation_is_offset_plus_skip_from_murmur_and_visits_every_slot():
    m = 1021
    h1, h2 = murmur3_128(b"backend-a", SEED.murmur)
    offset, skip = permutation("backend-a", m, SEED.murmur)
    assert (offset, skip) == (h1 % m, h2 % (m - 1) + 1)
    assert len({(offset + j * skip) % m for j in range(m)}) == m


def test_weighted_table_matches_ciliums_test():
    # pkg/maglev/maglev_test.go TestWeightedBackendWithRemoval: M=1021, default seed
    backends = [MaglevBackend(0, "one", 2), MaglevBackend(1, "three", 13), MaglevBackend(2, "two", 111),
                MaglevBackend(3, "tzwe", 10)]
    counts = collections.Counter(lookup_table(backends, 1021, SEED.murmur))
    assert counts == {0: 16, 1: 98, 2: 832, 3: 75}


def test_equal_weights_give_the_unweighted_table_and_order_does_not_matter():
    names = [f"[10.244.0.{i}:80/TCP,State:active]" for i in range(2, 9)]
    unweighted = lookup_table([MaglevBackend(i, n, 1) for i, n in enumerate(names)], 4093, SEED.murmur)
    weighted = lookup_table([MaglevBackend(i, n, 100) for i, n in enumerate(names)], 4093, SEED.murmur)
    shuffled = [MaglevBackend(i, n, 100) for i, n in enumerate(names)]
    random.Random(3).shuffle(shuffled)
    assert unweighted == weighted == lookup_table(shuffled, 4093, SEED.murmur)


@pytest.mark.parametrize("n", [3, 10, 100, 160])
def test_table_is_balanced_within_the_documented_bound(n):
    table = lookup_table([MaglevBackend(i + 1, f"b{i}") for i in range(n)], DEFAULT_TABLE_SIZE, SEED.murmur)
    counts = collections.Counter(table)
    assert len(counts) == n and sum(counts.values()) == DEFAULT_TABLE_SIZE
    # round-robin turns: shares differ by at most one entry ...
    assert max(counts.values()) - min(counts.values()) <= 1
    # ... which is Cilium's documented bound: with M > 100*N, at most 1% difference in hash space
    assert n * 100 < DEFAULT_TABLE_SIZE
    assert (max(counts.values()) - min(counts.values())) / (DEFAULT_TABLE_SIZE / n) <= 0.01


def test_removing_one_of_n_backends_moves_about_one_nth_of_100k_flows():
    n = 10
    backends = [MaglevBackend(i + 1, backend_hash_string(f"10.244.0.{i + 2}", 8080, "TCP")) for i in range(n)]
    before = lookup_table(backends, DEFAULT_TABLE_SIZE, SEED.murmur)
    removed = backends[3].backend_id
    after = lookup_table(backends[:3] + backends[4:], DEFAULT_TABLE_SIZE, SEED.murmur)
    rng = random.Random(1)
    flows = moved = survivors_moved = on_removed = 0
    for _ in range(100_000):
        index = tuple_hash(rng.getrandbits(32), rng.randrange(1024, 65536), 80, 6, SEED.jhash0) % DEFAULT_TABLE_SIZE
        flows += 1
        on_removed += before[index] == removed
        if before[index] != after[index]:
            moved += 1
            survivors_moved += before[index] != removed
        assert after[index] != removed
    # every flow of the removed backend moves (about 1/N of them), and almost no other flow does:
    # measured 10.6% moved, 0.48% of all flows moved between surviving backends
    assert abs(on_removed / flows - 1 / n) < 0.01
    assert 1 / n - 0.01 < moved / flows < 1 / n + 0.02
    assert survivors_moved / flows < 0.01
