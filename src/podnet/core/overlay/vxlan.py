"""VXLAN encapsulation and decapsulation (RFC 7348), as the Linux vxlan driver does it for Flannel.

Layer: core, sans-IO. A `Vtep` is one VXLAN tunnel endpoint, what the kernel's `flannel.1` device
is on a Flannel node. `encapsulate(inner, peer)` returns the whole outer Ethernet frame for the
underlay; `decapsulate(frame)` returns the inner frame, a `DropReason`, or None when the frame is
not a VXLAN datagram for this VTEP (the datapath then handles it as ordinary traffic).

The outer headers over an IPv4 underlay, 50 bytes in front of the inner frame (outer-frame offsets):

    Ethernet          dst[0:6] src[6:12] ethertype[12:14] = 0x0800
    IPv4 (RFC 791)    ver_ihl[14] = 0x45  tos[15]  tot_len[16:18]  id[18:20]  frag[20:22] = 0
                      ttl[22] = 64  proto[23] = 17  checksum[24:26]  src[26:30]  dst[30:34]
    UDP (RFC 768)     sport[34:36]  dport[36:38]  length[38:40]  checksum[40:42]
    VXLAN (RFC 7348)  flags[42] = 0x08  reserved[43:46] = 0  vni[46:49]  reserved[49] = 0
    inner Ethernet    [50:]  (no FCS)

What a kernel vxlan device with Flannel's settings puts there (drivers/net/vxlan/vxlan_core.c,
vxlan_xmit_one and vxlan_build_skb; checked against a real device in tests/linux/test_overlay_interop.py):

- DF clear: the device default is `df unset` (VXLAN_DF_UNSET), so the underlay may fragment.
- TTL 64: `ttl auto` takes the route's hop limit, i.e. net.ipv4.ip_default_ttl.
- TOS: DSCP 0 (`tos 0`); the ECN bits are the inner packet's, CE sent as ECT(0)
  (ip_tunnel_ecn_encap, RFC 6040 normal mode). Non-IP inner frames: 0.
- IP ID: the kernel's ip_select_ident hashes a per-destination counter; here one counter per VTEP.
- UDP source port: udp_flow_src_port(..., use_eth=true) with `srcport 0 0`, i.e. the range
  net.ipv4.ip_local_port_range, 32768-60999 by default: ((h ^ h << 16) * (max - min) >> 32) + min,
  so `max` itself never appears. The kernel's h is the flow dissector's hash (a randomly keyed,
  symmetric jhash of addresses and ports); podnet hashes the same fields with a seeded hash, also
  symmetric, so both directions of a flow use one port. Same range and spreading, other values.
- UDP checksum: computed. Only IFLA_VXLAN_UDP_CSUM=0 (`noudpcsum`) turns it off, and neither
  flanneld (its netlink library sends the attribute only when true) nor `ip link add type vxlan`
  sends that, so a real Flannel device shows `udpcsum`. RFC 7348 says it SHOULD be zero and every
  receiver accepts zero: `udp_csum=False` sends zero.
- UDP destination 4789 (IANA), or 8472: the kernel's default when `dstport` is not given, and
  Flannel's (its `Port: 0` leaves the choice to the kernel).
- VXLAN: exactly `08 00 00 00 | VNI | 00`.

Receive checks, in the kernel's order (ip_rcv, udp_rcv, vxlan_rcv); each failure is a counted drop:
IPv4 header (the DropReasons of `packet.parse_ipv4`, for any UDP datagram to our address: ip_rcv
checks before it knows the port); a fragment (VXLAN_OUTER_FRAGMENT: the kernel
reassembles, podnet does not); UDP length (UDP_BAD_LENGTH); a non-zero UDP checksum
(UDP_BAD_CHECKSUM); the 8-byte header (VXLAN_TRUNCATED); the I flag (VXLAN_INVALID_HDR); the VNI
(VXLAN_VNI_NOT_FOUND); any other flag bit or a non-zero last byte (VXLAN_INVALID_HDR: RFC 7348
says "ignore", Linux drops unless an extension such as GBP is on); the inner Ethernet header
(VXLAN_TRUNCATED); an inner source MAC equal to our own (VXLAN_LOCAL_MAC: a loop); an inner IPv4
header (VXLAN_TRUNCATED, pskb_inet_may_pull); ECN (IP_TUNNEL_ECN: CE over a not-ECT inner packet;
CE over an ECT one is copied into the inner header, as IP_ECN_decapsulate does).

Invariants:
- Wire input never raises: `decapsulate` answers a DropReason, counted in `statistics()`.
- Nothing is learned from received frames (Flannel's `nolearning`): peers come from leases only.
- `encapsulate` never modifies its input; it writes the inner MACs as the kernel's flannel.1 sends
  them: destination the peer's VTEP MAC, source our VTEP MAC.
- The same inner flow always gets the same UDP source port, in any process (Python's hash of a
  tuple of ints does not depend on PYTHONHASHSEED).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from ...errors import ConfigError
from .. import packet as pk
from ..checksum import ipv4_header_ok, update16
from ..packet import DropReason
from .mtu import VXLAN_OVERHEAD, tunnel_mtu

IANA_PORT = 4789            # RFC 7348 section 5
LINUX_DEFAULT_PORT = 8472   # vxlan module parameter udp_port: the kernel's default without `dstport`
FLANNEL_PORT = LINUX_DEFAULT_PORT
DEFAULT_VNI = 1
DEFAULT_TTL = 64            # `ttl auto`: net.ipv4.ip_default_ttl
EPHEMERAL_PORTS = (32768, 60999)  # net.ipv4.ip_local_port_range, the range `srcport 0 0` means

VXLAN_HLEN = 8
VXLAN_FLAG_I = 0x08
OUTER_HLEN = 14 + 20 + 8 + VXLAN_HLEN    # 50: what precedes the inner frame on the wire
_FLAGS_WORD = VXLAN_FLAG_I << 24         # the first 32-bit word of a valid header
_ECN_CE = 3

# everything of the outer headers and the inner MACs, one pack per frame: Ethernet, then IPv4
# ver_ihl tos tot_len id, frag+ttl+proto, checksum, addresses, then UDP sport dport length checksum,
# the VXLAN header, and the inner destination and source MACs
_OUTER = struct.Struct("!14sBBHH4sH8sHHHH8s12s")
_IPV4 = struct.Struct("!BBHHHBBHII")      # ver_ihl tos tot_len id frag ttl proto csum src dst
_UDP_VXLAN = struct.Struct("!HHHHII")     # sport dport length checksum, VXLAN flags word, VNI word
# what the flow hash reads of an inner frame: ethertype, ver_ihl, frag, proto, src, dst, and the
# ports where they are when the IPv4 header has no options
_FLOW = struct.Struct("!12xHBxxxxxHxBxxIIHH")
_PORTS = struct.Struct("!HH")
_IPV4_WORDS = struct.Struct("!5I")  # a 20-byte IPv4 header as 32-bit words (2**32 == 1 modulo 0xffff)
_new_tuple = tuple.__new__          # builds a NamedTuple without its Python-level __new__
_HASHED_PROTOCOLS = frozenset({pk.IPPROTO_TCP, pk.IPPROTO_UDP, pk.IPPROTO_SCTP, 136})  # 136: UDP-Lite


def _sum16(data) -> int:
    """The one's complement sum of `data` as 16-bit words, modulo 0xffff (0 stands for 0xffff)."""
    total = int.from_bytes(data, "big")
    if len(data) & 1:
        total <<= 8  # an odd length is padded with a zero byte (RFC 768)
    return total % 0xFFFF


