"""Frame layouts, fixed-offset parsing, validation and the frames podnet itself originates.

Layer: core. One table per header below; the hot path reads fields with `struct` at fixed offsets
(no dpkt object per forwarded frame), while frames that podnet *originates* (ARP replies, ICMP
echo replies and errors) and slow-path decoding use dpkt, which is clearer and fast enough there.

Invariants:
- Parsing never raises on wire input: it returns a `DropReason` instead, and the datapath counts it.
- A frame is the Ethernet frame only; a virtio-net header, when the port has one, travels beside it.

Ethernet (IEEE 802.3)    dst[0:6] src[6:12] ethertype[12:14]            (no VLAN tags are accepted)
ARP (RFC 826, IPv4)      htype[14] ptype[16] hlen[18] plen[19] op[20:22] sha[22:28] spa[28:32]
                         tha[32:38] tpa[38:42]
IPv4 (RFC 791)           ver/ihl[14] tos[15] total_length[16:18] id[18:20] flags/frag[20:22]
                         ttl[22] protocol[23] checksum[24:26] src[26:30] dst[30:34] options...
TCP/UDP (RFC 9293/768)   sport[l4+0:2] dport[l4+2:4]; checksum at l4+16 (TCP) / l4+6 (UDP)
ICMP (RFC 792)           type[l4] code[l4+1] checksum[l4+2:4] rest-of-header[l4+4:8]
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

import dpkt

from .checksum import internet_checksum, ipv4_header_ok

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_SCTP = 132

BROADCAST_MAC = b"\xff" * 6

ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_NET_UNREACH = 0
ICMP_HOST_UNREACH = 1
ICMP_PROT_UNREACH = 2
ICMP_PORT_UNREACH = 3
ICMP_FRAG_NEEDED = 4
ICMP_EXC_TTL = 0

_IPV4_HEADER = struct.Struct("!BBHHHBBHII")  # ver_ihl tos tot_len id frag ttl proto csum src dst
_PORTS = struct.Struct("!HH")


class DropReason(enum.Enum):
    """Why a frame was not forwarded. Values are the names shown in counters."""

    FRAME_TOO_SHORT = "frame_too_short"
    VLAN_TAGGED = "vlan_tagged"
    UNSUPPORTED_ETHERTYPE = "unsupported_ethertype"
    ARP_MALFORMED = "arp_malformed"
    ARP_NOT_PROXIED = "arp_not_proxied"
    IPV4_BAD_VERSION = "ipv4_bad_version"
    IPV4_BAD_IHL = "ipv4_bad_ihl"
    IPV4_BAD_TOTAL_LENGTH = "ipv4_bad_total_length"
    IPV4_BAD_CHECKSUM = "ipv4_bad_checksum"
    L4_TRUNCATED = "l4_truncated"
    SOURCE_SPOOFED = "source_spoofed"
    TTL_EXCEEDED = "ttl_exceeded"
    NO_ROUTE = "no_route"
    LOCAL_NOT_SERVED = "local_not_served"
    UNKNOWN_PORT = "unknown_port"
    NOT_FOR_GATEWAY = "not_for_gateway"
    BRIDGE_SAME_PORT = "bridge_same_port"
    ICMP_BAD_CHECKSUM = "icmp_bad_checksum"
    CT_INVALID = "ct_invalid"              # conntrack's state machine refused it (KUBE-FORWARD drops INVALID)
    CT_TABLE_FULL = "ct_table_full"        # a NEW flow on a full table (nf_conntrack_max)
    CT_CLASH = "ct_clash"                  # a NEW flow whose tuple another entry holds
    SERVICE_DROP = "service_drop"          # the service backend said DROP
    SERVICE_REJECT = "service_reject"      # ... or REJECT (an RST or ICMP error was sent)
    XDP_DROP = "xdp_drop"                  # the backend's XDP program on the uplink dropped the raw frame
    # VXLAN (core/overlay): names follow the kernel's skb drop reasons where one exists
    UDP_BAD_LENGTH = "udp_bad_length"              # UDP length below 8 or beyond the IP payload (udp_rcv)
    UDP_BAD_CHECKSUM = "udp_bad_checksum"          # a non-zero UDP checksum that does not verify
    VXLAN_OUTER_FRAGMENT = "vxlan_outer_fragment"  # a fragmented outer datagram (podnet does not reassemble)
    VXLAN_TRUNCATED = "vxlan_truncated"            # no room for the VXLAN header or the inner Ethernet/IPv4 header
    VXLAN_INVALID_HDR = "vxlan_invalid_hdr"        # flags not exactly I (0x08) or a reserved bit set
    VXLAN_VNI_NOT_FOUND = "vxlan_vni_not_found"    # a VNI this VTEP does not serve
    VXLAN_LOCAL_MAC = "vxlan_local_mac"            # inner source MAC is our own VTEP MAC: a loop
    IP_TUNNEL_ECN = "ip_tunnel_ecn"                # outer CE over a not-ECT inner packet (RFC 6040)
    FRAG_NEEDED = "frag_needed"                    # over the tunnel MTU with DF set: ICMP frag-needed sent
    MTU_EXCEEDED = "mtu_exceeded"                  # over the tunnel MTU without DF (the kernel would fragment)
    # between nodes (core/internode): the underlay's neighbours, the tunnel's peers, software GSO
    NEIGH_FAILED = "neigh_failed"                  # queued for a next hop that never answered ARP (FAILED)
    NEIGH_QUEUE_FULL = "neigh_queue_full"          # queued beyond unres_qlen_bytes while resolving
    TUNNEL_NO_PEER = "tunnel_no_peer"              # routed into the tunnel, but no lease holds the next hop
    GSO_INVALID = "gso_invalid"                    # a vnet header the frame cannot match (GSO of a non-TCPv4 frame...)


def mac_bytes(mac: str | bytes) -> bytes:
    """'ee:ee:ee:ee:ee:ee' -> 6 bytes (bytes pass through after a length check)."""
    if isinstance(mac, bytes | bytearray):
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
        return bytes(mac)
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_int(ip: str | ipaddress.IPv4Address | int) -> int:
    return ip if isinstance(ip, int) else int(ipaddress.IPv4Address(ip))


def ip_str(ip: int) -> str:
    return str(ipaddress.IPv4Address(ip))


@dataclass(slots=True)
class IPv4Info:
    """The IPv4 fields the slow path needs, read at fixed offsets."""

    ihl: int
    total_length: int
    frag: int
    ttl: int
    proto: int
    src: int
    dst: int
    l4: int          # offset of the L4 header in the frame
    sport: int = 0   # TCP/UDP source port; for ICMP, type << 8 | code
    dport: int = 0

    @property
    def is_fragment(self) -> bool:
        return bool(self.frag & 0x3FFF)  # MF set or a non-zero offset

    @property
    def first_fragment(self) -> bool:
        return not self.frag & 0x1FFF


def parse_ipv4(frame) -> IPv4Info | DropReason:
    """Validate and read the IPv4 header of an Ethernet frame whose ethertype is IPv4.

    The checks are ip_rcv()'s: a full header is present, version 4, IHL >= 5, total length at least
    the header and not beyond the frame (Ethernet padding after it is allowed), header checksum.
    """
    if len(frame) < ETH_HLEN + 20:
        return DropReason.FRAME_TOO_SHORT
    ver_ihl, _tos, tot_len, _id, frag, ttl, proto, _csum, src, dst = _IPV4_HEADER.unpack_from(frame, ETH_HLEN)
    if ver_ihl >> 4 != 4:
        return DropReason.IPV4_BAD_VERSION
    ihl = (ver_ihl & 0x0F) * 4
    if ihl < 20 or ETH_HLEN + ihl > len(frame):
        return DropReason.IPV4_BAD_IHL
    if tot_len < ihl or ETH_HLEN + tot_len > len(frame):
        return DropReason.IPV4_BAD_TOTAL_LENGTH
    if not ipv4_header_ok(frame, ETH_HLEN, ihl):
        return DropReason.IPV4_BAD_CHECKSUM
    info = IPv4Info(ihl, tot_len, frag, ttl, proto, src, dst, ETH_HLEN + ihl)
    if not frag & 0x1FFF:  # only the first fragment carries the L4 header
        need = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, IPPROTO_ICMP: 8}.get(proto, 0)
        if ihl + need > tot_len:
            return DropReason.L4_TRUNCATED
        if need:
            info.sport, info.dport = _PORTS.unpack_from(frame, info.l4)
    return info


@dataclass(slots=True, frozen=True)
class ArpInfo:
    op: int
    sha: bytes
    spa: int
    tha: bytes
    tpa: int


def parse_arp(frame) -> ArpInfo | DropReason:
    """An Ethernet/IPv4 ARP packet (RFC 826): htype 1, ptype 0x0800, hlen 6, plen 4."""
    if len(frame) < ETH_HLEN + 28:
        return DropReason.FRAME_TOO_SHORT
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, ETH_HLEN)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4) or op not in (1, 2):
        return DropReason.ARP_MALFORMED
    sha = bytes(frame[22:28])
    tha = bytes(frame[32:38])
    spa, = struct.unpack_from("!I", frame, 28)
    tpa, = struct.unpack_from("!I", frame, 38)
    return ArpInfo(op, sha, spa, tha, tpa)


# ---- frames podnet originates (built with dpkt) ------------------------------------------------

def build_arp_reply(our_mac: bytes, our_ip: int, request: ArpInfo) -> bytes:
    """The reply to `request`, sent from `our_mac`/`our_ip` to the asker."""
    arp = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REPLY, sha=our_mac, spa=struct.pack("!I", our_ip),
                       tha=request.sha, tpa=struct.pack("!I", request.spa))
    eth = dpkt.ethernet.Ethernet(dst=request.sha, src=our_mac, type=ETH_P_ARP, data=arp)
    return bytes(eth)


def build_arp_request(our_mac: bytes, our_ip: int, target_ip: int, dst_mac: bytes = BROADCAST_MAC) -> bytes:
    """who-has `target_ip`: broadcast, or unicast to `dst_mac` (a neighbour's reachability probe,
    arp_solicit's; the target hardware address stays zero either way)."""
    arp = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REQUEST, sha=our_mac, spa=struct.pack("!I", our_ip),
                       tha=b"\x00" * 6, tpa=struct.pack("!I", target_ip))
    return bytes(dpkt.ethernet.Ethernet(dst=dst_mac, src=our_mac, type=ETH_P_ARP, data=arp))


