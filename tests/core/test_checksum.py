"""Internet checksums (RFC 1071) and their incremental update (RFC 1624), checked against a naive
word-by-word implementation written here and against dpkt's own checksum code."""

from __future__ import annotations

import random
import socket
import struct

import dpkt
import pytest

from reference import naive_checksum, naive_sum
from podnet.core.checksum import (
    fold,
    internet_checksum,
    ipv4_header_ok,
    pseudo_seed_update32,
    update16,
    update32,
)


# --- an independent reference: RFC 1071 §4.1, one 16-bit word at a time -----------------------

def random_word(rng: random.Random) -> int:
    """A 16-bit value biased towards the edges where one's complement arithmetic goes wrong."""
    return rng.choice([0x0000, 0xFFFF, 0x0001, 0xFFFE, 0x8000, 0x7FFF, rng.randrange(0x10000),
                       rng.randrange(0x10000), rng.randrange(0x10000)])


def random_ipv4_header(rng: random.Random) -> bytearray:
    """20 random header bytes with version 4 / IHL 5 and a correct checksum (never all zero)."""
    header = bytearray(rng.randbytes(20))
    header[0] = 0x45
    header[10:12] = b"\x00\x00"
    header[10:12] = struct.pack("!H", naive_checksum(bytes(header)))
    return header


def checksum_from_scratch(header: bytearray) -> int:
    scratch = bytearray(header)
    scratch[10:12] = b"\x00\x00"
    return naive_checksum(bytes(scratch))


# --- internet_checksum ---------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"",
    b"\x00",
    b"\x01",
    b"\xff",
    b"\x00\x00",
    b"\xff\xff",
    b"\xff\xff" * 40,
    b"\x00" * 41,
    b"\x12\x34\xed\xcb",      # sums to exactly 0xffff: checksum 0x0000
    b"\x80\x00\x80\x00",      # carries out of bit 15
    bytes(range(256)),
    # RFC 1071 §3's worked example: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2
    bytes.fromhex("0001f203f4f5f6f7"),
], ids=lambda d: f"{len(d)}B:{d[:4].hex()}")
def test_internet_checksum_edge_cases_match_naive(data):
    assert internet_checksum(data) == naive_checksum(data)


def test_internet_checksum_rfc1071_example():
    assert naive_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2) & 0xFFFF


@pytest.mark.parametrize("seed", range(4))
def test_internet_checksum_random_data_matches_naive(seed):
    rng = random.Random(seed)
    odd = even = 0
    for _ in range(500):
        length = rng.randrange(0, 300)
        data = rng.randbytes(length)
        if rng.random() < 0.2:   # long runs of 0xff / 0x00 stress the end-around carry
            data = bytes(rng.choice((0x00, 0xFF)) if rng.random() < 0.8 else b for b in data)
        odd += length % 2
        even += 1 - length % 2
        for view in (data, bytearray(data), memoryview(data)):
            assert internet_checksum(view) == naive_checksum(data), (seed, data.hex())
    assert odd > 100 and even > 100  # both paddings were exercised


def test_checksum_over_data_including_its_checksum_is_zero():
    rng = random.Random(7)
    for _ in range(300):
        data = rng.randbytes(2 * rng.randrange(1, 60))
        with_checksum = data + struct.pack("!H", internet_checksum(data))
        assert internet_checksum(with_checksum) == 0
        assert naive_sum(with_checksum) == 0xFFFF


def test_internet_checksum_initial_continues_a_partial_sum():
    rng = random.Random(11)
    for _ in range(500):
        prefix = rng.randbytes(2 * rng.randrange(0, 20))   # even, so the words stay aligned
        data = rng.randbytes(rng.randrange(0, 80))
        assert internet_checksum(data, initial=naive_sum(prefix)) == naive_checksum(prefix + data)


def test_fold_matches_end_around_carry():
    rng = random.Random(3)
    for _ in range(1000):
        total = rng.randrange(0, 1 << rng.choice((16, 17, 20, 32, 40)))
        expected = total
        while expected > 0xFFFF:
            expected = (expected & 0xFFFF) + (expected >> 16)
        assert fold(total) == expected
    assert fold(0x1FFFE) == 0xFFFF
    assert fold(0x10000) == 0x0001


# --- ipv4_header_ok --------------------------------------------------------------------------------

def dpkt_header(**fields) -> bytes:
    ip = dpkt.ip.IP(src=socket.inet_aton("10.244.0.2"), dst=socket.inet_aton("10.244.0.3"),
                    p=dpkt.ip.IP_PROTO_UDP, ttl=64, id=0x1234, data=b"", **fields)
    return bytes(ip)


def test_ipv4_header_ok_accepts_headers_dpkt_built():
    header = dpkt_header()
    assert len(header) == 20
    assert ipv4_header_ok(header, 0)
    assert ipv4_header_ok(b"\x00" * 14 + header)              # default offset: after Ethernet
    with_opts = dpkt_header(opts=b"\x01\x01\x01\x00", hl=6)          # NOP NOP NOP EOL: IHL 6
    assert with_opts[0] == 0x46
    assert ipv4_header_ok(with_opts, 0, 24)


