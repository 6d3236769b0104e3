"""What one frame of an established flow between pods on two nodes costs in core, per node.

Group "crossnode", no I/O, no root. Two Datapaths joined by podnet.testing.wire; a TCP connection
(or a UDP stream) from a pod on node A to a pod on node B is set up through them first, so every
timed frame is on the cached path, then node A's `Datapath.process` is timed on:

    direct-egress[K]    the pod's frame to the remote pod: the fast path's cached rewrite with the
                        next hop's MAC (the neighbour entry resolved by ARP)
    direct-ingress[K]   B's frame arriving on the uplink for the local pod: the fast path
    vxlan-egress[K]     the pod's frame into the tunnel: the cached VXLAN flow (Internode.quick),
                        conntrack, TTL, then encapsulation with the cached Peer (UDP checksum on)
    vxlan-ingress[K]    B's VXLAN datagram on the uplink: decapsulation (the outer UDP checksum
                        verified: no vnet header vouches for it), then the fast path for the inner frame

K is the frame as the pod sends it: tcp-mtu is the largest TCP segment the mode carries on a
1500-byte underlay (1500-byte packets direct, 1450 through the tunnel), udp-64 the smallest
Ethernet frame. Each call first restores the bytes the previous one rewrote (as bench/test_fastpath.py
does); compare with fast-path[tcp-1514] there for a same-node flow. Each test asserts the frame
went where it should, on the path being timed.
"""

from __future__ import annotations

import dpkt
import pytest

from podnet.core.datapath import Datapath, PortKind, Transmit
from podnet.core.overlay import FlannelNode, Lease, Vtep
from podnet.testing import frames
from podnet.testing.wire import Wire

pytestmark = pytest.mark.benchmark(group="crossnode")

NODES = {"a": ("10.244.1.0/24", "192.0.2.1", "02:00:c0:00:02:01", "0a:58:0a:f4:01:00"),
         "b": ("10.244.2.0/24", "192.0.2.2", "02:00:c0:00:02:02", "0a:58:0a:f4:02:00")}
POD = {"a": "10.244.1.2", "b": "10.244.2.2"}
POD_MAC = {"a": "02:00:00:00:01:02", "b": "02:00:00:00:02:02"}
MAX_FRAME = 65550
KINDS = ["tcp-mtu", "udp-64"]


def _nodes(mode: str) -> tuple[Wire, dict[str, Datapath], dict[str, int], dict[str, int]]:
    wire, dps, uplinks, pods = Wire(), {}, {}, {}
    for name, (cidr, ip, uplink_mac, vtep_mac) in NODES.items():
        dp = Datapath(node_cidr=cidr, node_ip=ip)
        uplinks[name] = dp.add_uplink("uplink", uplink_mac, cidr="192.0.2.0/24")
        pods[name] = dp.add_port(f"pod-{name}", PortKind.POD, POD_MAC[name], POD[name])
        if mode == "vxlan":
            vtep = Vtep(local_ip=ip, mac=vtep_mac, underlay_mac=uplink_mac)
            dp.add_tunnel(vtep, FlannelNode(Lease(cidr, ip, vtep_mac)))
        wire.attach(name, dp, uplinks[name])
        dps[name] = dp
    for name, other in (("a", "b"), ("b", "a")):
        cidr, ip, _, vtep_mac = NODES[other]
        if mode == "vxlan":
            dps[name].internode.add_lease(Lease(cidr, ip, vtep_mac))
        else:
            dps[name].add_route(cidr, uplinks[name], via=ip)
    return wire, dps, uplinks, pods


def _frame(kind: str, mode: str, src: str, dst: str, sport: int, dport: int, src_mac: str, dst_mac=None) -> bytearray:
    kw = {"src_mac": src_mac} | ({"dst_mac": dst_mac} if dst_mac else {})
    if kind == "udp-64":
        return frames.udp(POD[src], POD[dst], sport, dport, payload=bytes(22), **kw)
    payload = 1460 if mode == "direct" else 1410
    return frames.tcp(POD[src], POD[dst], sport, dport, payload=bytes(payload), flags=dpkt.tcp.TH_ACK, **kw)