def flow_hash(inner, seed: int = 0) -> int:
    """A 32-bit hash of the inner frame's flow, the same for both directions.

    IPv4: protocol and addresses, plus the ports of TCP, UDP, UDP-Lite and SCTP unless the packet is
    a fragment (later fragments carry none, and all fragments of a datagram must hash alike).
    Anything else: the two MACs and the ethertype, what udp_flow_src_port falls back to when the
    kernel has no flow hash.
    """
    n = len(inner)
    if n >= 38:
        ethertype, ver_ihl, frag, proto, src, dst, sport, dport = _FLOW.unpack_from(inner)
        if ethertype == pk.ETH_P_IP:
            if proto in _HASHED_PROTOCOLS and not frag & 0x3FFF:
                if ver_ihl != 0x45:  # options: the ports are further on, if they are there at all
                    l4 = 14 + (ver_ihl & 0x0F) * 4
                    sport, dport = _PORTS.unpack_from(inner, l4) if n >= l4 + 4 else (0, 0)
                a, b = src << 16 | sport, dst << 16 | dport
            else:
                a, b = src, dst
            return hash((seed, proto, a, b) if a < b else (seed, proto, b, a)) & 0xFFFFFFFF
    ethertype = inner[12] << 8 | inner[13] if n >= 14 else -1
    return hash((seed, int.from_bytes(inner[0:12], "big"), ethertype)) & 0xFFFFFFFF


