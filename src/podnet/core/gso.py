"""Software GSO for TCP over IPv4, and finishing a CHECKSUM_PARTIAL frame: what the kernel does to
a frame before it leaves through a device that can do neither in hardware.

Layer: core, sans-IO. A pod's TAP opened with TSO offloads hands podnet TCP "super-frames" of up
to 64 KB plus a virtio-net header saying how to cut them (gso_type TCPV4, gso_size = the MSS), and
frames whose TCP/UDP checksum holds only the pseudo-header sum (flags NEEDS_CSUM). Forwarded to
another TAP, both travel as they are and the kernel on the far side finishes them. Encapsulated in
VXLAN they cannot: the outer UDP checksum covers the inner bytes, and the underlay carries
MTU-sized frames. So the VXLAN stage first asks `finish(frame, vnet)` for what a device without
offloads would send (the kernel's validate_xmit_skb: skb_gso_segment, else skb_checksum_help).

virtio_net_hdr (include/uapi/linux/virtio_net.h, little-endian), 10 bytes:

    flags[0] (1 NEEDS_CSUM, 2 DATA_VALID)  gso_type[1] (0 NONE, 1 TCPV4, 3 UDP, 4 TCPV6, 5 UDP_L4,
    | 0x80 ECN)  hdr_len[2:4]  gso_size[4:6]  csum_start[6:8]  csum_offset[8:10]

GSO over a UDP tunnel (Linux 6.18, linux/tap.py `udp_tunnel_gso`): a TAP with a 24-byte header
reads and writes `struct virtio_net_hdr_v1_hash_tunnel` (`TunnelVnetHeader`): the 10 bytes above,
num_buffers[10:12] hash_value[12:16] hash_report[16:18] padding[18:20] outer_th_offset[20:22]
inner_nh_offset[22:24]. gso_type = the inner type | GSO_UDP_TUNNEL_IPV4 (0x20, 0x40 for an IPv6
outer header); NEEDS_CSUM with csum_start/csum_offset at the inner L4 checksum; for VXLAN over
IPv4 outer_th_offset = 34 (the outer UDP header) and inner_nh_offset = 64 (the inner IPv4 header).
The kernel then carries one outer frame of up to 64 KB and cuts it where a device cannot take it.

Segmentation follows net/ipv4/tcp_offload.c (tcp_gso_segment) and af_inet.c (inet_gso_segment):

- the payload after the TCP header is cut into gso_size pieces; every segment repeats the
  Ethernet, IPv4 and TCP headers (options included);
- IPv4: total length of the segment, identification id, id+1, id+2, ... (the super-frame's id
  first), header checksum recomputed; DF and TTL as they were;
- TCP: sequence number advanced by the bytes before the segment; FIN and PSH only on the last
  segment; CWR only on the first (cleared on the others, tcp_gso_segment's `th->cwr &= 0` without
  AccECN); the checksum of each segment computed in full (gso_make_checksum: no 0 -> 0xffff);
- a super-frame whose payload fits in one segment is not cut: it only gets its checksum
  finished, as skb_checksum_help does (which sends a computed 0 as 0xffff, CSUM_MANGLED_0).

The header length, the L4 offset and the checksum offsets are read from the frame itself, never
from hdr_len / csum_start (tap.py: "not reliable; recompute"), except where a NEEDS_CSUM frame
that is not GSO says where its checksum lies.

Invariants: never raises on wire input (a frame that cannot be what its header claims is
`DropReason.GSO_INVALID`); the input frame is never modified; trailing bytes past the IPv4 total
length (Ethernet padding) are not part of any segment or checksum.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import packet as pk
from .packet import DropReason

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
GSO_UDP_TUNNEL_IPV4 = 0x20
GSO_UDP_TUNNEL_IPV6 = 0x40
GSO_UDP_TUNNEL = GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6
VNET_HDR_TUNNEL_LEN = 24

_VNET = struct.Struct("<BBHHHH")
_VNET_TUNNEL = struct.Struct("<BBHHHHHIHHHH")
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80


class VnetHeader(NamedTuple):
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def parse(cls, vnet) -> VnetHeader | None:
        """The header of a frame, or None when there is none (or it is too short to be one)."""
        if vnet is None or len(vnet) < VNET_HDR_LEN:
            return None
        return cls._make(_VNET.unpack_from(vnet))

    def pack(self) -> bytes:
        return _VNET.pack(*self)

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~GSO_ECN


class TunnelVnetHeader(NamedTuple):
    """struct virtio_net_hdr_v1_hash_tunnel (24 bytes, little-endian): see the module."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0
    hash_value: int = 0
    hash_report: int = 0
    padding: int = 0
    outer_th_offset: int = 0
    inner_nh_offset: int = 0

    @classmethod
    def parse(cls, vnet) -> TunnelVnetHeader | None:
        if vnet is None or len(vnet) < VNET_HDR_TUNNEL_LEN:
            return None
        return cls._make(_VNET_TUNNEL.unpack_from(vnet))

    def pack(self) -> bytes:
        return _VNET_TUNNEL.pack(*self)


