"""MTU accounting for a VXLAN tunnel: what fits, and what happens to a packet that does not.

Layer: core, sans-IO.

VXLAN over IPv4 adds 50 bytes inside the underlay's MTU: outer IPv4 20 + UDP 8 + VXLAN 8 + the
inner Ethernet header 14 (the outer Ethernet header is not part of any IP MTU). On a 1500-byte
underlay the tunnel device, flannel.1, therefore has MTU 1450: flanneld sets it to the uplink's
MTU - 50 (pkg/backend/vxlan, `encapOverhead = 50`), the kernel picks the same when a vxlan device is
created with `dev`, and Flannel's CNI plugin gives pods that MTU (FLANNEL_MTU in subnet.env).

A packet routed into the tunnel is measured against that MTU the way ip_forward() does:

    fits                                      -> FITS
    too big, DF set                           -> FRAG_NEEDED: dropped, and ICMP destination
                                                 unreachable / fragmentation needed (type 3
                                                 code 4) carrying the tunnel MTU goes back to the
                                                 sender (RFC 1191), which lowers its path MTU
    too big, DF clear                         -> FRAGMENT: the kernel would fragment it
                                                 (ip_fragment); podnet does not fragment, so the
                                                 datapath counts it as MTU_EXCEEDED
    a GSO super-frame whose segments fit      -> FITS (skb_gso_validate_network_len): segments
                                                 are cut to gso_size before they go on the wire

The decision: podnet answers DF packets exactly as the kernel does (Linux TCP and, with the
default IP_PMTUDISC_WANT, UDP both set DF, so this is the case that occurs); non-DF packets over
the MTU are a counted drop rather than fragments, a documented difference from the kernel.

Invariants: never raises on wire input; the ICMP error quotes the offending header + 8 bytes and
is built only when RFC 1122's rules allow one (`packet.should_send_icmp_error`, the caller's check).
"""

from __future__ import annotations

import enum

from ...errors import ConfigError
from .. import packet as pk

VXLAN_OVERHEAD = 20 + 8 + 8 + 14  # outer IPv4 + UDP + VXLAN + inner Ethernet: 50
MIN_IPV4_MTU = 68                  # RFC 791: every IPv4 link carries 68 bytes unfragmented
_IP_DF = 0x4000


class MtuVerdict(enum.Enum):
    FITS = "fits"
    FRAG_NEEDED = "frag_needed"   # DF set: drop, ICMP 3/4 with the MTU to the sender
    FRAGMENT = "fragment"         # DF clear: the kernel fragments; podnet drops (MTU_EXCEEDED)


def tunnel_mtu(underlay_mtu: int) -> int:
    """The MTU of the tunnel device on an IPv4 underlay of `underlay_mtu`: 1450 on 1500."""
    mtu = underlay_mtu - VXLAN_OVERHEAD
    if mtu < MIN_IPV4_MTU:
        raise ConfigError(f"underlay_mtu {underlay_mtu}: a VXLAN tunnel needs at least "
                          f"{MIN_IPV4_MTU + VXLAN_OVERHEAD} bytes (IPv4's 68 + {VXLAN_OVERHEAD} of headers)")
    return mtu


def check_mtu(frame, mtu: int, gso_size: int = 0) -> MtuVerdict:
    """Whether the inner Ethernet `frame` fits a tunnel of `mtu`, and what to do if it does not.

    An IPv4 packet is measured by its total length (Ethernet padding does not count); any other
    frame by its length past the Ethernet header. With `gso_size` (a virtio-net header's, for a TSO
    super-frame) each segment is measured instead: IP header + TCP header + gso_size.
    """
    n = len(frame)
    if n < 34 or frame[12] != 0x08 or frame[13] != 0x00:
        return MtuVerdict.FITS if n - pk.ETH_HLEN <= mtu else MtuVerdict.FRAGMENT
    length = frame[16] << 8 | frame[17]
    if length <= mtu:
        return MtuVerdict.FITS
    if gso_size:
        ihl = (frame[14] & 0x0F) * 4
        l4 = pk.ETH_HLEN + ihl
        l4_len = (frame[l4 + 12] >> 4) * 4 if frame[23] == pk.IPPROTO_TCP and n >= l4 + 13 else 8
        if ihl + l4_len + gso_size <= mtu:
            return MtuVerdict.FITS
    if not (frame[20] << 8) & _IP_DF:
        return MtuVerdict.FRAGMENT
    return MtuVerdict.FRAG_NEEDED


def build_frag_needed(frame, info: pk.IPv4Info, mtu: int, our_mac: bytes, our_ip: int) -> bytes:
    """ICMP destination unreachable, fragmentation needed (type 3, code 4), next-hop MTU `mtu`
    (RFC 1191 section 4), from `our_ip` back to the sender of `frame`: what ip_forward() sends."""
    return pk.build_icmp_error(frame, info, pk.ICMP_DEST_UNREACH, pk.ICMP_FRAG_NEEDED, our_mac, our_ip,
                               rest_of_header=mtu & 0xFFFF)
