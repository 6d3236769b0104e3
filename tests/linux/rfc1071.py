"""An RFC 1071 sum written apart from podnet.core.checksum, so that the kernel tests that check
checksums (podnet's and the kernel's) do not check podnet with podnet's own code."""

from __future__ import annotations

import struct


def fold_sum(data: bytes) -> int:
    """The one's complement sum of 16-bit words, folded, not inverted."""
    data = bytes(data) + b"\x00" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total
