"""The tunnel MTU and the verdict on packets that do not fit it, as ip_forward() gives it."""

from __future__ import annotations

import struct

import dpkt
import pytest

from reference import naive_sum
from podnet.core import packet as pk
from podnet.core.overlay.mtu import VXLAN_OVERHEAD, MtuVerdict, build_frag_needed, check_mtu, tunnel_mtu
from podnet.errors import ConfigError
from podnet.testing import frames as F

GATEWAY_MAC = pk.mac_bytes("ee:ee:ee:ee:ee:ee")
GATEWAY_IP = pk.ip_int("169.254.1.1")


def tcp_of_ip_length(length: int, df: bool = True) -> bytearray:
    frame = F.tcp("10.244.1.5", "10.244.2.7", payload=bytes(length - 40))
    if df:
        frame[20] |= 0x40
        frame[24:26] = b"\x00\x00"
        frame[24:26] = struct.pack("!H", ~naive_sum(bytes(frame[14:34])) & 0xFFFF)
    assert struct.unpack_from("!H", frame, 16)[0] == length
    return frame


def test_tunnel_mtu_is_underlay_minus_50():
    assert VXLAN_OVERHEAD == 50
    assert tunnel_mtu(1500) == 1450 and tunnel_mtu(9000) == 8950 and tunnel_mtu(118) == 68
    with pytest.raises(ConfigError, match="underlay_mtu 117"):
        tunnel_mtu(117)


def test_verdicts():
    assert check_mtu(tcp_of_ip_length(1450), 1450) is MtuVerdict.FITS
    assert check_mtu(tcp_of_ip_length(1451), 1450) is MtuVerdict.FRAG_NEEDED
    assert check_mtu(tcp_of_ip_length(1451, df=False), 1450) is MtuVerdict.FRAGMENT
    assert check_mtu(F.arp_request("10.244.1.5", "10.244.1.1"), 1450) is MtuVerdict.FITS
    padded = F.udp("10.244.1.5", "10.244.2.7") + bytearray(100)  # the IP length counts, not the padding
    assert check_mtu(padded, 60) is MtuVerdict.FITS
    assert check_mtu(bytes(14 + 1451), 1450) is MtuVerdict.FRAGMENT  # non-IP: by its length


def test_gso_super_frames_are_measured_by_their_segments():
    big = tcp_of_ip_length(65000)
    assert check_mtu(big, 1450, gso_size=1410) is MtuVerdict.FITS          # 20 + 20 + 1410 = 1450
    assert check_mtu(big, 1450, gso_size=1411) is MtuVerdict.FRAG_NEEDED
    assert check_mtu(big, 1450) is MtuVerdict.FRAG_NEEDED


def test_frag_needed_is_icmp_3_4_with_the_mtu():
    frame = tcp_of_ip_length(1500)
    info = pk.parse_ipv4(frame)
    reply = build_frag_needed(frame, info, 1450, GATEWAY_MAC, GATEWAY_IP)
    eth = dpkt.ethernet.Ethernet(reply)
    assert eth.dst == bytes(frame[6:12]) and eth.src == GATEWAY_MAC
    ip = eth.data
    assert pk.ip_str(int.from_bytes(ip.src, "big")) == "169.254.1.1"
    assert pk.ip_str(int.from_bytes(ip.dst, "big")) == "10.244.1.5"
    icmp = bytes(ip.data)
    assert icmp[0:2] == b"\x03\x04"
    assert icmp[4:8] == b"\x00\x00" + struct.pack("!H", 1450)  # unused, next-hop MTU (RFC 1191)
    assert icmp[8:] == bytes(frame[14:14 + 28])                  # the header and 8 bytes of the datagram
    assert naive_sum(icmp) == 0xFFFF
