"""Fixed-offset parsing and validation, and the frames podnet originates, decoded by dpkt."""

from __future__ import annotations

import random
import socket
import struct

import dpkt
import pytest

from reference import fix_ip_checksum, naive_checksum
from podnet.core import packet as pk
from podnet.core.packet import DropReason, IPv4Info
from podnet.testing import frames as F

OUR_MAC = bytes.fromhex("eeeeeeeeeeee")
OUR_IP = pk.ip_int("169.254.1.1")
A_MAC = bytes.fromhex("02000000000a")


def with_fields(frame: bytearray, *, ver_ihl=None, tot_len=None, frag=None, ttl=None, proto=None,
                dst=None, truncate_to=None) -> bytearray:
    """A copy with IPv4 header fields changed and the header checksum made valid again."""
    out = bytearray(frame)
    if ver_ihl is not None:
        out[14] = ver_ihl
    if tot_len is not None:
        struct.pack_into("!H", out, 16, tot_len)
    if frag is not None:
        struct.pack_into("!H", out, 20, frag)
    if ttl is not None:
        out[22] = ttl
    if proto is not None:
        out[23] = proto
    if dst is not None:
        out[30:34] = socket.inet_aton(dst)
    if truncate_to is not None:
        del out[truncate_to:]
    ihl = (out[14] & 0x0F) * 4
    if len(out) >= 14 + max(ihl, 20):
        out[24:26] = b"\x00\x00"
        out[24:26] = struct.pack("!H", naive_checksum(bytes(out[14:14 + max(ihl, 20)])))
    return out


def tcp_with_options() -> bytearray:
    """TCP in an IPv4 header with 4 bytes of options (IHL 6)."""
    segment = dpkt.tcp.TCP(sport=1234, dport=443, flags=dpkt.tcp.TH_SYN, data=b"")
    ip = dpkt.ip.IP(src=socket.inet_aton("10.244.0.2"), dst=socket.inet_aton("10.244.0.3"), p=6, ttl=9,
                    opts=b"\x01\x01\x01\x00", hl=6, data=segment)
    return bytearray(bytes(dpkt.ethernet.Ethernet(src=A_MAC, dst=OUR_MAC, type=0x0800, data=ip)))


def icmp_error_frame(icmp_type: int, code: int = 0) -> bytearray:
    """An ICMP error (type/code) from 10.244.0.2 quoting some datagram, as dpkt builds it."""
    inner = bytes(dpkt.ip.IP(src=socket.inet_aton("10.244.0.9"), dst=socket.inet_aton("10.244.0.2"), p=17,
                             data=dpkt.udp.UDP(sport=53, dport=40000, ulen=8)))
    icmp = dpkt.icmp.ICMP(type=icmp_type, code=code, data=b"\x00\x00\x00\x00" + inner)
    ip = dpkt.ip.IP(src=socket.inet_aton("10.244.0.2"), dst=socket.inet_aton("10.244.0.3"), p=1, data=icmp)
    return bytearray(bytes(dpkt.ethernet.Ethernet(src=A_MAC, dst=OUR_MAC, type=0x0800, data=ip)))


def icmp_frame(icmp_type: int, dst: str = "10.244.0.3", dst_mac: bytes = OUR_MAC) -> bytearray:
    icmp = dpkt.icmp.ICMP(type=icmp_type, code=0, data=b"\x00\x01\x00\x01" + b"x" * 12)
    ip = dpkt.ip.IP(src=socket.inet_aton("10.244.0.2"), dst=socket.inet_aton(dst), p=1, data=icmp)
    return bytearray(bytes(dpkt.ethernet.Ethernet(src=A_MAC, dst=dst_mac, type=0x0800, data=ip)))


def parsed(frame) -> IPv4Info:
    info = pk.parse_ipv4(frame)
    assert isinstance(info, IPv4Info), info
    return info


def icmp_ok(ip: dpkt.ip.IP) -> bool:
    return naive_checksum(bytes(ip.data)) == 0


