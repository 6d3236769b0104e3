"""core/gso.py against the kernel's own TCP segmentation (root).

In a namespace of its own, a bridge joins two TAPs: `tso` takes writes with a virtio-net header,
`plain` was opened with TUNSETOFFLOAD(0), so the kernel may hand it neither GSO frames nor partial
checksums. A TCP super-frame written into `tso` (gso_type TCPV4, NEEDS_CSUM) is forwarded by the
bridge to `plain`, and validate_xmit_skb has to cut it there, with tcp_gso_segment and
inet_gso_segment, in software. What `plain` reads is what the kernel made; `segment_tcp4` must
make the same bytes. Everything is named `pn-<token>-...`, journalled first and removed at the end.
"""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from podnet.core import gso

from plumbing import read_frames
from rfc1071 import fold_sum

pytestmark = pytest.mark.root

SRC, DST = "10.244.1.2", "10.244.2.2"
SRC_MAC, DST_MAC = bytes.fromhex("020000000102"), bytes.fromhex("020000000202")


def super_frame(payload: bytes, *, flags: int, seq: int, ip_id: int) -> bytes:
    """Ethernet/IPv4/TCP with timestamps; the TCP checksum field holds the pseudo-header sum of the
    whole segment, as a TSO sender leaves it (CHECKSUM_PARTIAL)."""
    options = b"\x01\x01\x08\x0a" + struct.pack("!II", 1111, 2222)
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, seq, 99, (20 + len(options)) // 4 << 4, flags, 1024, 0, 0) + options
    total = 20 + len(tcp) + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ip_id, 0x4000, 64, 6, 0,
                               socket.inet_aton(SRC), socket.inet_aton(DST)))
    ip[10:12] = struct.pack("!H", ~fold_sum(ip) & 0xFFFF)
    seed = fold_sum(socket.inet_aton(SRC) + socket.inet_aton(DST) + struct.pack("!BBH", 0, 6, len(tcp) + len(payload)))
    tcp = tcp[:16] + struct.pack("!H", seed) + tcp[18:]
    return DST_MAC + SRC_MAC + b"\x08\x00" + bytes(ip) + tcp + payload


@pytest.fixture
def bridged_taps(plumbing):
    bridge = plumbing.add_bridge("gso")
    tso = plumbing.open_bridge_tap(bridge, "tso", mtu=1500)
    plain = plumbing.open_bridge_tap(bridge, "plain", offloads=False, mtu=1500)
    assert plain.offloads == 0 and plain.vnet_hdr
    return tso, plain


def _is_tcp(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x00" and frame[23] == 6   # nothing else should come, but be sure


@pytest.mark.parametrize("size, mss, flags", [
    (20000, 1448, 0x18 | 0x01 | 0x80),     # ACK PSH FIN CWR: FIN/PSH only last, CWR only first
    (7001, 1000, 0x10),                    # an odd tail
    (1448 * 4, 1448, 0x18),                # an exact multiple
], ids=["fin-psh-cwr", "odd-tail", "exact"])
def test_segment_tcp4_cuts_a_super_frame_exactly_as_the_kernel_does(bridged_taps, size, mss, flags):
    tso, plain = bridged_taps
    frame = super_frame(random.Random(size).randbytes(size), flags=flags, seq=0xFFFFF000, ip_id=0xFFFE)
    vnet = gso.VnetHeader(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.GSO_TCPV4, 14 + 20 + 32, mss, 34, 16).pack()
    ours = [bytes(s) for s in gso.segment_tcp4(frame, mss)]
    os.writev(tso.fd, [vnet, frame])
    kernel = read_frames(plain, len(ours), _is_tcp)
    assert all(v == bytes(10) for v, _ in kernel)            # complete frames: no offload left for us
    assert len(kernel) == len(ours) == -(-size // mss)
    for i, ((_, theirs), mine) in enumerate(zip(kernel, ours)):
        assert theirs == mine, f"segment {i}: kernel {theirs[:80].hex()} podnet {mine[:80].hex()}"
