"""What VXLAN costs per frame in core: `Vtep.encapsulate` and `Vtep.decapsulate`.

Group "overlay", no I/O, no root. Two inner frames from a pod on node A to one on node B:

    tcp-1514   an MTU-sized TCP segment (1500-byte IP packet). It needs a 1550-byte underlay
               (the "raise the underlay MTU by 50" setup); on a 1500 underlay the largest inner
               frame is 1464 bytes and Flannel gives pods MTU 1450.
    udp-64     the smallest Ethernet frame, a UDP datagram.

each with the outer UDP checksum computed (`udpcsum`, the kernel's default and podnet's) and
without (`noudpcsum`, RFC 7348's SHOULD): for big frames the checksum over the whole datagram is
most of the work.

    encap[K-C]     encapsulate(): flow hash and source port, the outer headers, the IP header
                   checksum, the UDP checksum (udpcsum), one copy of the inner frame.
    decap[K-C]     decapsulate() of that outer frame: IPv4, UDP and VXLAN checks, the UDP checksum
                   when one was sent, the inner frame as a view (no copy).
    decap-trusted  decapsulate(..., checksum_unnecessary=True): what a frame whose metadata
                   vouches for the checksum (virtio-net DATA_VALID, a veth's CHECKSUM_PARTIAL) costs.
    flow-hash[K]   flow_hash() + source_port() alone.

Each test asserts the call did what is timed (an outer frame of the right length, the inner frame
back), so a change that makes them fail early cannot make the numbers look good.
"""

from __future__ import annotations

import pytest

from podnet.core.overlay.vxlan import Decapsulated, Vtep, flow_hash, source_port
from podnet.testing import frames

pytestmark = pytest.mark.benchmark(group="overlay")

POD_A, POD_B = "10.244.1.5", "10.244.2.7"
A_IP, B_IP = "192.0.2.1", "192.0.2.2"
A_VTEP, B_VTEP = "0a:58:00:00:01:01", "0a:58:00:00:02:02"
A_UPLINK, B_UPLINK = "02:00:00:00:00:a1", "02:00:00:00:00:b1"
FRAMES = {
    "tcp-1514": bytes(frames.tcp(POD_A, POD_B, 40000, 5201, payload=bytes(1460))),
    "udp-64": bytes(frames.udp(POD_A, POD_B, 40000, 5201, payload=bytes(22))),
}
CHECKSUM = {"udpcsum": True, "noudpcsum": False}
UNDERLAY_MTU = 1550  # room for a 1500-byte inner packet


def _pair(csum: str) -> tuple[Vtep, Vtep, object]:
    a = Vtep(local_ip=A_IP, mac=A_VTEP, underlay_mac=A_UPLINK, underlay_mtu=UNDERLAY_MTU, udp_csum=CHECKSUM[csum])
    b = Vtep(local_ip=B_IP, mac=B_VTEP, underlay_mac=B_UPLINK, underlay_mtu=UNDERLAY_MTU)
    return a, b, a.peer(B_IP, B_VTEP, B_UPLINK)


@pytest.mark.parametrize("csum", list(CHECKSUM))
@pytest.mark.parametrize("kind", list(FRAMES))
def test_encap(benchmark, kind, csum):
    a, _, peer = _pair(csum)
    inner = FRAMES[kind]
    assert len(inner) == int(kind.split("-")[1])
    out = benchmark(a.encapsulate, inner, peer)
    assert isinstance(out, bytes) and len(out) == len(inner) + 50
    assert (out[40:42] != b"\x00\x00") is CHECKSUM[csum]


@pytest.mark.parametrize("csum", list(CHECKSUM))
@pytest.mark.parametrize("kind", list(FRAMES))
def test_decap(benchmark, kind, csum):
    a, b, peer = _pair(csum)
    outer = a.encapsulate(FRAMES[kind], peer)
    got = benchmark(b.decapsulate, outer)
    assert isinstance(got, Decapsulated) and bytes(got.inner[12:]) == FRAMES[kind][12:]
    assert b.statistics().dropped == 0


@pytest.mark.parametrize("kind", list(FRAMES))
def test_decap_trusted(benchmark, kind):
    a, b, peer = _pair("udpcsum")
    outer = a.encapsulate(FRAMES[kind], peer)
    got = benchmark(b.decapsulate, outer, True)
    assert isinstance(got, Decapsulated) and len(got.inner) == len(FRAMES[kind])


@pytest.mark.parametrize("kind", list(FRAMES))
def test_flow_hash(benchmark, kind):
    inner = FRAMES[kind]
    port = benchmark(lambda: source_port(flow_hash(inner)))
    assert 32768 <= port < 60999
