"""VXLAN encapsulation and decapsulation, byte by byte, against frames built here independently
(struct + the reference checksum, never podnet's builders) and decoded by dpkt."""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys

import dpkt
import pytest

from reference import naive_checksum, naive_sum
from podnet.core import packet as pk
from podnet.core.overlay import vxlan
from podnet.core.overlay.vxlan import Decapsulated, Vtep, flow_hash, source_port
from podnet.core.packet import DropReason
from podnet.errors import ConfigError
from podnet.testing import frames as F

A_IP, B_IP = "192.0.2.1", "192.0.2.2"                 # the two nodes' underlay addresses
A_VTEP, B_VTEP = "0a:58:00:00:01:01", "0a:58:00:00:02:02"
A_UPLINK, B_UPLINK = "02:00:00:00:00:a1", "02:00:00:00:00:b1"


def vtep_a(**kw) -> Vtep:
    return Vtep(local_ip=A_IP, mac=A_VTEP, underlay_mac=A_UPLINK, **kw)


def vtep_b(**kw) -> Vtep:
    return Vtep(local_ip=B_IP, mac=B_VTEP, underlay_mac=B_UPLINK, **kw)


def to_b(a: Vtep):
    return a.peer(B_IP, B_VTEP, B_UPLINK)


def pod_tcp(payload: bytes = b"hello", **kw) -> bytearray:
    return F.tcp("10.244.1.5", "10.244.2.7", 40000, 80, payload=payload, **kw)


def udp_checksum_ok(frame: bytes, udp_offset: int) -> bool:
    """RFC 768 over the pseudo-header, by the reference arithmetic."""
    length = struct.unpack_from("!H", frame, udp_offset + 4)[0]
    pseudo = frame[26:34] + struct.pack("!BBH", 0, 17, length)
    return naive_sum(pseudo + frame[udp_offset:udp_offset + length]) == 0xFFFF


def vxlan_frame(inner: bytes, *, vni: int = 1, flags: bytes = b"\x08\x00\x00\x00", last: int = 0,
                src: str = A_IP, dst: str = B_IP, sport: int = 40000, dport: int = 4789, csum: bool = True,
                tos: int = 0, frag: int = 0, ulen_delta: int = 0, ip_options: bytes = b"",
                padding: bytes = b"", ip_id: int = 7) -> bytearray:
    """An outer frame built from scratch, with every field under the test's control."""
    vx = flags + struct.pack("!I", vni << 8 | last)
    data = vx + inner
    ulen = 8 + len(data)
    udp = bytearray(struct.pack("!HHHH", sport, dport, ulen + ulen_delta, 0) + data)
    if csum:
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, ulen)
        value = naive_checksum(pseudo + bytes(udp)) or 0xFFFF
        struct.pack_into("!H", udp, 6, value)
    ihl = 20 + len(ip_options)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, tos, ihl + len(udp), ip_id, frag, 64, 17, 0,
                               socket.inet_aton(src), socket.inet_aton(dst)) + ip_options)
    struct.pack_into("!H", ip, 10, naive_checksum(bytes(ip)))
    eth = pk.mac_bytes(B_UPLINK) + pk.mac_bytes(A_UPLINK) + b"\x08\x00"
    return bytearray(eth + ip + udp + padding)


def inner_to_b(**kw) -> bytes:
    """A valid inner frame as A's VTEP sends it to B: A's VTEP MAC to B's."""
    return bytes(F.icmp_echo("10.244.1.5", "10.244.2.7", src_mac=A_VTEP, dst_mac=B_VTEP, **kw))