def _sum16(data) -> int:
    """The one's complement sum of `data` as 16-bit words, modulo 0xffff (odd lengths padded)."""
    total = int.from_bytes(data, "big")
    if len(data) & 1:
        total <<= 8
    return total % 0xFFFF


def _ipv4_bounds(frame) -> tuple[int, int, int] | DropReason:
    """(IPv4 header length, L4 offset, end of the IPv4 packet) of an Ethernet/IPv4 frame."""
    n = len(frame)
    if n < pk.ETH_HLEN + 20 or frame[12] != 0x08 or frame[13] != 0x00 or frame[14] >> 4 != 4:
        return DropReason.GSO_INVALID
    ihl = (frame[14] & 0x0F) * 4
    tot_len = frame[16] << 8 | frame[17]
    if ihl < 20 or tot_len < ihl or pk.ETH_HLEN + tot_len > n:
        return DropReason.GSO_INVALID
    return ihl, pk.ETH_HLEN + ihl, pk.ETH_HLEN + tot_len


def _l4_checksum(frame, l4: int, end: int, proto: int) -> int:
    """The folded one's complement sum of the pseudo-header and the L4 bytes [l4, end), with the
    checksum field counted as it stands (the caller zeroes it first)."""
    pseudo = _sum16(frame[26:34]) + proto + (end - l4)
    return (pseudo + _sum16(frame[l4:end])) % 0xFFFF


def complete_checksum(frame, csum_start: int, csum_offset: int) -> bool:
    """Finish a CHECKSUM_PARTIAL frame in place, as skb_checksum_help does: the field at
    csum_start + csum_offset holds the pseudo-header sum; the sum of everything from csum_start to
    the end of the IPv4 packet, folded and inverted, replaces it (0 is sent as 0xffff). False,
    and the frame untouched, when the offsets do not lie inside the packet."""
    bounds = _ipv4_bounds(frame)
    if isinstance(bounds, DropReason):
        return False
    end = bounds[2]
    field = csum_start + csum_offset
    if not pk.ETH_HLEN + 20 <= csum_start or field + 2 > end:
        return False
    total = _sum16(frame[csum_start:end])
    checksum = -total % 0xFFFF or 0xFFFF   # ~fold(sum); CSUM_MANGLED_0 for a 0
    frame[field] = checksum >> 8
    frame[field + 1] = checksum & 0xFF
    return True