def _ipv4_frame(src_mac: bytes, dst_mac: bytes, src: int, dst: int, proto: int, payload: bytes,
                ttl: int = 64) -> bytes:
    # dpkt fills in total length and the header checksum when it serialises
    ip = dpkt.ip.IP(src=struct.pack("!I", src), dst=struct.pack("!I", dst), p=proto, ttl=ttl,
                    data=payload)
    return bytes(dpkt.ethernet.Ethernet(dst=dst_mac, src=src_mac, type=ETH_P_IP, data=ip))


def build_icmp_echo_reply(frame, info: IPv4Info, our_mac: bytes) -> bytes:
    """Answer an echo request addressed to us: same id, sequence and data, type 0 (RFC 792)."""
    request = bytes(frame[info.l4:ETH_HLEN + info.total_length])
    body = bytearray(request)
    body[0] = ICMP_ECHOREPLY
    body[2:4] = b"\x00\x00"
    body[2:4] = struct.pack("!H", internet_checksum(body))
    return _ipv4_frame(our_mac, bytes(frame[6:12]), info.dst, info.src, IPPROTO_ICMP, bytes(body))


def build_tcp_reset(frame, info: IPv4Info, our_mac: bytes) -> bytes:
    """The RST that `REJECT --reject-with tcp-reset` sends back (nf_send_reset): from the packet's
    destination to its source; it ACKs what the segment occupied when the segment had no ACK."""
    seq, ack = struct.unpack_from("!II", frame, info.l4 + 4)
    doff = (frame[info.l4 + 12] >> 4) * 4
    flags = frame[info.l4 + 13]
    if flags & 0x10:  # ACK set: RST with seq = their ack, nothing acknowledged
        rst = dpkt.tcp.TCP(sport=info.dport, dport=info.sport, seq=ack, ack=0, flags=dpkt.tcp.TH_RST)
    else:
        occupied = info.total_length - info.ihl - doff + (flags & 0x01) + (flags >> 1 & 0x01)
        rst = dpkt.tcp.TCP(sport=info.dport, dport=info.sport, seq=0, ack=(seq + occupied) & 0xFFFFFFFF,
                           flags=dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK)
    return _ipv4_frame(our_mac, bytes(frame[6:12]), info.dst, info.src, IPPROTO_TCP, rst)