# ---- encapsulation ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [60, 1464])  # the smallest Ethernet frame, the largest that fits 1450
def test_encapsulated_frame_byte_by_byte(size):
    a = vtep_a()
    inner = bytes(pod_tcp((bytes(range(256)) * 6)[:size - 54]))
    assert len(inner) == size
    out = a.encapsulate(inner, to_b(a))
    assert len(out) == len(inner) + 50
    # outer Ethernet: to the underlay next hop, from our uplink
    assert out[0:14] == pk.mac_bytes(B_UPLINK) + pk.mac_bytes(A_UPLINK) + b"\x08\x00"
    # outer IPv4: no options, tos 0, DF clear, TTL 64, UDP, our address to the peer's
    ver_ihl, tos, tot_len, ip_id, frag, ttl, proto, _, src, dst = struct.unpack_from("!BBHHHBBH4s4s", out, 14)
    assert (ver_ihl, tos, tot_len, frag, ttl, proto) == (0x45, 0, len(inner) + 36, 0, 64, 17)
    assert (socket.inet_ntoa(src), socket.inet_ntoa(dst)) == (A_IP, B_IP)
    assert naive_sum(out[14:34]) == 0xFFFF
    # UDP: hashed source port in the ephemeral range, IANA port, length, a valid checksum
    sport, dport, ulen, csum = struct.unpack_from("!HHHH", out, 34)
    assert 32768 <= sport < 60999 and dport == 4789 and ulen == len(inner) + 16
    assert csum != 0 and udp_checksum_ok(out, 34)
    # VXLAN: exactly I flag and VNI 1
    assert out[42:50] == bytes.fromhex("0800000000000100")
    # inner: MACs as flannel.1 sends them, everything else untouched
    assert out[50:62] == pk.mac_bytes(B_VTEP) + pk.mac_bytes(A_VTEP)
    assert out[62:] == inner[12:]
    # the whole frame, built independently with the two values the VTEP chose (source port, IP ID)
    assert out == bytes(vxlan_frame(out[50:], src=A_IP, dst=B_IP, sport=sport, ip_id=ip_id))
    # and dpkt reads it as the same thing
    eth = dpkt.ethernet.Ethernet(out)
    assert isinstance(eth.data.data, dpkt.udp.UDP) and eth.data.data.dport == 4789
    assert bytes(eth.data.data.data)[8:] == out[50:]


def test_input_is_not_modified_and_any_buffer_type_works():
    a = vtep_a()
    peer = to_b(a)
    inner = pod_tcp(b"x" * 100)
    before = bytes(inner)
    outs = [a.encapsulate(kind, peer) for kind in (bytes(inner), bytearray(inner), memoryview(inner))]
    assert bytes(inner) == before
    # only the IP ID (18-19) and so the header checksum (24-25) differ
    assert len({o[:18] for o in outs}) == 1 and len({o[20:24] + o[26:] for o in outs}) == 1


def test_the_super_frame_shortcuts_give_the_same_bytes():
    """What the cached path passes for the segments of one GSO super-frame (the flow's source port,
    the inner sum from the segment's own checksums) changes nothing on the wire."""
    from podnet.core import gso
    frame = pod_tcp(random.Random(7).randbytes(5000))
    segments = gso.segment_tcp4(frame, 1398)
    assert len(segments) == 4
    plain, short = vtep_a(), vtep_a()
    sport = source_port(flow_hash(segments[0]), plain.src_port_range)
    for segment in segments:
        expected = plain.encapsulate(segment, to_b(plain))
        got = short.encapsulate(segment, to_b(short), sport=sport, inner_sum=gso.lco_sum(segment))
        assert got == expected and udp_checksum_ok(got, 34)


def test_ip_id_counts_up_and_the_header_checksum_follows():
    a = vtep_a()
    peer = to_b(a)
    ids = []
    for _ in range(3):
        out = a.encapsulate(pod_tcp(), peer)
        ids.append(struct.unpack_from("!H", out, 18)[0])
        assert naive_sum(out[14:34]) == 0xFFFF
    assert ids[1] == (ids[0] + 1) & 0xFFFF and ids[2] == (ids[1] + 1) & 0xFFFF


def test_udp_checksum_off_sends_zero():
    a = vtep_a(udp_csum=False)
    out = a.encapsulate(pod_tcp(), to_b(a))
    assert out[40:42] == b"\x00\x00"


