"""Frame builders for tests and examples (built with dpkt, so they are independent of podnet's parser).

Public: users of podnet build frames for their own tests with these.
"""

from __future__ import annotations

import socket
import struct

import dpkt

from podnet.core.packet import mac_bytes

POD_MAC_A = "02:00:00:00:00:0a"
POD_MAC_B = "02:00:00:00:00:0b"
GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"


def _ip(src: str, dst: str, proto: int, data, ttl: int = 64) -> dpkt.ip.IP:
    return dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, ttl=ttl, data=data)


def _eth(src_mac: str, dst_mac: str, payload, ethertype: int = dpkt.ethernet.ETH_TYPE_IP) -> bytearray:
    eth = dpkt.ethernet.Ethernet(src=mac_bytes(src_mac), dst=mac_bytes(dst_mac), type=ethertype, data=payload)
    return bytearray(bytes(eth))


def tcp(src: str, dst: str, sport: int = 40000, dport: int = 80, payload: bytes = b"",
        flags: int = dpkt.tcp.TH_ACK, ttl: int = 64, src_mac: str = POD_MAC_A,
        dst_mac: str = GATEWAY_MAC, seq: int = 1) -> bytearray:
    segment = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=seq, data=payload)
    ip = _ip(src, dst, dpkt.ip.IP_PROTO_TCP, segment, ttl)
    ip.len = 20 + len(bytes(segment))
    return _eth(src_mac, dst_mac, ip)


def udp(src: str, dst: str, sport: int = 40000, dport: int = 53, payload: bytes = b"",
        ttl: int = 64, src_mac: str = POD_MAC_A, dst_mac: str = GATEWAY_MAC) -> bytearray:
    datagram = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    datagram.ulen = 8 + len(payload)
    return _eth(src_mac, dst_mac, _ip(src, dst, dpkt.ip.IP_PROTO_UDP, datagram, ttl))


def icmp_echo(src: str, dst: str, ident: int = 1, seq: int = 1, payload: bytes = b"podnet",
              ttl: int = 64, src_mac: str = POD_MAC_A, dst_mac: str = GATEWAY_MAC) -> bytearray:
    echo = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload))
    return _eth(src_mac, dst_mac, _ip(src, dst, dpkt.ip.IP_PROTO_ICMP, echo, ttl))


def arp_request(sender_ip: str, target_ip: str, sender_mac: str = POD_MAC_A) -> bytearray:
    arp = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REQUEST, sha=mac_bytes(sender_mac), spa=socket.inet_aton(sender_ip),
                       tha=b"\x00" * 6, tpa=socket.inet_aton(target_ip))
    return _eth(sender_mac, "ff:ff:ff:ff:ff:ff", arp, dpkt.ethernet.ETH_TYPE_ARP)


def corrupt_ipv4_checksum(frame: bytearray) -> bytearray:
    """The same frame with its IPv4 header checksum off by one."""
    bad = bytearray(frame)
    checksum, = struct.unpack_from("!H", bad, 24)
    struct.pack_into("!H", bad, 24, checksum ^ 0x0001)
    return bad


def decode(frame) -> dpkt.ethernet.Ethernet:
    return dpkt.ethernet.Ethernet(bytes(frame))