def source_port(flow: int, port_range: tuple[int, int] = EPHEMERAL_PORTS) -> int:
    """udp_flow_src_port's mapping of a 32-bit flow hash onto [min, max): the low 16 bits are
    mixed into the high ones, whose product with the range's width picks the port."""
    low, high = port_range
    flow ^= (flow << 16) & 0xFFFFFFFF
    return ((flow * (high - low)) >> 32) + low


class Peer:
    """A remote VTEP as this VTEP sends to it: its underlay IP, its VTEP MAC, and the MAC of the
    underlay next hop (the remote node itself on a shared segment, else the underlay gateway).

    Made by `Vtep.peer()`, which precomputes what every frame to this peer shares: the outer
    Ethernet header, the addresses, the VXLAN header, the inner MACs and their checksum sums.

    `tunnel_gso`: both ends take whole VXLAN super-frames (GSO over UDP tunnels on their uplink
    TAPs), so a TCP super-frame may go as one outer frame (`Vtep.encapsulate_gso`).
    """

    __slots__ = ("ip", "vtep_mac", "next_hop_mac", "_eth", "_addrs", "_inner_macs", "_ip_sum", "_udp_sum",
                 "tunnel_gso")

    def __init__(self, ip: int, vtep_mac: bytes, next_hop_mac: bytes, eth: bytes, addrs: bytes,
                 inner_macs: bytes, ip_sum: int, udp_sum: int, tunnel_gso: bool = False) -> None:
        self.tunnel_gso = tunnel_gso
        self.ip = ip
        self.vtep_mac = vtep_mac
        self.next_hop_mac = next_hop_mac
        self._eth = eth
        self._addrs = addrs
        self._inner_macs = inner_macs
        self._ip_sum = ip_sum
        self._udp_sum = udp_sum

    def __repr__(self) -> str:
        return (f"Peer({pk.ip_str(self.ip)}, vtep_mac={pk.mac_str(self.vtep_mac)}, "
                f"next_hop_mac={pk.mac_str(self.next_hop_mac)})")


class Decapsulated(NamedTuple):
    inner: memoryview | bytearray  # the inner Ethernet frame (a view into the outer one unless ECN rewrote it)
    remote_ip: int                 # outer source: the sending VTEP
    source_port: int               # outer UDP source port (the sender's flow hash)
    vni: int


@dataclass(frozen=True, slots=True)
class VtepStatistics:
    """Device counters, as `ip -s link show flannel.1` keeps them: frames are the inner frames."""

    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int
    drops: dict[str, int]

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())