def ip_header_ok(ip: dpkt.ip.IP) -> bool:
    return naive_checksum(bytes(ip)[:ip.hl * 4]) == 0


# --- parse_ipv4: good frames -------------------------------------------------------------------

def test_parse_ipv4_reads_what_dpkt_reads():
    frame = F.tcp("10.244.0.2", "10.244.0.3", sport=41000, dport=8080, ttl=17, payload=b"abc")
    info = parsed(frame)
    ip = F.decode(frame).data
    assert info.ihl == 20 and info.l4 == 34
    assert info.total_length == ip.len == len(frame) - 14
    assert (info.ttl, info.proto) == (17, pk.IPPROTO_TCP)
    assert info.src == struct.unpack("!I", ip.src)[0] == pk.ip_int("10.244.0.2")
    assert info.dst == pk.ip_int("10.244.0.3")
    assert (info.sport, info.dport) == (41000, 8080)
    assert not info.is_fragment and info.first_fragment


def test_parse_ipv4_udp_and_icmp_ports():
    udp = parsed(F.udp("10.244.0.2", "10.96.0.10", sport=5353, dport=53, payload=b"q"))
    assert (udp.proto, udp.sport, udp.dport) == (pk.IPPROTO_UDP, 5353, 53)
    echo = F.icmp_echo("10.244.0.2", "169.254.1.1")
    info = parsed(echo)
    assert info.proto == pk.IPPROTO_ICMP
    assert info.sport == pk.ICMP_ECHO << 8 | 0          # type << 8 | code
    assert info.dport == struct.unpack_from("!H", echo, 36)[0]  # the ICMP checksum


def test_parse_ipv4_with_options_finds_l4_after_them():
    frame = tcp_with_options()
    info = parsed(frame)
    assert (info.ihl, info.l4) == (24, 38)
    assert (info.sport, info.dport, info.ttl) == (1234, 443, 9)


def test_ethernet_padding_after_total_length_is_accepted():
    frame = F.udp("10.244.0.2", "10.244.0.3", sport=1, dport=2)   # 42 bytes; the wire pads to 60
    padded = frame + b"\x00" * (60 - len(frame))
    info = parsed(padded)
    assert info.total_length == 28
    assert (info.sport, info.dport) == (1, 2)
    junk_padded = frame + bytes(range(1, 19))
    assert parsed(junk_padded).total_length == 28


def test_fragments():
    base = F.udp("10.244.0.2", "10.244.0.3", sport=1111, dport=2222, payload=b"z" * 40)
    first = parsed(with_fields(base, frag=0x2000))              # MF, offset 0
    assert first.is_fragment and first.first_fragment
    assert (first.sport, first.dport) == (1111, 2222)

    later = with_fields(base, frag=0x2000 | 185)                # MF, offset 185 * 8
    info = parsed(later)
    assert info.is_fragment and not info.first_fragment
    assert (info.sport, info.dport) == (0, 0)                   # its first bytes are payload, not ports

    last = parsed(with_fields(base, frag=185))                  # last fragment: offset, no MF
    assert last.is_fragment and not last.first_fragment and (last.sport, last.dport) == (0, 0)

    tiny_tail = with_fields(base, frag=185, tot_len=24, truncate_to=14 + 24)   # 4 payload bytes
    assert parsed(tiny_tail).total_length == 24                 # no L4 header expected in it

    df = parsed(with_fields(base, frag=0x4000))                 # DF alone is not a fragment
    assert not df.is_fragment and df.first_fragment


# --- parse_ipv4: every drop reason ---------------------------------------------------------------

BASE = F.tcp("10.244.0.2", "10.244.0.3", payload=b"0123456789")