def segment_tcp4(frame, gso_size: int, *, fixed_id: bool = False) -> list[bytearray] | DropReason:
    """Cut a TCPv4 super-frame into segments of at most `gso_size` payload bytes, each with
    complete checksums (see the module rules). The checksum the super-frame carries is ignored."""
    bounds = _ipv4_bounds(frame)
    if isinstance(bounds, DropReason):
        return bounds
    ihl, l4, end = bounds
    if frame[23] != pk.IPPROTO_TCP or frame[20] & 0x3F or frame[21] or l4 + 20 > end:
        return DropReason.GSO_INVALID       # not TCP, or a fragment: nothing tcp_gso_segment takes
    thl = (frame[l4 + 12] >> 4) * 4
    if thl < 20 or l4 + thl > end or gso_size <= 0:
        return DropReason.GSO_INVALID
    header_end = l4 + thl
    payload = end - header_end
    if payload <= gso_size:                  # tcp_gso_segment: skb->len <= mss, not segmented
        single = bytearray(frame[:end])
        single[l4 + 16:l4 + 18] = b"\x00\x00"
        checksum = -_l4_checksum(single, l4, end, pk.IPPROTO_TCP) % 0xFFFF or 0xFFFF
        single[l4 + 16:l4 + 18] = checksum.to_bytes(2, "big")
        return [single]
    headers = bytearray(frame[:header_end])
    headers[24:26] = b"\x00\x00"             # IPv4 header checksum, recomputed per segment
    headers[l4 + 16:l4 + 18] = b"\x00\x00"   # TCP checksum, computed per segment
    ip_id = frame[18] << 8 | frame[19]
    seq = int.from_bytes(frame[l4 + 4:l4 + 8], "big")
    flags = frame[l4 + 13]
    # what every segment's TCP checksum shares: the pseudo-header addresses and protocol, and the
    # TCP header with the fields that change per segment (seq, flags, checksum) zeroed
    fixed = bytearray(headers[l4:header_end])
    fixed[4:8] = b"\x00\x00\x00\x00"
    fixed[13] = 0
    shared = _sum16(frame[26:34]) + pk.IPPROTO_TCP + _sum16(fixed)
    view = memoryview(frame)
    segments = []
    last = (payload - 1) // gso_size
    for index in range(last + 1):
        start = header_end + index * gso_size
        stop = min(start + gso_size, end)
        segment = headers + view[start:stop]
        tot_len = ihl + thl + (stop - start)
        segment[16] = tot_len >> 8
        segment[17] = tot_len & 0xFF
        if not fixed_id:
            segment_id = (ip_id + index) & 0xFFFF
            segment[18] = segment_id >> 8
            segment[19] = segment_id & 0xFF
        ip_sum = -_sum16(segment[14:l4]) % 0xFFFF
        segment[24] = ip_sum >> 8
        segment[25] = ip_sum & 0xFF
        segment_seq = (seq + index * gso_size) & 0xFFFFFFFF
        segment[l4 + 4:l4 + 8] = segment_seq.to_bytes(4, "big")
        segment_flags = flags
        if index != last:
            segment_flags &= ~(_TCP_FIN | _TCP_PSH)
        if index:
            segment_flags &= ~_TCP_CWR
        segment[l4 + 13] = segment_flags
        # the TCP length (pseudo-header), the sequence number's two words, the flags byte (the
        # low half of the word whose high half, the data offset, is in `shared`), the payload
        total = (shared + (tot_len - ihl) + (segment_seq >> 16) + (segment_seq & 0xFFFF) + segment_flags
                 + _sum16(view[start:stop]))
        checksum = -total % 0xFFFF
        segment[l4 + 16] = checksum >> 8
        segment[l4 + 17] = checksum & 0xFF
        segments.append(segment)
    return segments


def lco_sum(segment) -> int:
    """The one's complement sum (modulo 0xffff, as `_sum16`) of `segment[12:]` - the bytes an outer
    UDP checksum covers when the segment is carried in a tunnel - read from its own checksums
    instead of its payload: the kernel's local checksum offload (lco_csum, Documentation/networking/
    checksum-offloads.rst). A valid IPv4 header sums to 0 and a valid TCP segment to minus its
    pseudo-header, so only the ethertype and the pseudo-header remain. Only for what
    `segment_tcp4` returns (both checksums complete, nothing past the IPv4 total length)."""
    ihl = (segment[14] & 0x0F) * 4
    tcp_len = (segment[16] << 8 | segment[17]) - ihl
    return (0x0800 - _sum16(segment[26:34]) - pk.IPPROTO_TCP - tcp_len) % 0xFFFF


def finish(frame, vnet) -> list | DropReason:
    """What a device without offloads puts on the wire for `frame` and its virtio-net header:
    the segments of a TCPv4 GSO frame, the frame with its checksum finished when it is
    CHECKSUM_PARTIAL, else the frame itself (a one-element list). GSO types other than TCPv4
    (UDP fragmentation offload, IPv6) are `DropReason.GSO_INVALID`: an IPv4 node's pods do not
    send them, and podnet's TAPs never offer USO."""
    header = VnetHeader.parse(vnet)
    if header is None:
        return [frame]
    gso = header.gso
    if gso == GSO_TCPV4:
        return segment_tcp4(frame, header.gso_size)
    if gso != GSO_NONE:
        return DropReason.GSO_INVALID
    if header.needs_csum:
        out = bytearray(frame)
        if not complete_checksum(out, header.csum_start, header.csum_offset):
            return DropReason.GSO_INVALID
        return [out]
    return [frame]


__all__ = ["GSO_ECN", "GSO_NONE", "GSO_TCPV4", "GSO_TCPV6", "GSO_UDP", "GSO_UDP_L4", "GSO_UDP_TUNNEL",
           "GSO_UDP_TUNNEL_IPV4", "GSO_UDP_TUNNEL_IPV6", "TunnelVnetHeader", "VNET_HDR_LEN", "VNET_HDR_TUNNEL_LEN",
           "VIRTIO_NET_HDR_F_DATA_VALID", "VIRTIO_NET_HDR_F_NEEDS_CSUM", "VnetHeader", "complete_checksum",
           "finish", "lco_sum", "segment_tcp4"]