def test_ipv4_header_ok_rejects_every_single_bit_error():
    for header in (dpkt_header(), dpkt_header(opts=b"\x01\x01\x01\x00", hl=6)):
        ihl = (header[0] & 0x0F) * 4
        for bit in range(ihl * 8):
            bad = bytearray(header)
            bad[bit // 8] ^= 0x80 >> (bit % 8)
            assert not ipv4_header_ok(bad, 0, ihl), f"bit {bit} flipped went unnoticed"


def test_ipv4_header_ok_covers_the_options():
    header = bytearray(dpkt_header(opts=b"\x01\x01\x01\x00", hl=6))
    header[21] ^= 0x10  # inside the options
    assert not ipv4_header_ok(header, 0, 24)


def test_ipv4_header_ok_random_headers():
    rng = random.Random(5)
    for _ in range(500):
        header = random_ipv4_header(rng)
        assert ipv4_header_ok(header, 0)
        word = rng.randrange(10)
        old = header[2 * word] << 8 | header[2 * word + 1]
        new = (old + rng.randrange(1, 0xFFFF)) & 0xFFFF
        if {old, new} == {0x0000, 0xFFFF}:
            continue  # the one change one's complement arithmetic cannot see (+0 vs -0)
        header[2 * word:2 * word + 2] = struct.pack("!H", new)
        assert not ipv4_header_ok(header, 0)


# --- update16 / update32 (RFC 1624) -------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_update16_agrees_with_recomputation(seed):
    rng = random.Random(seed)
    for _ in range(2000):
        header = random_ipv4_header(rng)
        changes = rng.randrange(1, 6)   # chains of updates must not drift either
        for _ in range(changes):
            word = rng.choice([0, 1, 2, 3, 4, 6, 7, 8, 9])  # anything but the checksum itself
            if word == 0:
                old = header[0] << 8 | header[1]
                new = 0x4500 | rng.randrange(0x100)    # keep version 4 (a header is never all zero)
            else:
                old = header[2 * word] << 8 | header[2 * word + 1]
                new = random_word(rng)
            header[2 * word:2 * word + 2] = struct.pack("!H", new)
            checksum = header[10] << 8 | header[11]
            header[10:12] = struct.pack("!H", update16(checksum, old, new))
            assert (header[10] << 8 | header[11]) == checksum_from_scratch(header), header.hex()
            assert ipv4_header_ok(header, 0)


@pytest.mark.parametrize("seed", range(3))
def test_update32_agrees_with_recomputation(seed):
    rng = random.Random(100 + seed)
    for _ in range(2000):
        header = random_ipv4_header(rng)
        offset = rng.choice((12, 16))   # source or destination address
        old, = struct.unpack_from("!I", header, offset)
        new = rng.choice([0, 0xFFFFFFFF, 0xFFFF0000, 0x0000FFFF, old ^ 1, rng.getrandbits(32),
                          rng.getrandbits(32)])
        struct.pack_into("!I", header, offset, new)
        checksum = header[10] << 8 | header[11]
        header[10:12] = struct.pack("!H", update32(checksum, old, new))
        assert (header[10] << 8 | header[11]) == checksum_from_scratch(header), header.hex()


def test_update16_rfc1624_section3_example():
    """RFC 1624 §3: RFC 1141's HC + m + ~m' gives 0xffff here; the right answer is 0x0000."""
    assert update16(0xDD2F, 0x5555, 0x3285) == 0x0000


@pytest.mark.parametrize("seed", range(2))
def test_updates_that_must_give_a_zero_checksum(seed):
    """Changes after which the header sums to 0xffff, so the from-scratch checksum is 0x0000: the case
    random data almost never reaches and where the 0x0000/0xffff ambiguity would show."""
    rng = random.Random(500 + seed)
    for _ in range(500):
        header = random_ipv4_header(rng)
        word = rng.choice([1, 2, 3, 4, 6, 7, 8, 9])
        scratch = bytearray(header)
        scratch[10:12] = b"\x00\x00"
        scratch[2 * word:2 * word + 2] = b"\x00\x00"
        others = naive_sum(bytes(scratch))
        old = header[2 * word] << 8 | header[2 * word + 1]
        new = 0xFFFF - others                     # the header then sums to exactly 0xffff
        header[2 * word:2 * word + 2] = struct.pack("!H", new)
        assert checksum_from_scratch(header) == 0x0000
        checksum = header[10] << 8 | header[11]
        assert update16(checksum, old, new) == 0x0000

        if word in (6, 8):                        # the same through update32 on an address
            header = random_ipv4_header(rng)
            scratch = bytearray(header)
            scratch[10:12] = b"\x00\x00"
            scratch[2 * word:2 * word + 4] = b"\x00\x00\x00\x00"
            others = naive_sum(bytes(scratch))
            hi = rng.randrange(0x10000)
            lo = (0xFFFF - others - hi) % 0xFFFF
            old, = struct.unpack_from("!I", header, 2 * word)
            struct.pack_into("!HH", header, 2 * word, hi, lo)
            assert checksum_from_scratch(header) == 0x0000
            checksum = header[10] << 8 | header[11]
            assert update32(checksum, old, hi << 16 | lo) == 0x0000


def test_update16_of_an_unchanged_word_keeps_the_checksum():
    rng = random.Random(9)
    for _ in range(300):
        header = random_ipv4_header(rng)
        checksum = header[10] << 8 | header[11]
        word = random_word(rng)
        assert update16(checksum, word, word) == checksum_from_scratch(header)


def test_update32_fixes_a_tcp_checksum_like_dpkt_recomputes_it():
    """An address change (SNAT) is in the TCP pseudo-header: the incremental TCP checksum must
    equal the one dpkt computes from scratch for the new addresses."""
    rng = random.Random(21)
    for _ in range(300):
        src, dst = rng.getrandbits(32), rng.getrandbits(32)
        tcp = dpkt.tcp.TCP(sport=rng.randrange(1, 65536), dport=rng.randrange(1, 65536),
                           seq=rng.getrandbits(32), flags=dpkt.tcp.TH_ACK, data=rng.randbytes(rng.randrange(0, 40)))
        ip = dpkt.ip.IP(src=struct.pack("!I", src), dst=struct.pack("!I", dst), p=6, data=tcp)
        before = dpkt.ip.IP(bytes(ip))
        new_src = rng.getrandbits(32)
        rebuilt = dpkt.ip.IP(src=struct.pack("!I", new_src), dst=struct.pack("!I", dst), p=6,
                             data=dpkt.tcp.TCP(bytes(before.data)[:16] + b"\x00\x00" + bytes(before.data)[18:]))
        rebuilt.data.sum = 0
        expected = dpkt.ip.IP(bytes(rebuilt)).data.sum
        assert update32(before.data.sum, src, new_src) == expected


# --- pseudo_seed_update32 (CHECKSUM_PARTIAL seeds) ----------------------------------------------

def pseudo_header_seed(src: int, dst: int, proto: int, l4_length: int) -> int:
    """The kernel's CHECKSUM_PARTIAL seed: the folded, uninverted pseudo-header sum (RFC 9293 §3.1)."""
    return naive_sum(struct.pack("!IIBBH", src, dst, 0, proto, l4_length))


def test_pseudo_seed_update32_agrees_with_a_fresh_seed():
    rng = random.Random(33)
    for _ in range(3000):
        src, dst = rng.getrandbits(32), rng.getrandbits(32)
        proto = rng.choice((6, 17))
        length = rng.randrange(8, 65536)
        seed = pseudo_header_seed(src, dst, proto, length)
        new = rng.choice([0, 0xFFFFFFFF, rng.getrandbits(32), rng.getrandbits(32)])
        if rng.random() < 0.5:
            assert pseudo_seed_update32(seed, src, new) == pseudo_header_seed(new, dst, proto, length)
        else:
            assert pseudo_seed_update32(seed, dst, new) == pseudo_header_seed(src, new, proto, length)


def test_pseudo_seed_update32_folds_to_0xffff_never_0():
    """When the new pseudo-header sums to 0 modulo 0xffff the seed is 0xffff (the sum of non-zero
    words), as the kernel's csum_fold gives; 0 would complete to a different checksum field."""
    rng = random.Random(34)
    for _ in range(200):
        dst, proto, length = rng.getrandbits(32), 6, rng.randrange(20, 1500)
        src_hi = rng.randrange(1, 0xFFFF)
        rest = naive_sum(struct.pack("!HIBBH", src_hi, dst, 0, proto, length))
        src_lo = (0xFFFF - rest) % 0xFFFF
        new_src = src_hi << 16 | src_lo
        assert pseudo_header_seed(new_src, dst, proto, length) == 0xFFFF
        old_src = rng.getrandbits(32)
        seed = pseudo_header_seed(old_src, dst, proto, length)
        assert pseudo_seed_update32(seed, old_src, new_src) == 0xFFFF


def test_updated_seed_completes_to_the_checksum_dpkt_computes():
    """What the TAP's consumer does with a NEEDS_CSUM frame: checksum the L4 bytes with the seed in
    the checksum field. After a source change and a seed update it must give dpkt's TCP checksum."""
    rng = random.Random(35)
    for _ in range(300):
        src, dst, new_src = rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32)
        segment = bytearray(bytes(dpkt.tcp.TCP(sport=rng.randrange(65536), dport=rng.randrange(65536),
                                               seq=rng.getrandbits(32), data=rng.randbytes(rng.randrange(0, 64)))))
        segment[16:18] = struct.pack("!H", pseudo_header_seed(src, dst, 6, len(segment)))
        seed, = struct.unpack_from("!H", segment, 16)
        segment[16:18] = struct.pack("!H", pseudo_seed_update32(seed, src, new_src))
        completed = internet_checksum(segment)

        ip = dpkt.ip.IP(src=struct.pack("!I", new_src), dst=struct.pack("!I", dst), p=6,
                        data=dpkt.tcp.TCP(bytes(segment[:16]) + b"\x00\x00" + bytes(segment[18:])))
        ip.data.sum = 0
        assert completed == dpkt.ip.IP(bytes(ip)).data.sum