@pytest.mark.parametrize("frame, reason", [
    pytest.param(BASE[:14 + 19], DropReason.FRAME_TOO_SHORT, id="too-short"),
    pytest.param(BASE[:14], DropReason.FRAME_TOO_SHORT, id="ethernet-only"),
    pytest.param(with_fields(BASE, ver_ihl=0x65), DropReason.IPV4_BAD_VERSION, id="version-6"),
    pytest.param(with_fields(BASE, ver_ihl=0x05), DropReason.IPV4_BAD_VERSION, id="version-0"),
    pytest.param(with_fields(BASE, ver_ihl=0x44), DropReason.IPV4_BAD_IHL, id="ihl-4"),
    pytest.param(with_fields(BASE, ver_ihl=0x40), DropReason.IPV4_BAD_IHL, id="ihl-0"),
    pytest.param(with_fields(BASE, ver_ihl=0x4F, truncate_to=14 + 59), DropReason.IPV4_BAD_IHL,
                 id="ihl-beyond-frame"),
    pytest.param(with_fields(BASE, tot_len=19), DropReason.IPV4_BAD_TOTAL_LENGTH, id="tot-len-below-ihl"),
    pytest.param(with_fields(tcp_with_options(), tot_len=22), DropReason.IPV4_BAD_TOTAL_LENGTH,
                 id="tot-len-below-ihl-with-options"),
    pytest.param(with_fields(BASE, tot_len=len(BASE) - 14 + 1), DropReason.IPV4_BAD_TOTAL_LENGTH,
                 id="tot-len-beyond-frame"),
    pytest.param(F.corrupt_ipv4_checksum(BASE), DropReason.IPV4_BAD_CHECKSUM, id="bad-checksum"),
    pytest.param(with_fields(BASE, tot_len=20 + 19, truncate_to=14 + 39), DropReason.L4_TRUNCATED,
                 id="tcp-19-bytes"),
    pytest.param(with_fields(F.udp("10.244.0.2", "10.244.0.3"), tot_len=27, truncate_to=14 + 27),
                 DropReason.L4_TRUNCATED, id="udp-7-bytes"),
    pytest.param(with_fields(F.icmp_echo("10.244.0.2", "10.244.0.3"), tot_len=27, truncate_to=14 + 27),
                 DropReason.L4_TRUNCATED, id="icmp-7-bytes"),
    pytest.param(with_fields(BASE, tot_len=20 + 19), DropReason.L4_TRUNCATED,
                 id="tcp-cut-by-total-length-not-by-frame"),
])
def test_parse_ipv4_drop_reasons(frame, reason):
    assert pk.parse_ipv4(frame) is reason


def test_a_bad_checksum_is_found_in_the_options_too():
    frame = tcp_with_options()
    frame[14 + 21] ^= 0x01
    assert pk.parse_ipv4(frame) is DropReason.IPV4_BAD_CHECKSUM


@pytest.mark.parametrize("proto, need", [(pk.IPPROTO_TCP, 20), (pk.IPPROTO_UDP, 8), (pk.IPPROTO_ICMP, 8)])
def test_l4_minimum_is_exact(proto, need):
    frame = with_fields(BASE, proto=proto)
    assert isinstance(pk.parse_ipv4(with_fields(frame, tot_len=20 + need)), IPv4Info)
    assert pk.parse_ipv4(with_fields(frame, tot_len=20 + need - 1)) is DropReason.L4_TRUNCATED


def test_other_protocols_need_no_l4_header():
    sctp = with_fields(BASE, proto=pk.IPPROTO_SCTP, tot_len=20, truncate_to=34)
    info = parsed(sctp)
    assert (info.proto, info.sport, info.dport) == (pk.IPPROTO_SCTP, 0, 0)


def test_parse_ipv4_never_raises_on_truncations_of_a_good_frame():
    for frame in (BASE, tcp_with_options(), F.icmp_echo("10.244.0.2", "169.254.1.1")):
        for cut in range(len(frame) + 1):
            result = pk.parse_ipv4(frame[:cut])
            if cut < 34:
                assert result is DropReason.FRAME_TOO_SHORT
            else:
                assert isinstance(result, IPv4Info | DropReason)