def test_a_computed_udp_checksum_of_zero_is_sent_as_ffff():
    a = vtep_a()
    peer = to_b(a)
    inner = bytearray(pod_tcp(b"ab"))  # even length: its last two bytes are one 16-bit word of the sum
    assert len(inner) % 2 == 0
    csum = struct.unpack_from("!H", a.encapsulate(inner, peer), 40)[0]
    # adding the checksum to one data word makes the sum 0xffff, i.e. a computed checksum of 0;
    # the sport must not move, so change the TCP payload (not hashed) only
    word = struct.unpack_from("!H", inner, len(inner) - 2)[0] + csum
    struct.pack_into("!H", inner, len(inner) - 2, (word & 0xFFFF) + (word >> 16))
    out = a.encapsulate(inner, peer)
    assert out[40:42] == b"\xff\xff" and udp_checksum_ok(out, 34)


def test_vni_port_and_ttl_are_the_devices():
    a = vtep_a(vni=0xABCDEF, port=8472, ttl=5)
    out = a.encapsulate(pod_tcp(), to_b(a))
    assert out[42:50] == bytes.fromhex("08000000abcdef00")
    assert struct.unpack_from("!H", out, 36)[0] == 8472 and out[22] == 5


@pytest.mark.parametrize("inner_tos, outer_tos", [
    (0x00, 0x00),   # not-ECT
    (0x02, 0x02),   # ECT(0)
    (0x01, 0x01),   # ECT(1)
    (0x03, 0x02),   # CE goes out as ECT(0) (RFC 6040 normal mode, INET_ECN_encapsulate)
    (0xB8, 0x00),   # EF: DSCP is not copied (`tos 0`)
    (0xBB, 0x02),
])
def test_outer_ecn_comes_from_the_inner_packet(inner_tos, outer_tos):
    a = vtep_a()
    inner = pod_tcp()
    inner[15] = inner_tos
    out = a.encapsulate(inner, to_b(a))
    assert out[15] == outer_tos and naive_sum(out[14:34]) == 0xFFFF


def test_mtu_and_short_frames_are_counted_drops():
    a = vtep_a()
    peer = to_b(a)
    fits = pod_tcp(bytes(1450 - 40))          # IP total length 1450: the tunnel MTU exactly
    assert len(fits) == 1464 and isinstance(a.encapsulate(fits, peer), bytes)
    assert len(a.encapsulate(fits, peer)) == 1514  # a full 1500-byte underlay packet
    assert a.encapsulate(pod_tcp(bytes(1450 - 39)), peer) is DropReason.MTU_EXCEEDED
    assert a.encapsulate(b"\x00" * 13, peer) is DropReason.FRAME_TOO_SHORT
    jumbo = vtep_a(underlay_mtu=9000)
    assert jumbo.inner_mtu == 8950
    assert isinstance(jumbo.encapsulate(pod_tcp(bytes(8950 - 40)), jumbo.peer(B_IP, B_VTEP, B_UPLINK)), bytes)
    stats = a.statistics()
    assert stats.tx_packets == 2 and stats.tx_bytes == 2 * 1464
    assert stats.drops == {"mtu_exceeded": 1, "frame_too_short": 1} and stats.dropped == 2


@pytest.mark.parametrize("kw, field", [
    ({"vni": 1 << 24}, "vni"), ({"port": 0}, "port"), ({"ttl": 0}, "ttl"),
    ({"src_port_range": (100, 70000)}, "src_port_range"), ({"underlay_mtu": 100}, "underlay_mtu"),
    ({"local_ip": "300.1.1.1"}, "local_ip"),
])
def test_bad_configuration_names_the_field(kw, field):
    args = {"local_ip": A_IP, "mac": A_VTEP, "underlay_mac": A_UPLINK, **kw}
    with pytest.raises(ConfigError, match=field):
        Vtep(**args)


# ---- the UDP source port ------------------------------------------------------------------------

def test_source_port_is_udp_flow_src_port_arithmetic():
    # hash ^= hash << 16 (u32), then ((hash * (max - min)) >> 32) + min: max itself never comes out
    assert source_port(0) == 32768
    assert source_port(0xFFFF) == 60998          # 0xffff ^ 0xffff0000 = 0xffffffff
    assert source_port(0x00010000) == 32768 + ((0x00010000 * 28231) >> 32)
    assert source_port(0x12345678, (49152, 65535)) == 49152 + (((0x12345678 ^ 0x56780000) * 16383) >> 32)


