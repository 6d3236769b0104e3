"""core/gso.py: software TCPv4 segmentation and CHECKSUM_PARTIAL completion, checked against
segments built independently with dpkt (which computes its own checksums) from the rules of
tcp_gso_segment / inet_gso_segment. tests/linux/test_gso_kernel.py compares with the kernel's own."""

from __future__ import annotations

import random
import socket
import struct

import dpkt
import pytest

from reference import naive_checksum, naive_sum
from podnet.core import gso
from podnet.core.packet import DropReason
from podnet.testing import frames as F

SRC, DST = "10.244.1.2", "10.244.2.2"
MAC_A, GW = "02:00:00:00:01:02", "ee:ee:ee:ee:ee:ee"
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
TIMESTAMPS = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)


def super_frame(payload: bytes, *, flags: int = ACK | PSH, seq: int = 0xFFFF_F000, ip_id: int = 0xFFF0,
                options: bytes = TIMESTAMPS, tos: int = 0x02) -> bytearray:
    """A TCP super-frame as a TSO-capable sender hands it over: the pseudo-header sum of the whole
    L4 length in the checksum field (what NEEDS_CSUM means), DF set."""
    tcp = dpkt.tcp.TCP(sport=40000, dport=80, seq=seq, ack=777, flags=flags, win=512, opts=options, data=payload)
    tcp.off = (20 + len(options)) // 4
    ip = dpkt.ip.IP(src=socket.inet_aton(SRC), dst=socket.inet_aton(DST), p=6, ttl=64, id=ip_id, tos=tos,
                    data=tcp)
    ip.df = 1
    frame = bytearray(bytes(dpkt.ethernet.Ethernet(src=bytes.fromhex(MAC_A.replace(":", "")),
                                                   dst=b"\xee" * 6, type=0x0800, data=ip)))
    l4 = 34
    seed = naive_sum(socket.inet_aton(SRC) + socket.inet_aton(DST) + struct.pack("!BBH", 0, 6, len(frame) - l4))
    struct.pack_into("!H", frame, l4 + 16, seed)
    return frame


def expected(frame: bytearray, mss: int, *, fixed_id: bool = False) -> list[bytes]:
    """The segments, built from scratch with dpkt (its checksums, not podnet's)."""
    eth = dpkt.ethernet.Ethernet(bytes(frame))
    ip, tcp = eth.data, eth.data.data
    payload = bytes(tcp.data)
    chunks = [payload[i:i + mss] for i in range(0, len(payload), mss)]
    out = []
    for i, chunk in enumerate(chunks):
        flags = tcp.flags
        if i != len(chunks) - 1:
            flags &= ~(FIN | PSH)
        if i:
            flags &= ~CWR
        seg = dpkt.tcp.TCP(sport=tcp.sport, dport=tcp.dport, seq=(tcp.seq + i * mss) & 0xFFFFFFFF, ack=tcp.ack,
                           flags=flags, win=tcp.win, opts=tcp.opts, data=chunk, urp=tcp.urp)
        seg.off = tcp.off
        seg_ip = dpkt.ip.IP(src=ip.src, dst=ip.dst, p=6, ttl=ip.ttl, tos=ip.tos,
                            id=ip.id if fixed_id else (ip.id + i) & 0xFFFF, data=seg)
        seg_ip.df = ip.df
        out.append(bytes(dpkt.ethernet.Ethernet(src=eth.src, dst=eth.dst, type=0x0800, data=seg_ip)))
    return out


@pytest.mark.parametrize("size, mss", [(20000, 1448), (1448 * 5, 1448), (1449, 1448), (4001, 1000), (64000, 1398),
                                       (3, 1)], ids=["plain", "exact-multiple", "one-byte-over", "odd", "64k", "tiny"])
def test_segments_match_an_independent_construction(size, mss):
    frame = super_frame(random.Random(size).randbytes(size), flags=ACK | PSH | FIN | CWR | ECE)
    original = bytes(frame)
    got = gso.segment_tcp4(frame, mss)
    assert [bytes(s) for s in got] == expected(frame, mss)
    assert bytes(frame) == original                                       # the input is not modified
    for segment in got:
        ip = dpkt.ethernet.Ethernet(bytes(segment)).data
        assert naive_checksum(bytes(ip)[:20]) == 0
        pseudo = ip.src + ip.dst + struct.pack("!BBH", 0, 6, len(ip.data))
        assert naive_sum(pseudo + bytes(ip.data)) == 0xFFFF