# --- parse_arp --------------------------------------------------------------------------------------

def test_parse_arp_request():
    arp = pk.parse_arp(F.arp_request("10.244.0.2", "169.254.1.1"))
    assert arp == pk.ArpInfo(op=1, sha=A_MAC, spa=pk.ip_int("10.244.0.2"), tha=b"\x00" * 6,
                             tpa=pk.ip_int("169.254.1.1"))


def test_parse_arp_reply_and_padding():
    reply = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REPLY, sha=OUR_MAC, spa=socket.inet_aton("10.0.0.1"),
                         tha=A_MAC, tpa=socket.inet_aton("10.0.0.2"))
    frame = bytes(dpkt.ethernet.Ethernet(src=OUR_MAC, dst=A_MAC, type=0x0806, data=reply)) + b"\x00" * 18
    arp = pk.parse_arp(frame)
    assert (arp.op, arp.sha, arp.spa, arp.tha, arp.tpa) == (2, OUR_MAC, pk.ip_int("10.0.0.1"), A_MAC,
                                                            pk.ip_int("10.0.0.2"))


def _arp_with(offset: int, fmt: str, value: int) -> bytearray:
    frame = F.arp_request("10.244.0.2", "169.254.1.1")
    struct.pack_into(fmt, frame, offset, value)
    return frame


@pytest.mark.parametrize("frame, reason", [
    pytest.param(F.arp_request("10.244.0.2", "169.254.1.1")[:41], DropReason.FRAME_TOO_SHORT, id="41-bytes"),
    pytest.param(F.arp_request("10.244.0.2", "169.254.1.1")[:14], DropReason.FRAME_TOO_SHORT, id="no-arp"),
    pytest.param(_arp_with(14, "!H", 6), DropReason.ARP_MALFORMED, id="htype-ieee802"),
    pytest.param(_arp_with(16, "!H", 0x86DD), DropReason.ARP_MALFORMED, id="ptype-ipv6"),
    pytest.param(_arp_with(18, "!B", 8), DropReason.ARP_MALFORMED, id="hlen-8"),
    pytest.param(_arp_with(19, "!B", 16), DropReason.ARP_MALFORMED, id="plen-16"),
    pytest.param(_arp_with(20, "!H", 3), DropReason.ARP_MALFORMED, id="op-rarp-request"),
    pytest.param(_arp_with(20, "!H", 0), DropReason.ARP_MALFORMED, id="op-0"),
])
def test_parse_arp_malformed(frame, reason):
    assert pk.parse_arp(frame) is reason


# --- frames podnet originates, decoded by dpkt ----------------------------------------------------

def test_build_arp_reply_decoded_by_dpkt():
    request = pk.parse_arp(F.arp_request("10.244.0.2", "169.254.1.1"))
    eth = F.decode(pk.build_arp_reply(OUR_MAC, OUR_IP, request))
    assert (eth.dst, eth.src, eth.type) == (A_MAC, OUR_MAC, dpkt.ethernet.ETH_TYPE_ARP)
    arp = eth.data
    assert isinstance(arp, dpkt.arp.ARP)
    assert (arp.hrd, arp.pro, arp.hln, arp.pln, arp.op) == (1, 0x0800, 6, 4, dpkt.arp.ARP_OP_REPLY)
    assert arp.sha == OUR_MAC and socket.inet_ntoa(arp.spa) == "169.254.1.1"
    assert arp.tha == A_MAC and socket.inet_ntoa(arp.tpa) == "10.244.0.2"


def test_build_arp_request_decoded_by_dpkt():
    eth = F.decode(pk.build_arp_request(OUR_MAC, OUR_IP, pk.ip_int("10.244.0.7")))
    assert eth.dst == b"\xff" * 6 and eth.src == OUR_MAC
    assert eth.data.op == dpkt.arp.ARP_OP_REQUEST
    assert socket.inet_ntoa(eth.data.tpa) == "10.244.0.7" and socket.inet_ntoa(eth.data.spa) == "169.254.1.1"