def test_both_directions_of_a_flow_get_one_port_and_flows_spread():
    a = vtep_a()
    peer = to_b(a)
    forward = a.encapsulate(F.tcp("10.244.1.5", "10.244.2.7", 40000, 80), peer)
    reverse = a.encapsulate(F.tcp("10.244.2.7", "10.244.1.5", 80, 40000), peer)
    assert forward[34:36] == reverse[34:36]
    ports = {source_port(flow_hash(F.udp("10.244.1.5", "10.244.2.7", 1024 + i, 53))) for i in range(4000)}
    assert min(ports) >= 32768 and max(ports) <= 60998
    assert len(ports) > 3500  # 4000 flows over 28231 ports: few collisions
    # a quarter of the range each way: no clustering
    quarters = [sum(32768 + q * 7058 <= p < 32768 + (q + 1) * 7058 for p in ports) for q in range(4)]
    assert min(quarters) > 700, quarters


def test_what_the_hash_covers():
    base = F.udp("10.244.1.5", "10.244.2.7", 1000, 53)
    assert flow_hash(base) == flow_hash(F.udp("10.244.1.5", "10.244.2.7", 1000, 53, payload=b"other"))
    assert flow_hash(base) != flow_hash(F.udp("10.244.1.5", "10.244.2.7", 1001, 53))
    assert flow_hash(base) != flow_hash(base, seed=1)
    # fragments: no ports (later fragments have none), so every fragment of a datagram hashes alike
    frag1 = bytearray(base)
    frag1[20] = 0x20  # MF
    frag2 = bytearray(F.udp("10.244.1.5", "10.244.2.7", 7777, 9999))
    frag2[20:22] = b"\x00\x10"  # offset 128
    assert flow_hash(frag1) == flow_hash(frag2)
    # ICMP: addresses only; non-IP: the MACs and the ethertype
    assert flow_hash(F.icmp_echo("10.244.1.5", "10.244.2.7", ident=1)) == \
        flow_hash(F.icmp_echo("10.244.1.5", "10.244.2.7", ident=2))
    arp = F.arp_request("10.244.1.5", "10.244.1.0")
    assert flow_hash(arp) == flow_hash(bytes(arp)) != flow_hash(F.arp_request("10.244.1.6", "10.244.1.0",
                                                                               sender_mac="02:00:00:00:00:0c"))


def test_source_ports_do_not_depend_on_the_process():
    code = ("from podnet.core.overlay.vxlan import flow_hash, source_port; from podnet.testing import frames as F;"
            "print([source_port(flow_hash(f)) for f in (F.udp('10.244.1.5', '10.244.2.7', 1, 2),"
            " F.arp_request('10.244.1.5', '10.244.1.0'))])")
    seen = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(seen) == 1


# ---- decapsulation ------------------------------------------------------------------------------

def test_round_trip():
    a, b = vtep_a(), vtep_b()
    inner = pod_tcp(b"payload" * 100)
    out = a.encapsulate(inner, to_b(a))
    got = b.decapsulate(out)
    assert isinstance(got, Decapsulated)
    assert bytes(got.inner) == bytes(out[50:])
    assert (got.remote_ip, got.source_port, got.vni) == (pk.ip_int(A_IP), struct.unpack_from("!H", out, 34)[0], 1)
    assert b.statistics().rx_packets == 1 and b.statistics().rx_bytes == len(inner)


def test_zero_udp_checksum_ip_options_and_ethernet_padding_are_accepted():
    b = vtep_b()
    inner = inner_to_b()[:60]
    for frame in (vxlan_frame(inner, src=A_IP, dst=B_IP, csum=False, dport=4789),
                  vxlan_frame(inner, ip_options=b"\x01\x01\x01\x00"),
                  vxlan_frame(inner, padding=b"\x00" * 20)):
        frame[0:6], frame[6:12] = pk.mac_bytes(B_UPLINK), pk.mac_bytes(A_UPLINK)
        got = b.decapsulate(frame)
        assert isinstance(got, Decapsulated) and bytes(got.inner) == inner, frame.hex()