def test_flags_ids_and_sequence_numbers_across_the_segments():
    frame = super_frame(bytes(5000), flags=ACK | PSH | FIN | CWR, seq=0xFFFFFF00, ip_id=0xFFFF)
    segments = [dpkt.ethernet.Ethernet(bytes(s)).data for s in gso.segment_tcp4(frame, 1200)]
    assert [s.id for s in segments] == [0xFFFF, 0, 1, 2, 3]               # id, id+1, ... wrapping
    assert [s.data.seq for s in segments] == [(0xFFFFFF00 + i * 1200) & 0xFFFFFFFF for i in range(5)]
    assert [s.data.flags & (FIN | PSH) for s in segments] == [0, 0, 0, 0, FIN | PSH]
    assert [s.data.flags & CWR for s in segments] == [CWR, 0, 0, 0, 0]
    assert all(s.data.flags & ACK for s in segments)
    assert [s.len for s in segments] == [20 + 32 + 1200] * 4 + [20 + 32 + 200]
    assert all(s.df and s.tos == 0x02 and s.ttl == 64 for s in segments)
    fixed = [dpkt.ethernet.Ethernet(bytes(s)).data.id for s in gso.segment_tcp4(frame, 1200, fixed_id=True)]
    assert fixed == [0xFFFF] * 5
    assert [bytes(s) for s in gso.segment_tcp4(frame, 1200, fixed_id=True)] == expected(frame, 1200, fixed_id=True)


@pytest.mark.parametrize("size, mss", [(20000, 1398), (1449, 1448), (4001, 1000), (3, 1), (5, 1448)],
                         ids=["plain", "one-byte-over", "odd", "tiny", "single"])
def test_lco_sum_is_the_sum_of_the_segment_from_its_ethertype(size, mss):
    frame = super_frame(random.Random(size).randbytes(size), flags=ACK | PSH | FIN)
    for segment in gso.segment_tcp4(frame, mss):
        assert gso.lco_sum(segment) == naive_sum(bytes(segment[12:])) % 0xFFFF


def test_a_super_frame_that_fits_one_segment_is_only_finished():
    frame = super_frame(b"small", flags=ACK | PSH)
    (single,) = gso.segment_tcp4(frame, 1448)
    assert bytes(single) == expected(frame, 1448)[0]


def test_ethernet_padding_is_not_part_of_any_segment():
    frame = super_frame(bytes(3000))
    padded = frame + b"\xAA" * 10
    assert [bytes(s) for s in gso.segment_tcp4(padded, 1000)] == expected(frame, 1000)


@pytest.mark.parametrize("damage", ["udp", "fragment", "mss-0", "short-ip", "tot-len", "doff", "ipv6"])
def test_what_cannot_be_segmented_is_gso_invalid(damage):
    frame = super_frame(bytes(3000))
    mss = 1000
    if damage == "udp":
        frame = F.udp(SRC, DST, payload=bytes(3000))
    elif damage == "fragment":
        frame[20] |= 0x20
    elif damage == "mss-0":
        mss = 0
    elif damage == "short-ip":
        frame = frame[:30]
    elif damage == "tot-len":
        struct.pack_into("!H", frame, 16, len(frame))
    elif damage == "doff":
        frame[34 + 12] = 0x40
    else:
        frame[12:14] = b"\x86\xdd"
    assert gso.segment_tcp4(frame, mss) is DropReason.GSO_INVALID


# ---- CHECKSUM_PARTIAL ----------------------------------------------------------------------------

def _partial(frame: bytearray, proto: int) -> bytearray:
    """The same frame with its L4 checksum replaced by the pseudo-header sum (NEEDS_CSUM)."""
    out = bytearray(frame)
    offset = 34 + (16 if proto == 6 else 6)
    seed = naive_sum(bytes(out[26:34]) + struct.pack("!BBH", 0, proto, len(out) - 34))
    struct.pack_into("!H", out, offset, seed)
    return out


@pytest.mark.parametrize("proto", [6, 17])
def test_complete_checksum_gives_the_checksum_a_full_computation_gives(proto):
    full = (F.tcp(SRC, DST, payload=b"abc" * 101) if proto == 6 else F.udp(SRC, DST, payload=b"xyz" * 33))
    partial = _partial(full, proto)
    assert partial != full
    assert gso.complete_checksum(partial, 34, 16 if proto == 6 else 6)
    assert partial == full


def test_complete_checksum_sends_a_zero_as_ffff():
    frame = F.udp(SRC, DST, payload=bytes(10))
    checksum = struct.unpack_from("!H", frame, 40)[0]
    struct.pack_into("!H", frame, len(frame) - 2, checksum)   # the data now sums to 0xffff with it
    struct.pack_into("!H", frame, 40, 0)
    assert naive_checksum(bytes(frame[26:34]) + struct.pack("!BBH", 0, 17, 18) + bytes(frame[34:])) == 0
    partial = _partial(frame, 17)
    gso.complete_checksum(partial, 34, 6)
    assert struct.unpack_from("!H", partial, 40)[0] == 0xFFFF          # CSUM_MANGLED_0


def test_complete_checksum_refuses_offsets_outside_the_packet():
    frame = F.tcp(SRC, DST, payload=b"x")
    before = bytes(frame)
    assert not gso.complete_checksum(frame, 34, 200)
    assert not gso.complete_checksum(frame, 10, 16)
    assert bytes(frame) == before


# ---- finish(): what a device without offloads sends ------------------------------------------------