@pytest.mark.parametrize("payload", [b"", b"p", b"podnet", bytes(range(256)) * 3 + b"odd"])
def test_build_icmp_echo_reply_decoded_by_dpkt(payload):
    request = F.icmp_echo("10.244.0.2", "169.254.1.1", ident=0xBEEF, seq=4242, payload=payload)
    padded = request + b"\xaa" * max(0, 60 - len(request))   # padding must not be echoed
    info = parsed(padded)
    eth = F.decode(pk.build_icmp_echo_reply(padded, info, OUR_MAC))
    assert (eth.dst, eth.src) == (A_MAC, OUR_MAC)
    ip = eth.data
    assert socket.inet_ntoa(ip.src) == "169.254.1.1" and socket.inet_ntoa(ip.dst) == "10.244.0.2"
    assert ip.p == dpkt.ip.IP_PROTO_ICMP and ip.ttl > 1
    assert ip_header_ok(ip) and ip.len == len(bytes(ip))
    icmp = ip.data
    assert (icmp.type, icmp.code) == (dpkt.icmp.ICMP_ECHOREPLY, 0)
    assert icmp_ok(ip)
    assert (icmp.data.id, icmp.data.seq, icmp.data.data) == (0xBEEF, 4242, payload)


@pytest.mark.parametrize("icmp_type, code", [(pk.ICMP_TIME_EXCEEDED, pk.ICMP_EXC_TTL),
                                             (pk.ICMP_DEST_UNREACH, pk.ICMP_NET_UNREACH),
                                             (pk.ICMP_DEST_UNREACH, pk.ICMP_HOST_UNREACH),
                                             (pk.ICMP_DEST_UNREACH, pk.ICMP_PORT_UNREACH)])
def test_build_icmp_error_decoded_by_dpkt(icmp_type, code):
    offending = F.tcp("10.244.0.2", "10.99.0.1", sport=33333, dport=80, payload=b"P" * 100, ttl=1, seq=0xA1B2C3D4)
    info = parsed(offending)
    eth = F.decode(pk.build_icmp_error(offending, info, icmp_type, code, OUR_MAC, OUR_IP))
    assert (eth.dst, eth.src) == (A_MAC, OUR_MAC)
    ip = eth.data
    assert socket.inet_ntoa(ip.src) == "169.254.1.1" and socket.inet_ntoa(ip.dst) == "10.244.0.2"
    assert ip_header_ok(ip) and icmp_ok(ip)
    icmp = ip.data
    assert (icmp.type, icmp.code) == (icmp_type, code)
    body = bytes(icmp)[4:]
    assert body[:4] == b"\x00\x00\x00\x00"                  # unused
    quoted = body[4:]
    assert quoted == bytes(offending[14:14 + 20 + 8])        # IP header + 64 bits (RFC 792)
    inner = dpkt.ip.IP(quoted)
    assert struct.unpack("!HHI", bytes(quoted[20:28])) == (33333, 80, 0xA1B2C3D4)
    assert inner.ttl == 1


def test_build_icmp_error_quotes_options_and_never_beyond_the_datagram():
    with_opts = tcp_with_options()
    info = parsed(with_opts)
    ip = F.decode(pk.build_icmp_error(with_opts, info, 11, 0, OUR_MAC, OUR_IP)).data
    assert bytes(ip.data)[8:] == bytes(with_opts[14:14 + 24 + 8])
    assert icmp_ok(ip)

    # a 24-byte datagram (4 bytes past the header, protocol 99) in a frame padded to 60 bytes
    short = with_fields(F.udp("10.244.0.2", "10.99.0.1"), proto=99, tot_len=24, truncate_to=14 + 24)
    padded = short + b"\xcc" * (60 - len(short))
    info = parsed(padded)
    ip = F.decode(pk.build_icmp_error(padded, info, 3, 0, OUR_MAC, OUR_IP)).data
    assert bytes(ip.data)[8:] == bytes(short[14:])          # the Ethernet padding is not quoted
    assert len(bytes(ip.data)) == 8 + 24
    assert icmp_ok(ip)