def test_not_vxlan_for_us_is_none_and_not_counted():
    b = vtep_b()
    ok = vxlan_frame(inner_to_b())
    other_port = vxlan_frame(inner_to_b(), dport=4790)
    other_dst = vxlan_frame(inner_to_b(), dst="192.0.2.3")
    later_fragment = vxlan_frame(inner_to_b(), frag=0x0010)
    for frame in (F.arp_request("192.0.2.1", "192.0.2.2"), F.tcp(A_IP, B_IP, 1, 4789), F.udp(A_IP, B_IP, 1, 53),
                  other_port, other_dst, later_fragment, b"\x00" * 20):
        assert b.decapsulate(frame) is None
    assert isinstance(b.decapsulate(ok), Decapsulated)
    assert b.statistics().dropped == 0


def _resum_ip(frame: bytearray) -> bytearray:
    ihl = (frame[14] & 0x0F) * 4
    frame[24:26] = b"\x00\x00"
    frame[24:26] = struct.pack("!H", naive_checksum(bytes(frame[14:14 + ihl])))
    return frame


def _bad_ip_checksum(frame):
    frame[24] ^= 0xFF
    return frame


def _tot_len_beyond(frame):
    struct.pack_into("!H", frame, 16, len(frame))
    return _resum_ip(frame)


def _bad_udp_checksum(frame):
    frame[-1] ^= 0x01
    return frame


INNER = inner_to_b()


@pytest.mark.parametrize("frame, reason", [
    (_bad_ip_checksum(vxlan_frame(INNER)), DropReason.IPV4_BAD_CHECKSUM),
    (_tot_len_beyond(vxlan_frame(INNER)), DropReason.IPV4_BAD_TOTAL_LENGTH),
    (vxlan_frame(INNER, frag=0x2000), DropReason.VXLAN_OUTER_FRAGMENT),          # MF: the first of several
    (vxlan_frame(INNER, frag=0x6000), DropReason.VXLAN_OUTER_FRAGMENT),
    (vxlan_frame(INNER, ulen_delta=1, csum=False), DropReason.UDP_BAD_LENGTH),
    (vxlan_frame(INNER, ulen_delta=-len(INNER) - 9, csum=False), DropReason.UDP_BAD_LENGTH),  # below 8
    (_bad_udp_checksum(vxlan_frame(INNER)), DropReason.UDP_BAD_CHECKSUM),
    (vxlan_frame(INNER, ulen_delta=-len(INNER) - 1, csum=False), DropReason.VXLAN_TRUNCATED),  # 7 VXLAN bytes
    (vxlan_frame(INNER, flags=b"\x00\x00\x00\x00"), DropReason.VXLAN_INVALID_HDR),
    (vxlan_frame(INNER, flags=b"\x0c\x00\x00\x00"), DropReason.VXLAN_INVALID_HDR),   # another flag bit
    (vxlan_frame(INNER, flags=b"\x88\x00\x00\x00"), DropReason.VXLAN_INVALID_HDR),   # GBP's G bit, GBP off
    (vxlan_frame(INNER, flags=b"\x08\x00\x00\x01"), DropReason.VXLAN_INVALID_HDR),
    (vxlan_frame(INNER, flags=b"\x08\x40\x00\x00"), DropReason.VXLAN_INVALID_HDR),
    (vxlan_frame(INNER, last=0x01), DropReason.VXLAN_INVALID_HDR),
    (vxlan_frame(INNER, vni=2), DropReason.VXLAN_VNI_NOT_FOUND),
    (vxlan_frame(INNER, vni=2, last=0xFF), DropReason.VXLAN_VNI_NOT_FOUND),          # the kernel looks up the VNI first
    (vxlan_frame(INNER, vni=2, flags=b"\x00\x00\x00\x00"), DropReason.VXLAN_INVALID_HDR),  # ... after the I flag
    (vxlan_frame(INNER[:13]), DropReason.VXLAN_TRUNCATED),
    (vxlan_frame(INNER[:33]), DropReason.VXLAN_TRUNCATED),                           # IPv4 inner, no full header
    (vxlan_frame(bytes(F.icmp_echo("10.244.2.7", "10.244.1.5", src_mac=B_VTEP, dst_mac=B_VTEP))),
     DropReason.VXLAN_LOCAL_MAC),
], ids=["ip-checksum", "ip-tot-len", "first-fragment", "df-mf", "udp-len-long", "udp-len-short",
        "udp-checksum", "vxlan-7-bytes", "flags-zero", "flags-extra-bit", "flags-gbp",
        "reserved-byte-3", "reserved-byte-1", "reserved-last-byte", "vni", "vni-before-reserved",
        "i-flag-before-vni", "inner-13-bytes", "inner-ipv4-33-bytes", "own-mac"])
