"""Independent reference arithmetic for the core tests (nothing from podnet.core.checksum)."""

from __future__ import annotations

import struct


def naive_sum(data: bytes) -> int:
    """RFC 1071 §4.1: one's complement sum of 16-bit big-endian words, end-around carry, not inverted."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def naive_checksum(data: bytes) -> int:
    return ~naive_sum(data) & 0xFFFF


def fix_ip_checksum(frame: bytearray) -> bytearray:
    """Recompute the IPv4 header checksum in place (frames too short or with a bogus IHL are left as they are)."""
    ihl = (frame[14] & 0x0F) * 4 if len(frame) > 14 else 20
    ihl = ihl if ihl >= 20 else 20
    if len(frame) >= 14 + ihl:
        frame[24:26] = b"\x00\x00"
        frame[24:26] = struct.pack("!H", naive_checksum(bytes(frame[14:14 + ihl])))
    return frame
