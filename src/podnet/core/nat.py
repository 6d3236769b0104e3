"""NAT: the one place where podnet rewrites addresses and ports in a frame.

Layer: core (pure functions on a mutable buffer, no I/O). A service backend decides where a NEW
flow goes, conntrack pins that decision as a `NatBinding`, and this module applies it to every
packet of the flow, in both directions, the way netfilter's NAT does after the decision is made.

Rules this module keeps:

- Frames are rewritten in place (a `bytearray` or a writable `memoryview`); the Ethernet header
  is 14 bytes, so the IPv4 header starts at offset 14 unless `ip_offset` says otherwise.
- Checksum arithmetic lives in `checksum.py`; this module only decides which update applies.
  The IPv4 header checksum is never offloaded, so it is always updated (RFC 1624).
- TCP and UDP, when the virtio-net header says NEEDS_CSUM (flags & 1, CHECKSUM_PARTIAL): the
  checksum field holds the folded, *uninverted* pseudo-header sum that the consumer completes.
  An address change updates that seed (`pseudo_seed_update32`); a port change leaves it alone,
  because ports lie inside the range the consumer sums (reference/performance.md §3, items 1-3).
  For GSO super-frames the seed's L4 length is that of the whole super-frame; NAT never changes
  it, so nothing else in the vnet header changes either.
- TCP and UDP otherwise (a fully checksummed frame): the checksum gets RFC 1624 updates for the
  addresses (they are in the pseudo-header) and for the ports.
- UDP over IPv4 with checksum 0 means "no checksum" (RFC 768) and stays 0. A UDP checksum that an
  update makes 0x0000 is sent as 0xffff, its other one's complement form, as RFC 768 requires.
- ICMP has no pseudo-header: address changes leave its checksum alone; an echo identifier change
  (NATed ping) updates it. For ICMP the `sport` slot of a tuple or a rewrite is the identifier,
  as in the kernel's tuple (src.u.icmp.id), and the type/code are never rewritten.
- An ICMP error about a NATed flow (RELATED) gets the reverse rewrite on the header it quotes,
  so the sender recognises its own packet; as in the kernel (nf_nat_icmp_reply_translation) the
  outer addresses are set to the flow's, and the ICMP checksum is recomputed over the message.
- Applying a rewrite and then its inverse restores the frame byte for byte (RFC 1624 eqn. 3 is
  exactly reversible for every checksum a correct sender produces).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from .checksum import internet_checksum, pseudo_seed_update32, update16, update32

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
ETH_HLEN = 14

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1   # vnet header flags bit: CHECKSUM_PARTIAL

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

# where each protocol keeps its checksum, from the start of its header
_CSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2}


class Rewrite(NamedTuple):
    """The header fields one direction of a flow sets; None leaves a field as it is.

    For ICMP, `sport` is the echo identifier and `dport` is always None."""

    src: int | None = None
    sport: int | None = None
    dst: int | None = None
    dport: int | None = None


@dataclass(frozen=True, slots=True)
class NatBinding:
    """A flow's NAT, pinned both ways: what each direction's packets are rewritten to.

    `original` is the first packet's tuple as it arrived, `translated` the same packet after DNAT
    and/or SNAT (what the far end sees). Original-direction packets are rewritten to look like
    `translated`; reply packets, which arrive as the inverse of `translated`, are rewritten to the
    inverse of `original`, so a client sees the ClusterIP it dialled answer (the kernel's rule:
    each direction becomes the inverse of the other direction's tuple). Tuples are
    (proto, src, sport, dst, dport) of ints, conntrack's FlowTuple or any plain tuple.
    """

    original: tuple
    translated: tuple
    rewrites: tuple[Rewrite, Rewrite]   # indexed by direction: 0 original, 1 reply

    @classmethod
    def between(cls, original: tuple, translated: tuple) -> NatBinding | None:
        """The binding that turns `original` into `translated`, or None when they are equal."""
        proto, src, sport, dst, dport = original
        tproto, tsrc, tsport, tdst, tdport = translated
        if tproto != proto:
            raise ValueError(f"NAT cannot change the protocol ({proto} -> {tproto})")
        if translated == original:
            return None
        new_src = tsrc if tsrc != src else None
        new_dst = tdst if tdst != dst else None
        new_sport = tsport if tsport != sport else None
        if proto == IPPROTO_ICMP:
            if tdport != dport:
                raise ValueError("NAT cannot change an ICMP type or code")
            # the identifier sits in the same slot of both directions' tuples
            forward = Rewrite(new_src, new_sport, new_dst, None)
            back = Rewrite(dst if new_dst is not None else None, sport if new_sport is not None else None,
                           src if new_src is not None else None, None)
        else:
            new_dport = tdport if tdport != dport else None
            forward = Rewrite(new_src, new_sport, new_dst, new_dport)
            back = Rewrite(dst if new_dst is not None else None, dport if new_dport is not None else None,
                           src if new_src is not None else None, sport if new_sport is not None else None)
        return cls(tuple(original), tuple(translated), (forward, back))

    @property
    def proto(self) -> int:
        return self.original[0]

    @property
    def dnat(self) -> bool:
        """The destination (address or port) changes: the kernel's IPS_DST_NAT."""
        return self.rewrites[0].dst is not None or self.rewrites[0].dport is not None

    @property
    def snat(self) -> bool:
        """The source (address or port / ICMP id) changes: the kernel's IPS_SRC_NAT."""
        return self.rewrites[0].src is not None or self.rewrites[0].sport is not None

    def for_direction(self, direction: int) -> Rewrite:
        return self.rewrites[direction]


def needs_csum(vnet) -> bool:
    """True when a virtio-net header marks the frame CHECKSUM_PARTIAL."""
    return vnet is not None and len(vnet) > 0 and bool(vnet[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM)


def rewrite(frame, l4_offset: int, proto: int, *, src: int | None = None, sport: int | None = None,
            dst: int | None = None, dport: int | None = None, vnet=None, ip_offset: int = ETH_HLEN) -> None:
    """Set the given IPv4 addresses and TCP/UDP ports (ICMP: `sport` is the echo id) in place,
    keeping every checksum right (see the module rules). Fields that already hold the value are
    left alone. Other protocols may only have their addresses changed."""
    partial = vnet is not None and len(vnet) > 0 and vnet[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM
    _rewrite(frame, ip_offset, l4_offset, proto, src, sport, dst, dport, partial, len(frame))


def apply(frame, l4_offset: int, binding: NatBinding, direction: int, vnet=None,
          ip_offset: int = ETH_HLEN) -> None:
    """Rewrite one packet of a NATed flow travelling in `direction` (0 original, 1 reply)."""
    r = binding.rewrites[direction]
    partial = vnet is not None and len(vnet) > 0 and vnet[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM
    _rewrite(frame, ip_offset, l4_offset, binding.original[0], r[0], r[1], r[2], r[3], partial, len(frame))


def _rewrite(frame, ip: int, l4: int, proto: int, src, sport, dst, dport, partial, end: int) -> None:
    coff = _CSUM_OFFSET.get(proto)
    if coff is not None:
        coff += l4
        if coff + 2 > end:
            coff = None   # a quoted header cut short before its checksum: nothing to keep right
    ip_sum = frame[ip + 10] << 8 | frame[ip + 11]
    l4_sum = 0
    if coff is not None:
        l4_sum = frame[coff] << 8 | frame[coff + 1]
        if proto == IPPROTO_UDP and l4_sum == 0 and not partial:
            coff = None   # RFC 768: no checksum over IPv4
    pseudo = coff is not None and proto != IPPROTO_ICMP

    if src is not None:
        old, = _U32.unpack_from(frame, ip + 12)
        if old != src:
            _U32.pack_into(frame, ip + 12, src)
            ip_sum = update32(ip_sum, old, src)
            if pseudo:
                l4_sum = pseudo_seed_update32(l4_sum, old, src) if partial else update32(l4_sum, old, src)
    if dst is not None:
        old, = _U32.unpack_from(frame, ip + 16)
        if old != dst:
            _U32.pack_into(frame, ip + 16, dst)
            ip_sum = update32(ip_sum, old, dst)
            if pseudo:
                l4_sum = pseudo_seed_update32(l4_sum, old, dst) if partial else update32(l4_sum, old, dst)

    if sport is not None or dport is not None:
        if proto == IPPROTO_ICMP:
            if dport is not None:
                raise ValueError("ICMP has no destination port; its identifier goes in sport")
            sport_at, dport_at = l4 + 4, -1
        elif proto == IPPROTO_TCP or proto == IPPROTO_UDP:
            sport_at, dport_at = l4, l4 + 2
        else:
            raise ValueError(f"protocol {proto} has no ports to rewrite")
        # a partial checksum needs no fix for these: they lie inside the range the consumer sums
        fix = coff is not None and not partial
        if sport is not None:
            old = frame[sport_at] << 8 | frame[sport_at + 1]
            if old != sport:
                _U16.pack_into(frame, sport_at, sport)
                if fix:
                    l4_sum = update16(l4_sum, old, sport)
        if dport is not None:
            old = frame[dport_at] << 8 | frame[dport_at + 1]
            if old != dport:
                _U16.pack_into(frame, dport_at, dport)
                if fix:
                    l4_sum = update16(l4_sum, old, dport)

    _U16.pack_into(frame, ip + 10, ip_sum)
    if coff is not None:
        if proto == IPPROTO_UDP and l4_sum == 0 and not partial:
            l4_sum = 0xFFFF   # RFC 768: a computed zero is sent as all ones
        _U16.pack_into(frame, coff, l4_sum)


# ---- ICMP errors about a tracked flow (RELATED) ---------------------------------------------

def _quote(frame, l4_offset: int, ip_offset: int) -> tuple[int, int, int] | None:
    """Where the packet an ICMP error quotes lies: (its IP offset, its L4 offset, the end of the
    error's datagram), or None when the quote cannot hold an IPv4 header plus 8 bytes (RFC 792)."""
    end = min(len(frame), ip_offset + (frame[ip_offset + 2] << 8 | frame[ip_offset + 3]))
    inner_ip = l4_offset + 8
    if inner_ip + 20 > end or frame[inner_ip] >> 4 != 4:
        return None
    inner_l4 = inner_ip + (frame[inner_ip] & 0x0F) * 4
    if inner_l4 - inner_ip < 20 or inner_l4 + 8 > end:
        return None
    return inner_ip, inner_l4, end


def icmp_error_inner(frame, l4_offset: int, ip_offset: int = ETH_HLEN) -> tuple | None:
    """The tuple of the packet an ICMP error quotes, as (proto, src, sport, dst, dport); for a
    quoted ICMP message (proto, src, id, dst, type << 8 | code). None when the quote is too short
    to hold an IPv4 header and 8 bytes of the next one (RFC 792) or is not IPv4."""
    quote = _quote(frame, l4_offset, ip_offset)
    if quote is None:
        return None
    inner_ip, inner_l4, _end = quote
    proto = frame[inner_ip + 9]
    src, = _U32.unpack_from(frame, inner_ip + 12)
    dst, = _U32.unpack_from(frame, inner_ip + 16)
    if proto == IPPROTO_ICMP:
        ident = frame[inner_l4 + 4] << 8 | frame[inner_l4 + 5]
        return (proto, src, ident, dst, frame[inner_l4] << 8 | frame[inner_l4 + 1])
    if proto == IPPROTO_TCP or proto == IPPROTO_UDP:
        sport, dport = struct.unpack_from("!HH", frame, inner_l4)
        return (proto, src, sport, dst, dport)
    return (proto, src, 0, dst, 0)


def rewrite_icmp_error(frame, l4_offset: int, binding: NatBinding, direction: int, vnet=None,
                       ip_offset: int = ETH_HLEN) -> bool:
    """Translate an ICMP error that travels in `direction` of a NATed flow (RELATED).

    The quoted packet went the other way, already translated; it is given back its untranslated
    form, so the quoted tuple becomes the inverse of the error's own translated addresses. The
    outer header gets the direction's address rewrite, which, as in the kernel, also replaces the
    address of a router that sent the error with the flow's (a client sees its ClusterIP, never a
    backend or a hop behind it). The ICMP checksum is recomputed over the whole message, as
    nf_nat_icmp_reply_translation does, because the quote's own checksums changed too. Returns
    False, changing nothing, when the quote is too short to translate.
    """
    quote = _quote(frame, l4_offset, ip_offset)
    if quote is None:
        return False
    inner_ip, inner_l4, end = quote
    inner_proto = frame[inner_ip + 9]
    if inner_proto != binding.original[0]:
        return False
    r = binding.rewrites[direction]
    # the quoted packet travelled the other way: its source takes what this direction sets as
    # destination and vice versa (an ICMP identifier stays in its one slot)
    if inner_proto == IPPROTO_ICMP:
        _rewrite(frame, inner_ip, inner_l4, inner_proto, r.dst, r.sport, r.src, None, False, end)
    elif inner_proto == IPPROTO_TCP or inner_proto == IPPROTO_UDP:
        _rewrite(frame, inner_ip, inner_l4, inner_proto, r.dst, r.dport, r.src, r.sport, False, end)
    else:
        _rewrite(frame, inner_ip, inner_l4, inner_proto, r.dst, None, r.src, None, False, end)
    # outer: addresses only (ICMP has no pseudo-header), IP header checksum kept right
    _rewrite(frame, ip_offset, l4_offset, 0, r.src, None, r.dst, None, False, end)
    partial = vnet is not None and len(vnet) > 0 and vnet[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM
    if not partial:   # with CHECKSUM_PARTIAL the consumer sums the message, quote included
        frame[l4_offset + 2] = frame[l4_offset + 3] = 0
        _U16.pack_into(frame, l4_offset + 2, internet_checksum(frame[l4_offset:end]))
    return True