def test_malformed_is_a_counted_drop(frame, reason):
    b = vtep_b()
    assert b.decapsulate(bytes(frame)) is reason
    assert b.statistics().drops == {reason.value: 1} and b.statistics().rx_packets == 0


def test_a_checksum_the_kernel_left_partial_is_accepted_when_the_metadata_says_so():
    # the kernel's vxlan device over a veth hands over CHECKSUM_PARTIAL frames: the UDP checksum
    # field holds the folded pseudo-header sum, which a NIC would have completed
    b = vtep_b()
    frame = vxlan_frame(inner_to_b(), csum=False)
    ulen = struct.unpack_from("!H", frame, 38)[0]
    struct.pack_into("!H", frame, 40, naive_sum(frame[26:34] + struct.pack("!BBH", 0, 17, ulen)))
    assert b.decapsulate(frame) is DropReason.UDP_BAD_CHECKSUM
    assert isinstance(b.decapsulate(frame, checksum_unnecessary=True), Decapsulated)


def test_inner_arp_frames_are_fine_and_short_non_ip_inner_frames_too():
    b = vtep_b()
    arp = bytes(F.arp_request("10.244.2.0", "10.244.1.0", sender_mac=A_VTEP))
    got = b.decapsulate(vxlan_frame(arp))
    assert isinstance(got, Decapsulated) and bytes(got.inner) == arp
    bare = bytes.fromhex("0a5800000202") + pk.mac_bytes(A_VTEP) + b"\x88\xb5"  # 14 bytes, no payload
    assert isinstance(b.decapsulate(vxlan_frame(bare)), Decapsulated)


@pytest.mark.parametrize("outer, inner, result", [
    (0x00, 0x00, 0x00), (0x01, 0x00, 0x00), (0x02, 0x00, 0x00),   # ECT over not-ECT: logged, accepted
    (0x03, 0x00, None),                                            # CE over not-ECT: dropped
    (0x03, 0x02, 0x03), (0x03, 0x01, 0x03), (0x03, 0x03, 0x03),   # CE copied into an ECT packet
    (0x02, 0x01, 0x01), (0x00, 0x02, 0x02),
])
def test_ecn_decapsulation_follows_rfc_6040(outer, inner, result):
    b = vtep_b()
    inner_frame = bytearray(INNER)
    inner_frame[15] = 0xB8 | inner
    inner_frame[24:26] = b"\x00\x00"
    inner_frame[24:26] = struct.pack("!H", naive_checksum(bytes(inner_frame[14:34])))
    got = b.decapsulate(vxlan_frame(bytes(inner_frame), tos=outer))
    if result is None:
        assert got is DropReason.IP_TUNNEL_ECN
        return
    assert isinstance(got, Decapsulated)
    assert got.inner[15] == 0xB8 | result
    assert naive_sum(bytes(got.inner[14:34])) == 0xFFFF  # the inner header checksum follows the CE mark