class Vtep:
    """One VXLAN tunnel endpoint on the IPv4 underlay.

    `local_ip` is the node's underlay ("public") address, `mac` the VTEP MAC (flannel.1's MAC, the
    one in the node's lease), `underlay_mac` the MAC of the node's uplink (the outer source).
    """

    def __init__(self, *, local_ip: str | int, mac: str | bytes, underlay_mac: str | bytes,
                 vni: int = DEFAULT_VNI, port: int = IANA_PORT, underlay_mtu: int = 1500,
                 udp_csum: bool = True, ttl: int = DEFAULT_TTL,
                 src_port_range: tuple[int, int] = (0, 0), hash_seed: int = 0) -> None:
        try:
            self.local_ip = pk.ip_int(local_ip)
            self.mac = pk.mac_bytes(mac)
            self.underlay_mac = pk.mac_bytes(underlay_mac)
        except ValueError as exc:
            raise ConfigError(f"Vtep local_ip {local_ip!r} / mac {mac!r} / underlay_mac {underlay_mac!r}: "
                              f"{exc}") from None
        if not 0 <= vni < 1 << 24:
            raise ConfigError(f"Vtep vni {vni}: a VNI is 24 bits (0-16777215)")
        if not 0 < port < 1 << 16:
            raise ConfigError(f"Vtep port {port}: not a UDP port")
        if not 0 < ttl < 256:
            raise ConfigError(f"Vtep ttl {ttl}: must be 1-255")
        low, high = src_port_range
        if low >= high:  # `srcport 0 0`: the kernel uses the local port range
            low, high = EPHEMERAL_PORTS
        if not 0 < low < high <= 1 << 16:
            raise ConfigError(f"Vtep src_port_range {src_port_range!r}: not a range of UDP ports")
        self.vni = vni
        self.port = port
        self.ttl = ttl
        self.udp_csum = udp_csum
        self.src_port_range = (low, high)
        self.hash_seed = hash_seed
        self.underlay_mtu = underlay_mtu
        self.inner_mtu = tunnel_mtu(underlay_mtu)  # ConfigError when too small
        self._vxlan = struct.pack("!II", _FLAGS_WORD, vni << 8)
        self._frag_ttl_proto = struct.pack("!HBB", 0, ttl, pk.IPPROTO_UDP)  # DF clear: `df unset`
        self._ip_id = (hash_seed * 0x9E3779B1) & 0xFFFF
        self._tx = self._tx_bytes = self._rx = self._rx_bytes = 0
        self._drops: Counter = Counter()

    # ---- peers ------------------------------------------------------------------------------

    def peer(self, ip: str | int, vtep_mac: str | bytes, next_hop_mac: str | bytes, *,
             tunnel_gso: bool = False) -> Peer:
        """A remote VTEP, with what every frame to it shares computed once."""
        try:
            ip = pk.ip_int(ip)
            vtep_mac = pk.mac_bytes(vtep_mac)
            next_hop_mac = pk.mac_bytes(next_hop_mac)
        except ValueError as exc:
            raise ConfigError(f"VXLAN peer {ip!r} / {vtep_mac!r} / {next_hop_mac!r}: {exc}") from None
        eth = next_hop_mac + self.underlay_mac + b"\x08\x00"
        addrs = struct.pack("!II", self.local_ip, ip)
        inner_macs = vtep_mac + self.mac
        # the IPv4 header words that never change: frag (0), ttl+proto, the two addresses
        ip_sum = (self.ttl << 8 | pk.IPPROTO_UDP) + _sum16(addrs)
        # what the UDP checksum covers and never changes: the pseudo-header's addresses and
        # protocol, the destination port, the VXLAN header and the inner MACs
        udp_sum = _sum16(addrs) + pk.IPPROTO_UDP + self.port + _sum16(self._vxlan) + _sum16(inner_macs)
        return Peer(ip, vtep_mac, next_hop_mac, eth, addrs, inner_macs, ip_sum, udp_sum, tunnel_gso)

    # ---- transmit ---------------------------------------------------------------------------

    def encapsulate(self, inner, peer: Peer, *, count: bool = True, sport: int | None = None,
                    inner_sum: int | None = None) -> bytes | DropReason:
        """The outer frame that carries `inner` to `peer`, or why it cannot be sent.

        `inner` is an Ethernet frame routed into the tunnel; its MACs are replaced by the peer's VTEP
        MAC and ours. Frames over the tunnel MTU are refused (MTU_EXCEEDED): the routing stage
        decides beforehand what the kernel would do with them (`mtu.check_mtu`). With count=False
        (a trace) the device counters and the IP identification counter are left alone.

        Two shortcuts for the segments of one GSO super-frame, which give the same bytes: `sport`,
        the UDP source port of the inner flow (`source_port(flow_hash(...))`, the same for every
        segment), and `inner_sum`, the one's complement sum of `inner[12:]` modulo 0xffff when the
        caller knows it without reading the payload (`gso.lco_sum`: the kernel's local checksum
        offload, lco_csum).
        """
        n = len(inner)
        if n < pk.ETH_HLEN:
            return self._drop(DropReason.FRAME_TOO_SHORT, count)
        payload = memoryview(inner)[12:]  # ethertype onwards: copied once, into the outer frame
        if n - pk.ETH_HLEN > self.inner_mtu:
            return self._drop(DropReason.MTU_EXCEEDED, count)
        tos = 0
        if inner[12] == 0x08 and inner[13] == 0x00 and n >= 34:
            ecn = inner[15] & _ECN_CE
            tos = 2 if ecn == _ECN_CE else ecn  # CE is never copied outward, ECT(0) instead
        if sport is None:
            sport = source_port(flow_hash(inner, self.hash_seed), self.src_port_range)
        udp_len = n + 16  # UDP header + VXLAN header + inner frame (whose first 12 bytes are replaced)
        tot_len = udp_len + 20
        ip_id = (self._ip_id + 1) & 0xFFFF
        if count:
            self._ip_id = ip_id
        # -sum % 0xffff is the complement of the folded one's complement sum (0 for a sum of 0xffff,
        # as ip_send_check computes it)
        ip_csum = -(peer._ip_sum + (0x4500 | tos) + tot_len + ip_id) % 0xFFFF
        if self.udp_csum:
            # the pseudo-header counts the UDP length once, the UDP header once more; a computed
            # checksum of 0 is sent as 0xffff (RFC 768: 0 means "none")
            payload_sum = _sum16(payload) if inner_sum is None else inner_sum
            udp_csum = -(peer._udp_sum + 2 * udp_len + sport + payload_sum) % 0xFFFF or 0xFFFF
        else:
            udp_csum = 0
        header = _OUTER.pack(peer._eth, 0x45, tos, tot_len, ip_id, self._frag_ttl_proto, ip_csum,
                             peer._addrs, sport, self.port, udp_len, udp_csum, self._vxlan, peer._inner_macs)
        if count:
            self._tx += 1
            self._tx_bytes += n
        return b"".join((header, payload))

    def encapsulate_gso(self, inner, peer: Peer, segments: int, header_len: int, *, count: bool = True,
                        sport: int | None = None) -> bytes:
        """One outer frame for a whole TCP super-frame `inner` of `segments` segments, each with
        `header_len` bytes of inner headers: GSO over the UDP tunnel, the receiving TAP or the kernel
        on the way cuts it. The headers are those `encapsulate` gives the segments except that the
        lengths are the whole frame's and the UDP checksum is 0 (the kernel segments a
        SKB_GSO_UDP_TUNNEL frame without one); the IP identification is the first segment's and the
        counter moves on by `segments`, as the kernel's segmentation numbers the outer headers id,
        id+1, ... No MTU check: the caller checked gso_size. The device counters count the
        segments, as if `encapsulate` had sent them."""
        n = len(inner)
        tos = 0
        if inner[12] == 0x08 and inner[13] == 0x00 and n >= 34:
            ecn = inner[15] & _ECN_CE
            tos = 2 if ecn == _ECN_CE else ecn
        if sport is None:
            sport = source_port(flow_hash(inner, self.hash_seed), self.src_port_range)
        udp_len = n + 16
        tot_len = udp_len + 20
        ip_id = (self._ip_id + 1) & 0xFFFF
        if count:
            self._ip_id = (self._ip_id + segments) & 0xFFFF
            self._tx += segments
            self._tx_bytes += n + (segments - 1) * header_len
        ip_csum = -(peer._ip_sum + (0x4500 | tos) + tot_len + ip_id) % 0xFFFF
        header = _OUTER.pack(peer._eth, 0x45, tos, tot_len, ip_id, self._frag_ttl_proto, ip_csum,
                             peer._addrs, sport, self.port, udp_len, 0, self._vxlan, peer._inner_macs)
        return b"".join((header, memoryview(inner)[12:]))

    # ---- receive ----------------------------------------------------------------------------

    def decapsulate(self, frame, checksum_unnecessary: bool = False, *,
                    count: bool = True) -> Decapsulated | DropReason | None:
        """The inner frame of a VXLAN datagram for this VTEP; a DropReason (counted) if it is one
        but is malformed; None if it is not IPv4/UDP to our address and VXLAN port at all.

        `checksum_unnecessary`: the frame's metadata says its UDP checksum needs no check, as an skb
        that is CHECKSUM_UNNECESSARY (a NIC verified it) or CHECKSUM_PARTIAL (it never left this
        machine: the field holds only the pseudo-header sum, to be completed by a NIC that is not
        there). A TAP's virtio-net header says so with DATA_VALID or NEEDS_CSUM, an AF_PACKET
        socket's PACKET_AUXDATA with TP_STATUS_CSUM_VALID or TP_STATUS_CSUMNOTREADY; a frame sent
        over a veth by the kernel's own vxlan device arrives CHECKSUM_PARTIAL. With count=False (a
        trace) the device counters are left alone.
        """
        n = len(frame)
        if n < 34 or frame[12] != 0x08 or frame[13] != 0x00 or frame[23] != pk.IPPROTO_UDP:
            return None
        ver_ihl, tos, tot_len, _id, frag, _ttl, _proto, _csum, src, dst = _IPV4.unpack_from(frame, 14)
        if dst != self.local_ip:
            return None
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4:
            return self._drop(DropReason.IPV4_BAD_VERSION, count)
        if ihl < 20 or 14 + ihl > n:
            return self._drop(DropReason.IPV4_BAD_IHL, count)
        if tot_len < ihl or 14 + tot_len > n:
            return self._drop(DropReason.IPV4_BAD_TOTAL_LENGTH, count)
        # a valid header's words sum to 0 modulo 0xffff; without options, one unpack finds out
        if ihl == 20:
            bad_checksum = sum(_IPV4_WORDS.unpack_from(frame, 14)) % 0xFFFF
        else:
            bad_checksum = not ipv4_header_ok(frame, 14, ihl)
        if bad_checksum:
            return self._drop(DropReason.IPV4_BAD_CHECKSUM, count)
        udp = 14 + ihl
        if frag & 0x1FFF:
            return None  # a later fragment: no UDP header to tell whose it is
        if tot_len - ihl < 4 or frame[udp + 2] << 8 | frame[udp + 3] != self.port:
            return None
        if frag & 0x2000:
            return self._drop(DropReason.VXLAN_OUTER_FRAGMENT, count)
        if tot_len - ihl < 8:
            return self._drop(DropReason.L4_TRUNCATED, count)
        if n >= udp + 16:
            sport, _dport, udp_len, udp_csum, flags, vni_word = _UDP_VXLAN.unpack_from(frame, udp)
        else:  # too short for a VXLAN header: the checks below say which limit it breaks
            sport, _dport, udp_len, udp_csum = struct.unpack_from("!HHHH", frame, udp)
            flags = vni_word = 0
        if udp_len < 8 or udp_len > tot_len - ihl:
            return self._drop(DropReason.UDP_BAD_LENGTH, count)
        end = udp + udp_len  # the UDP length rules: bytes after it are not the datagram's
        view = memoryview(frame)
        if udp_csum and not checksum_unnecessary:  # zero: sent without one, fine over IPv4
            pseudo = _sum16(view[26:34]) + pk.IPPROTO_UDP + udp_len
            if (pseudo + _sum16(view[udp:end])) % 0xFFFF:  # a valid datagram sums to 0xffff
                return self._drop(DropReason.UDP_BAD_CHECKSUM, count)
        if udp_len < 8 + VXLAN_HLEN:
            return self._drop(DropReason.VXLAN_TRUNCATED, count)
        if not flags & _FLAGS_WORD:
            return self._drop(DropReason.VXLAN_INVALID_HDR, count)
        vni = vni_word >> 8
        if vni != self.vni:
            return self._drop(DropReason.VXLAN_VNI_NOT_FOUND, count)
        if flags != _FLAGS_WORD or vni_word & 0xFF:
            return self._drop(DropReason.VXLAN_INVALID_HDR, count)
        start = udp + 8 + VXLAN_HLEN
        if end - start < pk.ETH_HLEN:
            return self._drop(DropReason.VXLAN_TRUNCATED, count)
        inner = view[start:end]
        if inner[6:12] == self.mac:
            return self._drop(DropReason.VXLAN_LOCAL_MAC, count)
        if inner[12] == 0x08 and inner[13] == 0x00:
            if end - start < 34:
                return self._drop(DropReason.VXLAN_TRUNCATED, count)
            if tos & _ECN_CE == _ECN_CE:  # the underlay marked congestion (RFC 6040)
                inner_ecn = inner[15] & _ECN_CE
                if not inner_ecn:
                    return self._drop(DropReason.IP_TUNNEL_ECN, count)
                if inner_ecn != _ECN_CE:
                    inner = _set_ce(inner)
        if count:
            self._rx += 1
            self._rx_bytes += end - start
        return _new_tuple(Decapsulated, (inner, src, sport, vni))

    # ---- counters ---------------------------------------------------------------------------

    def _drop(self, reason: DropReason, count: bool = True) -> DropReason:
        if count:
            self._drops[reason.value] += 1
        return reason

    def statistics(self) -> VtepStatistics:
        return VtepStatistics(self._tx, self._tx_bytes, self._rx, self._rx_bytes, dict(self._drops))

    def __repr__(self) -> str:
        return (f"Vtep(vni {self.vni}, local {pk.ip_str(self.local_ip)}, dstport {self.port}, "
                f"mac {pk.mac_str(self.mac)}, mtu {self.inner_mtu})")


def _set_ce(inner) -> bytearray:
    """A copy of the inner frame with CE in its IPv4 header and the header checksum updated (RFC 1624)."""
    out = bytearray(inner)
    old = out[14] << 8 | out[15]
    new = old | _ECN_CE
    out[15] = new & 0xFF
    checksum = update16(out[24] << 8 | out[25], old, new)
    out[24:26] = checksum.to_bytes(2, "big")
    return out


__all__ = ["DEFAULT_TTL", "DEFAULT_VNI", "EPHEMERAL_PORTS", "FLANNEL_PORT", "IANA_PORT", "LINUX_DEFAULT_PORT",
           "OUTER_HLEN", "VXLAN_HLEN", "VXLAN_OVERHEAD", "Decapsulated", "Peer", "Vtep", "VtepStatistics",
           "flow_hash", "source_port"]