def test_icmp_checksum_ok():
    echo = F.icmp_echo("10.244.0.2", "169.254.1.1", payload=b"odd")
    assert pk.icmp_checksum_ok(echo, parsed(echo))
    padded = echo + b"\x01" * 20                               # padding is not part of the message
    assert pk.icmp_checksum_ok(padded, parsed(padded))
    for offset in range(34, len(echo)):
        bad = bytearray(echo)
        bad[offset] ^= 0x10
        assert not pk.icmp_checksum_ok(bad, parsed(bad)), offset


# --- should_send_icmp_error (RFC 1122 §3.2.2) ------------------------------------------------------

def test_icmp_error_about_ordinary_datagrams():
    assert pk.should_send_icmp_error(BASE, parsed(BASE))
    udp = F.udp("10.244.0.2", "10.99.0.1")
    assert pk.should_send_icmp_error(udp, parsed(udp))
    echo = F.icmp_echo("10.244.0.2", "10.99.0.1")
    assert pk.should_send_icmp_error(echo, parsed(echo))


@pytest.mark.parametrize("icmp_type", [3, 4, 5, 11, 12])
def test_no_icmp_error_about_an_icmp_error(icmp_type):
    frame = icmp_error_frame(icmp_type)
    assert not pk.should_send_icmp_error(frame, parsed(frame))


@pytest.mark.parametrize("icmp_type", [8, 13, 15, 17])
def test_icmp_error_about_icmp_queries(icmp_type):
    frame = icmp_frame(icmp_type)
    assert pk.should_send_icmp_error(frame, parsed(frame))


@pytest.mark.parametrize("dst", ["223.255.255.255", "240.0.0.1", "10.244.0.255"])
def test_icmp_error_about_unicast_next_to_the_multicast_range(dst):
    frame = F.udp("10.244.0.2", dst)
    assert pk.should_send_icmp_error(frame, parsed(frame))


@pytest.mark.parametrize("icmp_type", [1, 2, 6, 7, 9, 10, 19, 42, 255])
def test_no_icmp_error_about_icmp_types_linux_classes_as_errors(icmp_type):
    frame = icmp_frame(icmp_type)
    assert not pk.should_send_icmp_error(frame, parsed(frame))


@pytest.mark.parametrize("icmp_type", [0, 14, 16, 18])
def test_icmp_error_about_icmp_query_replies(icmp_type):
    # echo/timestamp/information/mask replies are not errors (RFC 1122 §3.2.2; Linux and BSD answer them)
    frame = icmp_frame(icmp_type)
    assert pk.should_send_icmp_error(frame, parsed(frame))


def test_no_icmp_error_about_a_non_first_fragment():
    base = F.udp("10.244.0.2", "10.99.0.1", payload=b"f" * 40)
    later = with_fields(base, frag=0x2000 | 3)
    assert not pk.should_send_icmp_error(later, parsed(later))
    first = with_fields(base, frag=0x2000)
    assert pk.should_send_icmp_error(first, parsed(first))