def test_random_damage_never_raises():
    rng = random.Random(7)
    b = vtep_b()
    good = bytes(vtep_a().encapsulate(pod_tcp(b"z" * 200), vtep_a().peer(B_IP, B_VTEP, B_UPLINK)))
    outcomes = set()
    for _ in range(3000):
        frame = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(14, 70)] = rng.randrange(256)
        if rng.random() < 0.3:
            del frame[rng.randrange(0, len(frame)):]
        got = b.decapsulate(frame)
        assert got is None or isinstance(got, (DropReason, Decapsulated))
        outcomes.add(type(got).__name__ if not isinstance(got, DropReason) else got.value)
    assert {"NoneType", "Decapsulated", "ipv4_bad_checksum", "udp_bad_checksum"} <= outcomes


def test_encapsulate_then_decapsulate_with_every_option():
    for kw in ({"vni": 4096, "port": 8472}, {"udp_csum": False}, {"src_port_range": (49152, 65535)}):
        a, b = vtep_a(**kw), vtep_b(**kw)
        out = a.encapsulate(pod_tcp(), to_b(a))
        got = b.decapsulate(out)
        assert isinstance(got, Decapsulated) and got.vni == a.vni, kw
        low, high = a.src_port_range
        assert low <= got.source_port < high


def test_module_constants():
    assert (vxlan.IANA_PORT, vxlan.LINUX_DEFAULT_PORT, vxlan.FLANNEL_PORT) == (4789, 8472, 8472)
    assert vxlan.OUTER_HLEN == 50 and vxlan.VXLAN_OVERHEAD == 50 and vxlan.EPHEMERAL_PORTS == (32768, 60999)


def test_damage_anywhere_is_none_a_counted_drop_or_an_inner_frame_inside_the_datagram():
    """Fuzz over the whole frame (outer and inner headers, payload), truncated or extended, with and
    without checksum_unnecessary: every DropReason is counted once, None counts nothing, and an inner
    frame is always whole Ethernet, inside the UDP datagram's length."""
    rng = random.Random(12)
    b = vtep_b()
    ect_inner = bytearray(inner_to_b())
    ect_inner[15] |= 0x02
    ect_inner[24:26] = b"\x00\x00"
    ect_inner[24:26] = struct.pack("!H", naive_checksum(bytes(ect_inner[14:34])))
    bases = [vxlan_frame(inner_to_b()), vxlan_frame(inner_to_b(), csum=False, ip_options=b"\x01\x01\x01\x00"),
             vxlan_frame(bytes(ect_inner), tos=0x03), vxlan_frame(inner_to_b(), tos=0x03, csum=False),
             vxlan_frame(inner_to_b(payload=bytes(3000)), padding=bytes(7)),
             vxlan_frame(bytes(F.arp_request("10.244.1.5", "10.244.2.7", A_VTEP)))]
    outcomes = set()
    for _ in range(5000):
        frame = bytearray(rng.choice(bases))
        for _ in range(rng.randint(0, 3)):
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.3:
            del frame[rng.randrange(len(frame)):]
        elif rng.random() < 0.1:
            frame += rng.randbytes(rng.randrange(1, 64))
        before = b.statistics()
        got = b.decapsulate(frame, rng.random() < 0.3)
        after = b.statistics()
        if isinstance(got, DropReason):
            assert after.dropped == before.dropped + 1 and after.drops[got.value] == before.drops.get(got.value, 0) + 1
            outcomes.add(got.value)
            continue
        assert after.dropped == before.dropped
        if got is None:
            assert after == before
            outcomes.add("none")
            continue
        assert isinstance(got, Decapsulated) and after.rx_packets == before.rx_packets + 1
        ihl = (frame[14] & 0x0F) * 4
        udp_len = frame[14 + ihl + 4] << 8 | frame[14 + ihl + 5]
        assert 14 <= len(got.inner) == udp_len - 16 and len(got.inner) == after.rx_bytes - before.rx_bytes
        outcomes.add("decapsulated")
    assert {"none", "decapsulated", "ipv4_bad_checksum", "udp_bad_checksum", "vxlan_invalid_hdr",
            "vxlan_vni_not_found", "ip_tunnel_ecn", "ipv4_bad_total_length"} <= outcomes