def test_finish_follows_the_virtio_net_header():
    plain = F.tcp(SRC, DST, payload=b"data")
    assert gso.finish(plain, None) == [plain] and gso.finish(plain, bytes(10)) == [plain]
    partial = _partial(plain, 6)
    needs_csum = gso.VnetHeader(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.GSO_NONE, 0, 0, 34, 16).pack()
    (done,) = gso.finish(partial, needs_csum)
    assert done == plain and partial != plain                               # a copy, finished
    big = super_frame(bytes(4000), flags=ACK | CWR)
    for gso_type in (gso.GSO_TCPV4, gso.GSO_TCPV4 | gso.GSO_ECN):
        header = gso.VnetHeader(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, 66, 1448, 34, 16).pack()
        assert [bytes(s) for s in gso.finish(big, header)] == expected(big, 1448)
    for other in (gso.GSO_UDP, gso.GSO_TCPV6, gso.GSO_UDP_L4):
        assert gso.finish(big, gso.VnetHeader(0, other, 0, 1400, 0, 0).pack()) is DropReason.GSO_INVALID
    bad = gso.VnetHeader(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.GSO_NONE, 0, 0, 34, 9000).pack()
    assert gso.finish(plain, bad) is DropReason.GSO_INVALID


def test_vnet_header_round_trip():
    header = gso.VnetHeader(1, 0x81, 66, 1448, 34, 16)
    raw = header.pack()
    assert raw == bytes([1, 0x81, 66, 0, 0xA8, 0x05, 34, 0, 16, 0])        # little-endian, as virtio says
    assert gso.VnetHeader.parse(raw) == header and header.gso == gso.GSO_TCPV4 and header.needs_csum
    assert gso.VnetHeader.parse(None) is None and gso.VnetHeader.parse(b"\x00" * 4) is None


def test_damaged_frames_and_headers_never_raise_and_what_comes_out_is_whole():
    """Fuzz `finish`: bit flips, truncation and padding of a super-frame and of a CHECKSUM_PARTIAL
    frame, and random virtio-net headers. The input is never modified; segments of a TCPv4 GSO frame
    carry valid IPv4 and TCP checksums (checked here by reference arithmetic), at most gso_size bytes
    each, and together exactly the payload the frame's own headers delimit; a finished partial
    frame differs from its input only in the two checksum bytes."""
    rng = random.Random(13)
    big = bytes(super_frame(random.Random(1).randbytes(6000)))
    small = bytes(_partial(F.udp(SRC, DST, payload=b"xyz" * 33), 17))
    headers = [gso.VnetHeader(1, gso.GSO_TCPV4, 66, 1448, 34, 16), gso.VnetHeader(1, 0, 0, 0, 34, 6),
               gso.VnetHeader(1, gso.GSO_TCPV4 | gso.GSO_ECN, 66, 1000, 34, 16)]
    outcomes = set()
    for _ in range(3000):
        frame = bytearray(rng.choice([big, small]))
        for _ in range(rng.randint(0, 3)):
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.2:
            del frame[rng.randrange(len(frame)):]
        elif rng.random() < 0.1:
            frame += rng.randbytes(rng.randrange(1, 20))
        raw = bytearray(rng.choice(headers).pack())
        if rng.random() < 0.3:
            raw[rng.randrange(10)] = rng.randrange(256)
        header = gso.VnetHeader.parse(raw)
        before = bytes(frame)
        got = gso.finish(frame, bytes(raw))
        assert bytes(frame) == before
        if isinstance(got, DropReason):
            assert got is DropReason.GSO_INVALID
            outcomes.add("invalid")
            continue
        if header.gso == gso.GSO_TCPV4:
            ihl, tot_len = (frame[14] & 0x0F) * 4, frame[16] << 8 | frame[17]
            start, end = 14 + ihl + (frame[14 + ihl + 12] >> 4) * 4, 14 + tot_len
            ip_ok = naive_sum(before[14:14 + ihl]) == 0xFFFF   # a single segment keeps the IPv4 header
            for segment in got:
                tcp = bytes(segment[14 + ihl:])
                assert len(segment) == 14 + (segment[16] << 8 | segment[17])
                assert naive_sum(bytes(segment[14:14 + ihl])) == 0xFFFF or (len(got) == 1 and not ip_ok)
                pseudo = bytes(segment[26:34]) + struct.pack("!BBH", 0, 6, len(tcp))
                assert naive_sum(pseudo + tcp) == 0xFFFF
                assert len(segment) - start <= max(header.gso_size, end - start)
            assert b"".join(bytes(s[start:]) for s in got) == before[start:end]
            outcomes.add("segmented" if len(got) > 1 else "single")
        elif header.needs_csum:
            (done,) = got
            field = header.csum_start + header.csum_offset
            assert len(done) == len(before) and done[:field] == before[:field]
            assert done[field + 2:] == before[field + 2:]
            outcomes.add("finished")
        else:
            assert got == [frame]
            outcomes.add("as-is")
    assert {"invalid", "segmented", "single", "finished", "as-is"} <= outcomes
