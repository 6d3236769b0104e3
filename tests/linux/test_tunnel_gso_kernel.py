"""GSO over UDP tunnels on a TAP (Linux 6.18+), against the kernel (root).

In a namespace of its own a bridge joins three TAPs: `a` and `b` opened with `udp_tunnel_gso`
(TUN_F_UDP_TUNNEL_GSO, 24-byte vnet header), `plain` with TUNSETOFFLOAD(0). One whole VXLAN
super-frame, as core/internode.py builds it for a peer whose lease says PodnetTunnelGSO, is written
into `a`: `b` must read it whole, header offsets kept; `plain` must read the segments the kernel
cut, each what podnet's software path would put in it (inner bytes equal to `segment_tcp4`'s, the
outer IP ID counting up). Everything is named `pn-<token>-...`, journalled first and removed.
"""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from podnet.core import gso
from podnet.core.internode import _encapsulate_whole
from podnet.core.overlay.vxlan import Vtep
from podnet.linux.tap import TUN_F_UDP_TUNNEL_GSO

from plumbing import read_frames
from rfc1071 import fold_sum

pytestmark = pytest.mark.root

SRC, DST = "10.244.1.2", "10.244.2.2"
A_IP, B_IP = "192.0.2.1", "192.0.2.2"
A_MAC, B_MAC = "02:00:c0:00:02:01", "02:00:c0:00:02:02"
A_VTEP, B_VTEP = "0a:58:0a:f4:01:00", "0a:58:0a:f4:02:00"


def super_frame(payload: bytes, mss: int) -> tuple[bytes, bytes]:
    """A pod's TCP super-frame (timestamps, pseudo-header sum in the checksum field) and its header."""
    options = b"\x01\x01\x08\x0a" + struct.pack("!II", 1111, 2222)
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1000, 99, (20 + len(options)) // 4 << 4, 0x18, 1024, 0, 0) + options
    total = 20 + len(tcp) + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 77, 0x4000, 63, 6, 0,
                               socket.inet_aton(SRC), socket.inet_aton(DST)))
    ip[10:12] = struct.pack("!H", ~fold_sum(ip) & 0xFFFF)
    seed = fold_sum(socket.inet_aton(SRC) + socket.inet_aton(DST) + struct.pack("!BBH", 0, 6, len(tcp) + len(payload)))
    tcp = tcp[:16] + struct.pack("!H", seed) + tcp[18:]
    frame = bytes(6) + bytes(6) + b"\x08\x00" + bytes(ip) + tcp + payload
    vnet = gso.VnetHeader(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.GSO_TCPV4, 66, mss, 34, 16).pack()
    return frame, vnet


@pytest.fixture
def taps(plumbing):
    bridge = plumbing.add_bridge("tg")
    return {"a": plumbing.open_bridge_tap(bridge, "a", udp_tunnel_gso=True),
            "b": plumbing.open_bridge_tap(bridge, "b", udp_tunnel_gso=True),
            "plain": plumbing.open_bridge_tap(bridge, "plain", offloads=False)}


def _is_udp(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x00" and frame[23] == 17   # only VXLAN is sent here


def test_a_whole_vxlan_super_frame_crosses_a_bridge_whole_to_a_tap_that_takes_it_and_cut_to_one_that_does_not(taps):
    a, b, plain = taps["a"], taps["b"], taps["plain"]
    assert a.udp_tunnel_gso and a.offloads & TUN_F_UDP_TUNNEL_GSO and a.header_len == 24
    assert b.header_len == 24 and plain.header_len == 10 and not plain.udp_tunnel_gso
    mss, size = 1398, 10 * 1398 + 100
    frame, vnet = super_frame(random.Random(7).randbytes(size), mss)
    vtep = Vtep(local_ip=A_IP, mac=A_VTEP, underlay_mac=A_MAC)
    peer = vtep.peer(B_IP, B_VTEP, B_MAC, tunnel_gso=True)
    outer, header, segments = _encapsulate_whole(vtep, frame, vnet, peer)
    assert segments == 11 and header == gso.TunnelVnetHeader(
        1, 0x21, 50 + 66, mss, 84, 16, outer_th_offset=34, inner_nh_offset=64).pack()
    assert os.writev(a.fd, (header, outer)) == 24 + len(outer)

    ((got_vnet, got),) = read_frames(b, 1, _is_udp)
    assert got == outer
    parsed = gso.TunnelVnetHeader.parse(got_vnet)
    assert (parsed.flags & 1, parsed.gso_type, parsed.gso_size, parsed.csum_start, parsed.csum_offset,
            parsed.outer_th_offset, parsed.inner_nh_offset) == (1, 0x21, mss, 84, 16, 34, 64)

    cut = read_frames(plain, segments, _is_udp)
    assert len(cut) == segments and all(v == bytes(10) for v, _ in cut)
    expected = gso.segment_tcp4(bytearray(outer[50:]), mss)
    outer_id = outer[18] << 8 | outer[19]
    for index, ((_, seg), inner) in enumerate(zip(cut, expected)):
        assert seg[50:] == inner                                    # what the software path sends
        assert seg[:14] == outer[:14] and seg[42:50] == outer[42:50]
        assert struct.unpack_from("!H", seg, 16)[0] == 36 + len(inner)
        assert struct.unpack_from("!H", seg, 18)[0] == (outer_id + index) & 0xFFFF
        assert fold_sum(seg[14:34]) == 0xFFFF                       # outer IP checksum
        assert struct.unpack_from("!HHHH", seg, 34) == (struct.unpack_from("!H", outer, 34)[0], 4789,
                                                         16 + len(inner), 0)