# REJECT --reject-with names → ICMP destination unreachable codes (RFC 792, RFC 1812)
REJECT_WITH_CODES = {
    "icmp-net-unreachable": 0, "icmp-host-unreachable": 1, "icmp-proto-unreachable": 2,
    "icmp-port-unreachable": 3, "icmp-net-prohibited": 9, "icmp-host-prohibited": 10,
    "icmp-admin-prohibited": 13,
}


def build_icmp_error(frame, info: IPv4Info, icmp_type: int, code: int, our_mac: bytes,
                     our_ip: int, rest_of_header: int = 0) -> bytes:
    """An ICMP error about `frame` from `our_ip`: the offending IP header plus 8 bytes (RFC 792),
    as Linux's icmp_send() sends for no route and TTL expiry. `rest_of_header` is the second
    32-bit word: zero, except the next-hop MTU of "fragmentation needed" (RFC 1191)."""
    quoted = bytes(frame[ETH_HLEN:ETH_HLEN + min(info.total_length, info.ihl + 8)])
    body = bytearray(struct.pack("!BBHI", icmp_type, code, 0, rest_of_header) + quoted)
    body[2:4] = struct.pack("!H", internet_checksum(body))
    return _ipv4_frame(our_mac, bytes(frame[6:12]), our_ip, info.src, IPPROTO_ICMP, bytes(body))


