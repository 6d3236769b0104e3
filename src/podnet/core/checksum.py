"""Internet checksums (RFC 1071) and their incremental update (RFC 1624).

Layer: core (pure functions, no I/O). Every rewrite of a header field that a checksum covers goes
through `update16` / `update32` here, so there is exactly one place where checksum arithmetic can be
wrong. RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), is used rather than RFC 1141's form because it never
produces the 0x0000 / 0xffff ambiguity RFC 1624 §3 warns about.
"""

from __future__ import annotations


def fold(total: int) -> int:
    """Fold a one's complement running sum into 16 bits (no inversion)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 checksum of `data` (odd lengths padded with a zero byte), already inverted."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    # A big integer reduced modulo 0xffff is the one's complement sum of its 16-bit words
    # (2**16 == 1 mod 0xffff); it only needs care to tell 0 from 0xffff.
    total = int.from_bytes(data, "big") % 0xFFFF + initial
    total = fold(total)
    if total == 0 and any(data):
        total = 0xFFFF
    return (~total) & 0xFFFF


def ipv4_header_ok(frame, offset: int = 14, ihl_bytes: int = 20) -> bool:
    """True when the IPv4 header at `offset` has a valid header checksum.

    A correct header sums (one's complement) to 0xffff, i.e. to 0 modulo 0xffff, and is never all
    zero because the version nibble is 4.
    """
    return int.from_bytes(frame[offset:offset + ihl_bytes], "big") % 0xFFFF == 0


def update16(checksum: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: the checksum after one 16-bit word changed from `old` to `new`."""
    total = (~checksum & 0xFFFF) + (~old & 0xFFFF) + new
    return ~fold(total) & 0xFFFF


def update32(checksum: int, old: int, new: int) -> int:
    """The checksum after a 32-bit field (an IPv4 address) changed, as two 16-bit updates."""
    total = (~checksum & 0xFFFF) + (~(old >> 16) & 0xFFFF) + (new >> 16)
    total += (~old & 0xFFFF) + (new & 0xFFFF)
    return ~fold(total) & 0xFFFF


def pseudo_seed_update32(seed: int, old: int, new: int) -> int:
    """Update a CHECKSUM_PARTIAL seed (the folded, *uninverted* pseudo-header sum) for an address change.

    With a vnet header flagged NEEDS_CSUM, the L4 checksum field holds the pseudo-header sum that the
    consumer completes; it is updated by S' = S + ~old + new with no final inversion
    (reference/performance.md §3, as the kernel's inet_proto_csum_replace4 with pseudohdr=true).
    """
    total = seed + (~(old >> 16) & 0xFFFF) + (new >> 16) + (~old & 0xFFFF) + (new & 0xFFFF)
    return fold(total)