def _established(mode: str, kind: str):
    """The two nodes with a flow from pod A to pod B (and back) set up and ASSURED."""
    wire, dps, uplinks, pods = _nodes(mode)
    if kind.startswith("tcp"):
        wire.send("a", pods["a"], frames.tcp(POD["a"], POD["b"], 40000, 5201, flags=dpkt.tcp.TH_SYN,
                                             src_mac=POD_MAC["a"]), 0.0)
        wire.send("b", pods["b"], frames.tcp(POD["b"], POD["a"], 5201, 40000, flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK,
                                             src_mac=POD_MAC["b"]), 0.1)
    else:
        wire.send("a", pods["a"], frames.udp(POD["a"], POD["b"], 40000, 5201, src_mac=POD_MAC["a"]), 0.0)
        wire.send("b", pods["b"], frames.udp(POD["b"], POD["a"], 5201, 40000, src_mac=POD_MAC["b"]), 0.1)
    # the third frame each way completes the handshake / makes the UDP flow a stream (ASSURED)
    wire.send("a", pods["a"], _frame(kind, mode, "a", "b", 40000, 5201, POD_MAC["a"]), 3.0)
    wire.send("b", pods["b"], _frame(kind, mode, "b", "a", 5201, 40000, POD_MAC["b"]), 3.1)
    return wire, dps, uplinks, pods


def _received(frame: bytes) -> memoryview:
    """The frame as FdPort.receive hands it out: a view of its receive buffer."""
    buf = bytearray(MAX_FRAME)
    buf[:len(frame)] = frame
    return memoryview(buf)[:len(frame)]


def _time(benchmark, report, dp: Datapath, frame: bytes, port: int, restore: int, expect_port: int, name: str):
    view, pristine = _received(frame), bytes(frame[:restore])
    fast_before = dp.statistics().fast_path_packets
    process = dp.process

    def one():
        view[0:restore] = pristine
        return process(view, port, 4.0)

    actions = benchmark(one)
    assert [(type(x), x.port) for x in actions] == [(Transmit, expect_port)], actions
    stats = dp.statistics()
    assert stats.fast_path_packets > fast_before and stats.dropped == 0
    report.per_frame_ns[name] = benchmark.stats.stats.mean * 1e9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["direct", "vxlan"])
def test_egress(benchmark, report, mode, kind):
    wire, dps, uplinks, pods = _established(mode, kind)
    frame = bytes(_frame(kind, mode, "a", "b", 40000, 5201, POD_MAC["a"]))
    if kind == "tcp-mtu":
        assert len(frame) - 14 == (1500 if mode == "direct" else 1450)
    # rewritten in place: MACs, TTL, IP checksum (the encapsulation copies, leaving the MACs)
    _time(benchmark, report, dps["a"], frame, pods["a"], 26, uplinks["a"], f"{mode}-egress[{kind}]")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["direct", "vxlan"])
def test_ingress(benchmark, report, mode, kind):
    wire, dps, uplinks, pods = _established(mode, kind)
    # what B puts on the underlay for its pod's next frame: captured from the wire
    since = len(wire.log)
    wire.send("b", pods["b"], _frame(kind, mode, "b", "a", 5201, 40000, POD_MAC["b"]), 3.5)
    (seen,) = [s for s in wire.log[since:] if s.sender == "b"]
    # the inner frame is rewritten in place inside the outer buffer: restore up to its checksum
    restore = 26 + (50 if mode == "vxlan" else 0)
    _time(benchmark, report, dps["a"], seen.frame, uplinks["a"], restore, pods["a"], f"{mode}-ingress[{kind}]")