def icmp_checksum_ok(frame, info: IPv4Info) -> bool:
    """The ICMP checksum covers the whole ICMP message (RFC 792); a valid one sums to 0xffff."""
    return internet_checksum(frame[info.l4:ETH_HLEN + info.total_length]) == 0


# ICMP query types (RFC 792/950): echo, timestamp, information, address mask, requests and replies.
# Every other type counts as an error, as in Linux's icmp_pointers[] and icmp_send(), which never
# answers an error with an error.
ICMP_QUERY_TYPES = frozenset({ICMP_ECHOREPLY, ICMP_ECHO, 13, 14, 15, 16, 17, 18})


def _single_host(ip: int) -> bool:
    return ip != 0 and ip >> 24 != 127 and ip >> 28 < 0xE  # not 0.0.0.0, loopback, multicast, class E/broadcast


def should_send_icmp_error(frame, info: IPv4Info) -> bool:
    """RFC 1122 §3.2.2: no ICMP error about an ICMP error, a non-first fragment, a link-layer
    broadcast or multicast, a datagram to an IP broadcast or multicast address, or one whose
    source is not a single host."""
    if not info.first_fragment or frame[0] & 1:
        return False
    if info.dst == 0xFFFFFFFF or info.dst >> 28 == 0xE or not _single_host(info.src):
        return False
    if info.proto == IPPROTO_ICMP and info.sport >> 8 not in ICMP_QUERY_TYPES:
        return False
    return True


def describe(frame) -> str:
    """A one-line tcpdump-like summary, for traces and logs (slow path: uses dpkt)."""
    try:
        eth = dpkt.ethernet.Ethernet(bytes(frame))
    except (dpkt.UnpackError, ValueError) as exc:
        return f"undecodable frame ({exc})"
    if isinstance(eth.data, dpkt.arp.ARP):
        a = eth.data
        tpa, spa = ipaddress.IPv4Address(a.tpa), ipaddress.IPv4Address(a.spa)
        if a.op == dpkt.arp.ARP_OP_REQUEST:
            return f"ARP, Request who-has {tpa} tell {spa}"
        return f"ARP, Reply {spa} is-at {mac_str(a.sha)}"
    if isinstance(eth.data, dpkt.ip.IP):
        ip = eth.data
        s, d = ipaddress.IPv4Address(ip.src), ipaddress.IPv4Address(ip.dst)
        l4 = ip.data
        if isinstance(l4, dpkt.tcp.TCP):
            return f"IP {s}.{l4.sport} > {d}.{l4.dport}: tcp {len(l4.data)}"
        if isinstance(l4, dpkt.udp.UDP):
            return f"IP {s}.{l4.sport} > {d}.{l4.dport}: UDP, length {len(l4.data)}"
        if isinstance(l4, dpkt.icmp.ICMP):
            return f"IP {s} > {d}: ICMP type {l4.type} code {l4.code}"
        return f"IP {s} > {d}: proto {ip.p}"
    return f"ethertype 0x{eth.type:04x}"


def decrement_ttl(frame, ttl: int) -> None:
    """Forwarding's one rewrite of the IPv4 header: TTL - 1, header checksum updated.

    The TTL is the high byte of the word at offset 22, so the word drops by 0x0100 and the
    checksum rises by 0x0100 with an end-around carry — RFC 1624's update specialised to this one
    change, the arithmetic of the kernel's ip_decrease_ttl() (equal to `update16` for every
    checksum; the unit tests check all 65,536). The TTL is not in the TCP/UDP pseudo-header, so a
    CHECKSUM_PARTIAL seed stays valid.
    """
    checksum = (frame[24] << 8 | frame[25]) + 0x100
    checksum = (checksum + (checksum >= 0xFFFF)) & 0xFFFF
    frame[22] = ttl - 1
    frame[24] = checksum >> 8
    frame[25] = checksum & 0xFF