@pytest.mark.parametrize("dst_mac", ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01"])
def test_no_icmp_error_about_a_link_layer_broadcast_or_multicast(dst_mac):
    frame = F.udp("10.244.0.2", "10.99.0.1", dst_mac=dst_mac)
    assert not pk.should_send_icmp_error(frame, parsed(frame))


@pytest.mark.parametrize("dst", ["255.255.255.255", "224.0.0.0", "224.0.0.251", "239.255.255.255"])
def test_no_icmp_error_about_an_ip_broadcast_or_multicast(dst):
    frame = F.udp("10.244.0.2", dst)       # unicast to the gateway MAC, as a pod's default route sends it
    assert not pk.should_send_icmp_error(frame, parsed(frame))


@pytest.mark.parametrize("src", ["0.0.0.0", "127.0.0.1", "255.255.255.255", "224.0.0.5", "240.0.0.1"])
def test_no_icmp_error_about_a_datagram_from_a_non_host_source(src):
    frame = F.udp(src, "10.99.0.1")
    assert not pk.should_send_icmp_error(frame, parsed(frame))


# --- decrement_ttl ------------------------------------------------------------------------------

def test_decrement_ttl_keeps_the_header_checksum_valid_for_every_ttl():
    rng = random.Random(1)
    for ttl in range(1, 256):
        for _ in range(8):
            src = socket.inet_ntoa(rng.randbytes(4))
            dst = socket.inet_ntoa(rng.randbytes(4))
            frame = F.udp(src, dst, ttl=ttl, sport=rng.randrange(65536), payload=rng.randbytes(rng.randrange(9)))
            frame[18:20] = rng.randbytes(2)                      # random IP id
            frame = fix_ip_checksum(frame)
            before = bytes(frame)
            pk.decrement_ttl(frame, ttl)
            assert frame[22] == ttl - 1
            assert naive_checksum(bytes(frame[14:34])) == 0, (ttl, before.hex())
            scratch = bytearray(frame[14:34])
            scratch[10:12] = b"\x00\x00"
            assert struct.unpack_from("!H", frame, 24)[0] == naive_checksum(bytes(scratch))
            # nothing else changed: not the L4 bytes (a CHECKSUM_PARTIAL seed stays valid), not the MACs
            assert frame[:22] == before[:22] and frame[26:] == before[26:]
            assert F.decode(frame).data.ttl == ttl - 1


# --- small helpers -------------------------------------------------------------------------------

def test_mac_and_ip_helpers():
    assert pk.mac_bytes("ee:ee:ee:ee:ee:ee") == b"\xee" * 6
    assert pk.mac_bytes(b"\x01" * 6) == b"\x01" * 6
    assert pk.mac_str(bytes.fromhex("02000000000a")) == "02:00:00:00:00:0a"
    for bad in ("ee:ee:ee", "ee:ee:ee:ee:ee:ee:ee", b"\x00" * 5):
        with pytest.raises(ValueError):
            pk.mac_bytes(bad)
    assert pk.ip_int("10.244.0.2") == 0x0AF40002 and pk.ip_str(0x0AF40002) == "10.244.0.2"
    assert pk.ip_int(7) == 7


def test_describe_reads_like_tcpdump():
    assert pk.describe(F.tcp("10.244.0.2", "10.244.0.3", sport=40000, dport=80, payload=b"abc")) == \
        "IP 10.244.0.2.40000 > 10.244.0.3.80: tcp 3"
    assert pk.describe(F.udp("10.244.0.2", "10.96.0.10", sport=5000, dport=53, payload=b"ab")) == \
        "IP 10.244.0.2.5000 > 10.96.0.10.53: UDP, length 2"
    assert pk.describe(F.arp_request("10.244.0.2", "169.254.1.1")) == \
        "ARP, Request who-has 169.254.1.1 tell 10.244.0.2"
    assert pk.describe(F.icmp_echo("10.244.0.2", "169.254.1.1")) == "IP 10.244.0.2 > 169.254.1.1: ICMP type 8 code 0"
    assert pk.describe(b"\x01\x02") .startswith("undecodable frame")


def test_decrement_ttl_equals_the_general_rfc1624_update_for_every_checksum():
    from podnet.core.checksum import update16
    frame = bytearray(40)
    for checksum in range(0x10000):
        for ttl in (2, 64, 255):
            frame[22], frame[23] = ttl, 6
            frame[24], frame[25] = checksum >> 8, checksum & 0xFF
            pk.decrement_ttl(frame, ttl)
            old = ttl << 8 | 6
            assert (frame[24] << 8 | frame[25], frame[22]) == (update16(checksum, old, old - 0x100), ttl - 1)
