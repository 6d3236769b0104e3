"""The per-node pipeline, routed (Calico style, the default) and bridge mode, with every output frame
decoded by dpkt and checked with a checksum computed here."""

from __future__ import annotations

import math
import random
import re
import socket
import struct
from dataclasses import dataclass

import dpkt
import pytest

from reference import fix_ip_checksum, naive_checksum
from podnet.core import packet as pk
from podnet.core.datapath import Datapath, Drop, NodeMode, PortKind, Transmit
from podnet.core.packet import DropReason
from podnet.testing import frames as F

A_IP, B_IP = "10.244.0.2", "10.244.0.3"
A_MAC, B_MAC = pk.mac_bytes(F.POD_MAC_A), pk.mac_bytes(F.POD_MAC_B)
GW_MAC = b"\xee" * 6
UPLINK_MAC = "02:00:00:00:00:99"
VNET = bytes([1, 0, 0, 0, 0, 0, 34, 0, 16, 0])  # virtio_net_hdr: NEEDS_CSUM, csum_start 34, offset 16


def ip_header_ok(ip: dpkt.ip.IP) -> bool:
    return naive_checksum(bytes(ip)[:ip.hl * 4]) == 0


@dataclass
class Node:
    dp: Datapath
    a: int
    b: int


def routed(**kwargs) -> Node:
    dp = Datapath(**kwargs)
    a = dp.add_port("pod-a", PortKind.POD, F.POD_MAC_A, A_IP)
    b = dp.add_port("pod-b", PortKind.POD, F.POD_MAC_B, B_IP)
    return Node(dp, a, b)


def a_to_b(**kwargs) -> bytearray:
    return F.tcp(A_IP, B_IP, **{"sport": 40000, "dport": 80, "payload": b"hello pod b", **kwargs})


def port_stats(dp: Datapath, name: str):
    (stats,) = [p for p in dp.statistics().ports if p.name == name]
    return stats


def transmits(actions) -> list[Transmit]:
    return [a for a in actions if isinstance(a, Transmit)]


def normalized(actions) -> list[tuple]:
    return [("tx", a.port, bytes(a.frame), a.vnet) if isinstance(a, Transmit) else ("drop", a.port, a.reason)
            for a in actions]


def flows_snapshot(dp: Datapath) -> list:
    return [(key, list(entry)) for key, entry in dp.flows()]


def assert_icmp_from_gateway(frame, icmp_type: int, code: int, offending: bytes, to_ip: str = A_IP,
                             to_mac: bytes = A_MAC, gateway_ip: str = "169.254.1.1") -> None:
    eth = F.decode(frame)
    assert (eth.dst, eth.src, eth.type) == (to_mac, GW_MAC, 0x0800)
    ip = eth.data
    assert socket.inet_ntoa(ip.src) == gateway_ip and socket.inet_ntoa(ip.dst) == to_ip
    assert ip.p == 1 and ip_header_ok(ip)
    assert naive_checksum(bytes(ip.data)) == 0
    assert (ip.data.type, ip.data.code) == (icmp_type, code)
    ihl = (offending[14] & 0x0F) * 4
    assert bytes(ip.data)[8:] == bytes(offending[14:14 + ihl + 8])


# --- ARP ----------------------------------------------------------------------------------------

def test_arp_for_the_gateway_is_answered_with_the_gateway_mac():
    n = routed()
    actions = n.dp.process(F.arp_request(A_IP, "169.254.1.1"), n.a, 0.0)
    assert len(actions) == 1 and isinstance(actions[0], Transmit) and actions[0].port == n.a
    eth = F.decode(actions[0].frame)
    assert (eth.dst, eth.src, eth.type) == (A_MAC, GW_MAC, 0x0806)
    arp = eth.data
    assert arp.op == dpkt.arp.ARP_OP_REPLY
    assert arp.sha == GW_MAC and socket.inet_ntoa(arp.spa) == "169.254.1.1"
    assert arp.tha == A_MAC and socket.inet_ntoa(arp.tpa) == A_IP
    stats = n.dp.statistics()
    assert stats.arp_replies == 1 and stats.dropped == 0
    assert port_stats(n.dp, "pod-a").tx_packets == 1
    assert port_stats(n.dp, "pod-a").tx_bytes == len(actions[0].frame)


@pytest.mark.parametrize("target", [B_IP, "10.244.0.1", "169.254.1.2"])
def test_arp_for_another_address_is_a_counted_drop(target):
    n = routed()
    actions = n.dp.process(F.arp_request(A_IP, target), n.a, 0.0)
    assert actions == [Drop(DropReason.ARP_NOT_PROXIED, n.a, f"who-has {target} tell {A_IP}")]
    stats = n.dp.statistics()
    assert stats.drops == {"arp_not_proxied": 1} and stats.arp_replies == 0
    assert port_stats(n.dp, "pod-a").tx_packets == 0 and port_stats(n.dp, "pod-b").tx_packets == 0


def test_malformed_arp_is_a_counted_drop():
    n = routed()
    frame = F.arp_request(A_IP, "169.254.1.1")
    frame[18] = 8  # hlen
    assert n.dp.process(frame, n.a, 0.0) == [Drop(DropReason.ARP_MALFORMED, n.a, "")]
    assert n.dp.process(F.arp_request(A_IP, "169.254.1.1")[:30], n.a, 0.0)[0].reason is DropReason.FRAME_TOO_SHORT
    assert n.dp.statistics().drops == {"arp_malformed": 1, "frame_too_short": 1}


# --- forwarding ---------------------------------------------------------------------------------

def test_tcp_from_a_to_b_is_routed_to_b():
    n = routed()
    original = a_to_b(ttl=64)
    actions = n.dp.process(bytearray(original), n.a, 0.0)
    assert [type(a) for a in actions] == [Transmit] and actions[0].port == n.b
    out = bytes(actions[0].frame)
    eth = F.decode(out)
    assert eth.dst == B_MAC and eth.src == GW_MAC
    ip = eth.data
    assert ip.ttl == 63 and ip_header_ok(ip)
    assert socket.inet_ntoa(ip.src) == A_IP and socket.inet_ntoa(ip.dst) == B_IP
    assert (ip.data.sport, ip.data.dport, ip.data.data) == (40000, 80, b"hello pod b")
    # nothing but the MACs, the TTL and the header checksum changed; the TCP checksum is untouched
    assert out[12:22] == bytes(original[12:22]) and out[23:24] == bytes(original[23:24])
    assert out[26:] == bytes(original[26:])


def test_first_packet_takes_the_slow_path_and_installs_a_flow_the_second_the_fast_path():
    n = routed()
    reference = routed(max_flows=0)   # a datapath that never caches: the slow path's answer
    frame = a_to_b()
    first = n.dp.process(bytearray(frame), n.a, 0.0)
    stats = n.dp.statistics()
    assert (stats.slow_path_packets, stats.fast_path_packets, stats.flows, stats.flows_installed) == (1, 0, 1, 1)
    ((key, entry),) = n.dp.flows()
    assert key == (n.a, 6, pk.ip_int(A_IP), pk.ip_int(B_IP), 40000 << 16 | 80)

    second = n.dp.process(bytes(frame), n.a, 1.0)        # bytes are accepted too
    stats = n.dp.statistics()
    assert (stats.slow_path_packets, stats.fast_path_packets, stats.flows) == (1, 1, 1)
    slow = reference.dp.process(bytearray(frame), reference.a, 1.0)
    assert reference.dp.statistics().fast_path_packets == 0
    assert normalized(second) == normalized(slow) == normalized(first)
    assert normalized(n.dp.trace(frame, n.a, 1.0).actions) == normalized(second)


def test_fast_path_rewrites_in_place():
    n = routed()
    n.dp.process(a_to_b(), n.a, 0.0)
    buffer = a_to_b()
    (tx,) = n.dp.process(buffer, n.a, 1.0)
    assert tx.frame is buffer and buffer[:6] == B_MAC and buffer[22] == 63


def test_per_port_counters_are_exact_after_fast_and_slow_packets():
    n = routed()
    rx = {"pod-a": [0, 0], "pod-b": [0, 0]}
    tx = {"pod-a": [0, 0], "pod-b": [0, 0]}
    names = {n.a: "pod-a", n.b: "pod-b"}

    def send(frame, port, now):
        rx[names[port]][0] += 1
        rx[names[port]][1] += len(frame)
        actions = n.dp.process(bytearray(frame), port, now)
        for t in transmits(actions):
            tx[names[t.port]][0] += 1
            tx[names[t.port]][1] += len(t.frame)
        return actions

    for i in range(3):
        send(a_to_b(payload=b"x" * (10 * i)), n.a, float(i))                 # 1 slow + 2 fast
    b_to_a = F.tcp(B_IP, A_IP, sport=80, dport=40000, src_mac=F.POD_MAC_B, payload=b"reply")
    send(b_to_a, n.b, 3.0)
    send(b_to_a + b"\x00" * 6, n.b, 4.0)                                  # fast, with padding
    send(F.arp_request(A_IP, "169.254.1.1"), n.a, 5.0)
    send(F.corrupt_ipv4_checksum(b_to_a), n.b, 6.0)                       # dropped on the fast path's key
    send(F.icmp_echo(A_IP, "169.254.1.1"), n.a, 7.0)
    send(a_to_b(ttl=1), n.a, 8.0)                                         # time exceeded back to A
    send(F.udp(A_IP, "10.99.0.1"), n.a, 9.0)                              # net unreachable back to A

    stats = n.dp.statistics()
    assert stats.fast_path_packets == 3
    assert stats.slow_path_packets == 7
    for name in ("pod-a", "pod-b"):
        p = port_stats(n.dp, name)
        assert [p.rx_packets, p.rx_bytes] == rx[name], name
        assert [p.tx_packets, p.tx_bytes] == tx[name], name
    assert tx["pod-a"][0] == 1 + 1 + 1 + 1 + 2    # B->A twice, ARP reply, echo reply, two ICMP errors
    # the same totals once the flows are retired into the counters
    before = stats.ports
    n.dp.handle_timer(1000.0)
    after = n.dp.statistics()
    assert after.flows == 0 and after.ports == before and after.fast_path_packets == 3


@pytest.mark.parametrize("warm", [False, True], ids=["slow-path", "fast-path"])
def test_vnet_header_passes_through_unchanged(warm):
    n = routed()
    if warm:
        n.dp.process(a_to_b(), n.a, 0.0, vnet=VNET)
    (tx,) = n.dp.process(a_to_b(), n.a, 1.0, vnet=VNET)
    assert tx.vnet == VNET and tx.port == n.b
    assert n.dp.statistics().fast_path_packets == int(warm)
    (reply,) = n.dp.process(F.arp_request(A_IP, "169.254.1.1"), n.a, 2.0, vnet=VNET)
    assert reply.vnet is None      # frames podnet originates carry no vnet header
    (tx,) = n.dp.process(a_to_b(), n.a, 3.0)
    assert tx.vnet is None


def test_bad_ipv4_checksum_is_a_counted_drop():
    n = routed()
    actions = n.dp.process(F.corrupt_ipv4_checksum(a_to_b()), n.a, 0.0)
    assert actions == [Drop(DropReason.IPV4_BAD_CHECKSUM, n.a, "")]
    stats = n.dp.statistics()
    assert stats.drops == {"ipv4_bad_checksum": 1} and stats.flows == 0
    assert port_stats(n.dp, "pod-b").tx_packets == 0


def test_bad_ipv4_checksum_is_dropped_even_when_the_flow_is_cached():
    n = routed()
    n.dp.process(a_to_b(), n.a, 0.0)
    assert n.dp.statistics().flows == 1
    actions = n.dp.process(F.corrupt_ipv4_checksum(a_to_b()), n.a, 1.0)
    assert actions == [Drop(DropReason.IPV4_BAD_CHECKSUM, n.a, "")]
    stats = n.dp.statistics()
    assert stats.fast_path_packets == 0 and stats.drops == {"ipv4_bad_checksum": 1}
    assert port_stats(n.dp, "pod-b").tx_packets == 1


def test_cached_flow_still_checks_ttl_mac_and_fragments():
    n = routed()
    n.dp.process(a_to_b(), n.a, 0.0)
    ttl1 = n.dp.process(a_to_b(ttl=1), n.a, 1.0)
    assert [type(a) for a in ttl1] == [Transmit, Drop] and ttl1[1].reason is DropReason.TTL_EXCEEDED
    wrong_mac = n.dp.process(a_to_b(dst_mac=F.POD_MAC_B), n.a, 2.0)
    assert wrong_mac[0].reason is DropReason.NOT_FOR_GATEWAY
    fragment = a_to_b()
    struct.pack_into("!H", fragment, 20, 0x2000)   # MF: a first fragment with the flow's ports
    fix_ip_checksum(fragment)
    (tx,) = n.dp.process(fragment, n.a, 3.0)      # the first fragment is forwarded by the slow path
    assert tx.port == n.b and F.decode(tx.frame).data.ttl == 63
    stats = n.dp.statistics()
    assert stats.fast_path_packets == 0 and stats.slow_path_packets == 4


def test_truncated_tcp_is_dropped_even_when_the_flow_is_cached():
    n = routed()
    n.dp.process(a_to_b(), n.a, 0.0)
    truncated = a_to_b()
    del truncated[14 + 28:]
    struct.pack_into("!H", truncated, 16, 28)     # IP header + 8 bytes of TCP
    fix_ip_checksum(truncated)
    assert pk.parse_ipv4(truncated) is DropReason.L4_TRUNCATED
    assert n.dp.process(truncated, n.a, 1.0) == [Drop(DropReason.L4_TRUNCATED, n.a, "")]
    assert n.dp.statistics().fast_path_packets == 0


# --- ICMP errors and the gateway ----------------------------------------------------------------

@pytest.mark.parametrize("ttl", [1, 0])
def test_ttl_expiry_sends_time_exceeded_to_the_sender(ttl):
    n = routed()
    offending = a_to_b(ttl=ttl)
    actions = n.dp.process(bytearray(offending), n.a, 0.0)
    assert [type(a) for a in actions] == [Transmit, Drop]
    assert actions[0].port == n.a and actions[0].vnet is None
    assert_icmp_from_gateway(actions[0].frame, 11, 0, offending)
    assert actions[1].reason is DropReason.TTL_EXCEEDED and actions[1].port == n.a
    stats = n.dp.statistics()
    assert stats.drops == {"ttl_exceeded": 1} and stats.icmp_sent == 1 and stats.flows == 0
    assert port_stats(n.dp, "pod-b").tx_packets == 0


def test_no_route_sends_net_unreachable():
    n = routed()
    offending = F.udp(A_IP, "10.99.0.1", sport=5555, dport=53, payload=b"query")
    actions = n.dp.process(bytearray(offending), n.a, 0.0)
    assert [type(a) for a in actions] == [Transmit, Drop]
    assert_icmp_from_gateway(actions[0].frame, 3, 0, offending)
    assert actions[1] == Drop(DropReason.NO_ROUTE, n.a, "10.99.0.1")
    assert n.dp.statistics().drops == {"no_route": 1}


def test_address_in_the_node_cidr_without_a_pod_sends_host_unreachable():
    n = routed()
    offending = a_to_b()
    offending[30:34] = socket.inet_aton("10.244.0.77")
    fix_ip_checksum(offending)
    actions = n.dp.process(bytearray(offending), n.a, 0.0)
    assert [type(a) for a in actions] == [Transmit, Drop]
    assert_icmp_from_gateway(actions[0].frame, 3, 1, offending)
    assert actions[1].reason is DropReason.NO_ROUTE


def test_no_icmp_error_about_an_icmp_error_or_a_later_fragment():
    n = routed()
    inner = bytes(dpkt.ip.IP(src=socket.inet_aton(B_IP), dst=socket.inet_aton(A_IP), p=17,
                             data=dpkt.udp.UDP(sport=1, dport=2, ulen=8)))
    error = dpkt.icmp.ICMP(type=3, code=3, data=b"\x00" * 4 + inner)
    ip = dpkt.ip.IP(src=socket.inet_aton(A_IP), dst=socket.inet_aton(B_IP), p=1, ttl=1, data=error)
    frame = bytearray(bytes(dpkt.ethernet.Ethernet(src=A_MAC, dst=GW_MAC, type=0x0800, data=ip)))
    assert n.dp.process(frame, n.a, 0.0) == [Drop(DropReason.TTL_EXCEEDED, n.a, "")]
    later = F.udp(A_IP, "10.99.0.1", payload=b"x" * 30)
    struct.pack_into("!H", later, 20, 0x2000 | 10)
    fix_ip_checksum(later)
    assert n.dp.process(later, n.a, 0.0) == [Drop(DropReason.NO_ROUTE, n.a, "10.99.0.1")]
    assert n.dp.statistics().icmp_sent == 0


@pytest.mark.parametrize("payload", [b"", b"podnet", bytes(range(200)) + b"!"])
def test_ping_to_the_gateway_gets_an_echo_reply(payload):
    n = routed()
    request = F.icmp_echo(A_IP, "169.254.1.1", ident=0x4242, seq=17, payload=payload)
    (reply,) = n.dp.process(bytearray(request), n.a, 0.0)
    assert reply.port == n.a
    eth = F.decode(reply.frame)
    assert (eth.dst, eth.src) == (A_MAC, GW_MAC)
    ip = eth.data
    assert socket.inet_ntoa(ip.src) == "169.254.1.1" and socket.inet_ntoa(ip.dst) == A_IP
    assert ip_header_ok(ip) and naive_checksum(bytes(ip.data)) == 0
    assert (ip.data.type, ip.data.code) == (0, 0)
    assert (ip.data.data.id, ip.data.data.seq, ip.data.data.data) == (0x4242, 17, payload)
    assert n.dp.statistics().icmp_sent == 1 and n.dp.statistics().dropped == 0


def test_ping_to_the_gateway_with_ttl_1_is_still_answered():
    n = routed()
    (reply,) = n.dp.process(F.icmp_echo(A_IP, "169.254.1.1", ttl=1), n.a, 0.0)
    assert F.decode(reply.frame).data.data.type == 0


def test_other_traffic_to_the_gateway():
    n = routed()
    udp = F.udp(A_IP, "169.254.1.1", dport=53)
    actions = n.dp.process(bytearray(udp), n.a, 0.0)
    assert [type(a) for a in actions] == [Transmit, Drop]
    assert_icmp_from_gateway(actions[0].frame, 3, 3, udp)               # port unreachable
    assert actions[1].reason is DropReason.LOCAL_NOT_SERVED
    tcp = n.dp.process(F.tcp(A_IP, "169.254.1.1"), n.a, 0.0)
    assert [a.reason for a in tcp] == [DropReason.LOCAL_NOT_SERVED]      # no RST, no ICMP
    assert n.dp.statistics().drops == {"local_not_served": 2}


def test_ping_with_a_bad_icmp_checksum_is_not_answered():
    # Linux's icmp_rcv() drops it (csum_error) without a reply
    n = routed()
    for offset in (36, 42, len(F.icmp_echo(A_IP, "169.254.1.1")) - 1):   # checksum, id/seq, payload
        request = F.icmp_echo(A_IP, "169.254.1.1")
        request[offset] ^= 0x5A                                        # the IP header stays valid
        assert n.dp.process(request, n.a, 0.0) == [Drop(DropReason.ICMP_BAD_CHECKSUM, n.a, "")]
    stats = n.dp.statistics()
    assert stats.drops == {"icmp_bad_checksum": 3} and stats.icmp_sent == 0
    assert port_stats(n.dp, "pod-a").tx_packets == 0


# --- drops at the edge --------------------------------------------------------------------------

def test_spoofed_source_is_dropped():
    n = routed()
    spoofed = F.tcp(B_IP, "10.244.0.9")       # pod A claiming B's address
    actions = n.dp.process(spoofed, n.a, 0.0)
    assert len(actions) == 1 and actions[0].reason is DropReason.SOURCE_SPOOFED and actions[0].port == n.a
    assert n.dp.statistics().drops == {"source_spoofed": 1} and n.dp.statistics().icmp_sent == 0


def test_frame_not_addressed_to_the_gateway_mac_is_dropped():
    n = routed()
    for dst_mac in (F.POD_MAC_B, "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"):
        actions = n.dp.process(a_to_b(dst_mac=dst_mac), n.a, 0.0)
        assert actions == [Drop(DropReason.NOT_FOR_GATEWAY, n.a, dst_mac)]
    assert n.dp.statistics().drops == {"not_for_gateway": 3}


@pytest.mark.parametrize("ethertype, reason", [(0x86DD, DropReason.UNSUPPORTED_ETHERTYPE),
                                               (0x88CC, DropReason.UNSUPPORTED_ETHERTYPE),
                                               (0x8100, DropReason.VLAN_TAGGED)])
def test_other_ethertypes_are_dropped(ethertype, reason):
    n = routed()
    frame = a_to_b()
    struct.pack_into("!H", frame, 12, ethertype)
    assert [a.reason for a in n.dp.process(frame, n.a, 0.0)] == [reason]
    assert n.dp.statistics().drops == {reason.value: 1}


@pytest.mark.parametrize("length", [0, 1, 13])
def test_frame_shorter_than_ethernet_is_dropped(length):
    n = routed()
    assert [a.reason for a in n.dp.process(a_to_b()[:length], n.a, 0.0)] == [DropReason.FRAME_TOO_SHORT]
    assert n.dp.statistics().drops == {"frame_too_short": 1}
    assert port_stats(n.dp, "pod-a").rx_packets == 1 and port_stats(n.dp, "pod-a").rx_bytes == length


def test_ipv4_frame_shorter_than_its_header_is_dropped():
    n = routed()
    assert [a.reason for a in n.dp.process(a_to_b()[:30], n.a, 0.0)] == [DropReason.FRAME_TOO_SHORT]


def test_unknown_port():
    n = routed()
    assert n.dp.process(a_to_b(), 99, 0.0) == [Drop(DropReason.UNKNOWN_PORT, 99, "no port 99")]
    stats = n.dp.statistics()
    assert stats.drops == {"unknown_port": 1} and stats.slow_path_packets == 0
    assert all(p.rx_packets == 0 for p in stats.ports)


def test_route_to_a_missing_port():
    n = routed()
    n.dp.add_route("10.50.0.0/16", 42)
    frame = F.udp(A_IP, "10.50.1.1")
    assert [a.reason for a in n.dp.process(frame, n.a, 0.0)] == [DropReason.UNKNOWN_PORT]


# --- trace ----------------------------------------------------------------------------------------

def test_trace_of_a_forwarded_packet():
    n = routed()
    frame = a_to_b()
    before = bytes(frame)
    trace = n.dp.trace(frame, n.a, 0.0)
    assert [s.stage for s in trace.steps] == ["eth", "ipv4", "route", "forward"]
    assert trace.steps[-1].decision == "to pod-b"
    assert trace.in_port == "pod-a"
    assert trace.frame == pk.describe(before)
    assert str(trace).splitlines()[0] == f"{pk.describe(before)}  (in pod-a)"
    assert [type(a) for a in trace.actions] == [Transmit] and trace.actions[0].port == n.b
    assert bytes(frame) == before                      # the caller's frame is not rewritten


@pytest.mark.parametrize("frame, port, stages, last", [
    (F.arp_request(A_IP, "169.254.1.1"), "a", ["eth", "arp"], "reply"),
    (F.arp_request(A_IP, B_IP), "a", ["eth", "arp"], "drop arp_not_proxied"),
    (a_to_b(ttl=1), "a", ["eth", "ipv4", "route", "icmp", "ttl"], "drop ttl_exceeded"),
    (F.udp(A_IP, "10.99.0.1"), "a", ["eth", "ipv4", "route", "icmp", "route"], "drop no_route"),
    (F.tcp(B_IP, A_IP), "a", ["eth", "ipv4", "rpf"], "drop source_spoofed"),
    (F.icmp_echo(A_IP, "169.254.1.1"), "a", ["eth", "ipv4", "route", "local"], "echo reply"),
    (F.corrupt_ipv4_checksum(a_to_b()), "a", ["eth", "ipv4"], "drop ipv4_bad_checksum"),
    (a_to_b(), 77, ["eth"], "drop unknown_port"),
], ids=["arp-reply", "arp-not-proxied", "ttl", "no-route", "spoofed", "ping", "bad-checksum", "unknown-port"])
def test_trace_stages(frame, port, stages, last):
    n = routed()
    trace = n.dp.trace(frame, n.a if port == "a" else port, 0.0)
    assert [s.stage for s in trace.steps] == stages
    assert trace.steps[-1].decision == last


def test_trace_changes_no_counters_and_no_flows():
    n = routed()
    n.dp.process(a_to_b(), n.a, 0.0)          # one cached flow
    n.dp.process(a_to_b(), n.a, 1.0)
    stats, flows = n.dp.statistics(), flows_snapshot(n.dp)
    for frame in (a_to_b(), a_to_b(sport=1), a_to_b(ttl=1), F.arp_request(A_IP, "169.254.1.1"),
                  F.icmp_echo(A_IP, "169.254.1.1"), F.udp(A_IP, "10.99.0.1"), F.tcp(B_IP, A_IP),
                  F.corrupt_ipv4_checksum(a_to_b()), a_to_b()[:10]):
        n.dp.trace(frame, n.a, 5.0)
    n.dp.trace(a_to_b(), 99, 5.0)
    assert n.dp.statistics() == stats
    assert flows_snapshot(n.dp) == flows


def test_trace_of_a_cached_flow_says_so_and_agrees_with_the_fast_path():
    n = routed()
    n.dp.process(a_to_b(), n.a, 0.0)
    trace = n.dp.trace(a_to_b(), n.a, 1.0)
    assert trace.steps[0].stage == "flow" and trace.steps[0].decision == "cached"
    assert [s.stage for s in trace.steps[1:]] == ["eth", "ipv4", "conntrack", "route", "forward"]
    assert normalized(trace.actions) == normalized(n.dp.process(a_to_b(), n.a, 1.0))


@pytest.mark.parametrize("frame", [a_to_b(ttl=1), F.corrupt_ipv4_checksum(a_to_b()), a_to_b(dst_mac=F.POD_MAC_B)],
                         ids=["ttl-1", "bad-checksum", "not-for-gateway"])
def test_trace_does_not_claim_the_fast_path_for_frames_it_rejects(frame):
    n = routed()
    n.dp.process(a_to_b(), n.a, 0.0)
    fast_before = n.dp.statistics().fast_path_packets
    n.dp.process(bytearray(frame), n.a, 1.0)
    assert n.dp.statistics().fast_path_packets == fast_before        # the fast path really declines it
    assert n.dp.trace(frame, n.a, 2.0).steps[0].stage != "flow"


# --- timers ----------------------------------------------------------------------------------------

def test_no_deadline_without_flows():
    n = routed()
    assert n.dp.next_deadline() is None
    n.dp.process(F.arp_request(A_IP, "169.254.1.1"), n.a, 0.0)
    n.dp.process(F.icmp_echo(A_IP, "169.254.1.1"), n.a, 0.0)   # ICMP installs no flow
    assert n.dp.next_deadline() is None


def test_idle_flow_expires_after_the_timeout_not_before():
    n = routed(flow_idle_timeout_s=30.0)
    n.dp.process(a_to_b(), n.a, 0.0)
    n.dp.process(a_to_b(), n.a, 10.0)        # last seen at 10: idle from then on
    deadline = n.dp.next_deadline()
    assert deadline is not None and 0.0 < deadline <= 40.0
    # a runtime that calls handle_timer whenever next_deadline() says
    expired_at = None
    while deadline is not None and deadline < 100.0:
        n.dp.handle_timer(deadline)
        if n.dp.statistics().flows == 0:
            expired_at = deadline
            break
        assert deadline < 40.0, f"flow still cached at {deadline}, idle for 30 s since 10"
        deadline = n.dp.next_deadline()
    assert expired_at is not None and 40.0 <= expired_at <= 43.0
    # no flow left to sweep: what remains due is conntrack's entry for the connection (a
    # mid-stream pickup, 300 s unacknowledged), which handle_timer expires in its turn
    entry_deadline = n.dp.conntrack.next_deadline()
    assert n.dp.next_deadline() == entry_deadline and entry_deadline > 100.0
    n.dp.handle_timer(entry_deadline)
    assert len(n.dp.conntrack) == 0 and n.dp.next_deadline() is None


def test_handle_timer_at_exactly_the_timeout():
    early = routed(flow_idle_timeout_s=30.0)
    early.dp.process(a_to_b(), early.a, 0.0)
    early.dp.handle_timer(math.nextafter(30.0, 0.0))
    assert early.dp.statistics().flows == 1
    on_time = routed(flow_idle_timeout_s=30.0)
    on_time.dp.process(a_to_b(), on_time.a, 0.0)
    on_time.dp.handle_timer(30.0)
    assert on_time.dp.statistics().flows == 0


def test_traffic_keeps_a_flow_alive():
    n = routed(flow_idle_timeout_s=5.0)
    for t in range(0, 50):
        n.dp.process(a_to_b(), n.a, float(t))
        n.dp.handle_timer(float(t) + 0.5)
    stats = n.dp.statistics()
    assert stats.flows == 1 and stats.flows_installed == 1 and stats.fast_path_packets == 49


def test_expired_flow_counters_are_folded_into_statistics():
    n = routed(flow_idle_timeout_s=30.0)
    for t in range(5):
        n.dp.process(a_to_b(), n.a, float(t))
    live = n.dp.statistics()
    assert (live.flows, live.fast_path_packets) == (1, 4)
    n.dp.handle_timer(100.0)
    gone = n.dp.statistics()
    assert gone.flows == 0 and gone.flows_installed == 1
    assert gone.fast_path_packets == 4 and gone.slow_path_packets == 1
    assert gone.ports == live.ports
    assert port_stats(n.dp, "pod-b").tx_packets == 5
    # the next packet starts a new flow on the slow path
    n.dp.process(a_to_b(), n.a, 101.0)
    assert n.dp.statistics().slow_path_packets == 2 and n.dp.statistics().flows_installed == 2


# --- configuration changes flush the cache --------------------------------------------------------

def test_remove_port_flushes_flows_and_routes():
    n = routed()
    n.dp.process(a_to_b(), n.a, 0.0)
    n.dp.process(a_to_b(), n.a, 1.0)
    n.dp.remove_port(n.b)
    stats = n.dp.statistics()
    assert stats.flows == 0 and stats.fast_path_packets == 1
    assert [p.name for p in stats.ports] == ["pod-a"]
    assert port_stats(n.dp, "pod-a").rx_packets == 2
    assert all(r.port != n.b for r in n.dp.routes.routes())
    offending = a_to_b()
    actions = n.dp.process(bytearray(offending), n.a, 2.0)       # 10.244.0.3 now has no pod
    assert [type(a) for a in actions] == [Transmit, Drop]
    assert_icmp_from_gateway(actions[0].frame, 3, 1, offending)
    n.dp.remove_port(n.b)                                         # removing twice is harmless
    n.dp.remove_port(1234)


def test_add_route_flushes_flows_and_uplink_gets_its_mac():
    n = routed()
    n.dp.process(a_to_b(), n.a, 0.0)
    up = n.dp.add_port("uplink", PortKind.UPLINK, UPLINK_MAC)
    assert n.dp.statistics().flows == 0
    n.dp.process(a_to_b(), n.a, 1.0)
    n.dp.add_route("0.0.0.0/0", up)
    assert n.dp.statistics().flows == 0
    (tx,) = n.dp.process(F.udp(A_IP, "8.8.8.8"), n.a, 2.0)
    eth = F.decode(tx.frame)
    assert tx.port == up and eth.dst == pk.mac_bytes(UPLINK_MAC) and eth.src == GW_MAC
    # frames from the uplink are not subject to the pods' source check
    (tx,) = n.dp.process(F.udp("8.8.8.8", A_IP, src_mac=UPLINK_MAC), up, 3.0)
    assert tx.port == n.a


def test_a_pod_port_without_an_address_can_send_nothing_routed():
    n = routed()
    c = n.dp.add_port("pod-c", PortKind.POD, "02:00:00:00:00:0c")
    (drop,) = n.dp.process(F.udp("10.244.0.4", A_IP, src_mac="02:00:00:00:00:0c"), c, 0.0)
    assert drop.reason is DropReason.SOURCE_SPOOFED


def test_full_flow_table_is_counted_and_still_forwards():
    n = routed(max_flows=1)
    n.dp.process(a_to_b(sport=1), n.a, 0.0)
    actions = n.dp.process(a_to_b(sport=2), n.a, 0.0)
    assert [a.port for a in transmits(actions)] == [n.b]
    stats = n.dp.statistics()
    assert stats.flows == 1 and stats.flow_table_full == 1 and stats.flows_installed == 1
    n.dp.process(a_to_b(sport=2), n.a, 1.0)                       # still the slow path
    n.dp.process(a_to_b(sport=1), n.a, 1.0)                       # the cached one is fast
    stats = n.dp.statistics()
    assert (stats.slow_path_packets, stats.fast_path_packets, stats.flow_table_full) == (3, 1, 2)


@pytest.mark.parametrize("configure, bad", [
    (lambda: Datapath(node_cidr="10.244.1.1/24"), "10.244.1.1/24"),
    (lambda: routed().dp.add_port("pod-c", PortKind.POD, "02:00:00:00:00:zz", "10.244.0.4"), "02:00:00:00:00:zz"),
    (lambda: routed().dp.add_port("pod-c", PortKind.POD, "02:00:00:00:00:0c", "10.244.0.300"), "10.244.0.300"),
    (lambda: routed().dp.add_route("10.50.0.1/16", 1), "10.50.0.1/16"),
], ids=["node_cidr", "mac", "ip", "route"])
def test_bad_configuration_raises_config_error(configure, bad):
    from podnet.errors import ConfigError
    with pytest.raises(ConfigError, match=re.escape(bad)):
        configure()


# --- bridge mode ---------------------------------------------------------------------------------

C_MAC = "02:00:00:00:00:0c"
A1, B1, C1 = "10.244.1.2", "10.244.1.3", "10.244.1.4"


@dataclass
class BridgeNode:
    dp: Datapath
    a: int
    b: int
    c: int


def bridged() -> BridgeNode:
    dp = Datapath(mode=NodeMode.BRIDGE, node_cidr="10.244.1.0/24")
    a = dp.add_port("pod-a", PortKind.POD, F.POD_MAC_A, A1)
    b = dp.add_port("pod-b", PortKind.POD, F.POD_MAC_B, B1)
    c = dp.add_port("pod-c", PortKind.POD, C_MAC, C1)
    return BridgeNode(dp, a, b, c)


def arp_reply(sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str) -> bytearray:
    arp = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REPLY, sha=sender_mac, spa=socket.inet_aton(sender_ip),
                       tha=target_mac, tpa=socket.inet_aton(target_ip))
    return bytearray(bytes(dpkt.ethernet.Ethernet(src=sender_mac, dst=target_mac, type=0x0806, data=arp)))


def test_bridge_gateway_is_the_first_address_of_the_node_cidr():
    n = bridged()
    assert n.dp.gateway_ip == pk.ip_int("10.244.1.1")


def test_bridge_floods_an_arp_request_to_every_other_pod_then_switches_the_reply():
    n = bridged()
    request = F.arp_request(A1, B1)
    actions = n.dp.process(bytearray(request), n.a, 0.0)
    assert [(type(a), a.port) for a in actions] == [(Transmit, n.b), (Transmit, n.c)]
    assert all(bytes(a.frame) == bytes(request) for a in actions)        # switched, not rewritten
    assert n.dp.bridge.lookup(A_MAC, 0.0) == n.a

    reply = arp_reply(B_MAC, B1, A_MAC, A1)
    actions = n.dp.process(bytearray(reply), n.b, 1.0)
    assert [(type(a), a.port) for a in actions] == [(Transmit, n.a)]
    assert bytes(actions[0].frame) == bytes(reply)

    unicast = F.udp(A1, B1, dst_mac=F.POD_MAC_B, payload=b"direct")
    actions = n.dp.process(bytearray(unicast), n.a, 2.0)
    assert [(type(a), a.port) for a in actions] == [(Transmit, n.b)]
    assert bytes(actions[0].frame) == bytes(unicast)                     # no TTL decrement at L2
    bstats = n.dp.bridge.statistics()
    assert (bstats.entries, bstats.learned_total, bstats.flooded_total) == (2, 2, 1)
    assert n.dp.statistics().stages["bridge"] == 3


def test_bridge_answers_arp_for_its_gateway():
    n = bridged()
    (reply,) = n.dp.process(F.arp_request(A1, "10.244.1.1"), n.a, 0.0)
    assert reply.port == n.a
    arp = F.decode(reply.frame).data
    assert arp.op == 2 and arp.sha == GW_MAC and socket.inet_ntoa(arp.spa) == "10.244.1.1"
    assert arp.tha == A_MAC and socket.inet_ntoa(arp.tpa) == A1
    assert n.dp.statistics().arp_replies == 1


def test_bridge_routes_what_is_addressed_to_the_gateway_mac():
    n = bridged()
    frame = F.tcp(A1, B1)                      # dst MAC is the gateway's
    (tx,) = n.dp.process(bytearray(frame), n.a, 0.0)
    eth = F.decode(tx.frame)
    assert tx.port == n.b and eth.dst == B_MAC and eth.src == GW_MAC
    assert eth.data.ttl == 63 and ip_header_ok(eth.data)
    (reply,) = n.dp.process(F.icmp_echo(A1, "10.244.1.1"), n.a, 1.0)
    ip = F.decode(reply.frame).data
    assert socket.inet_ntoa(ip.src) == "10.244.1.1" and ip.data.type == 0
    actions = n.dp.process(F.udp(A1, "10.244.1.77"), n.a, 2.0)       # no such pod
    assert_icmp_from_gateway(actions[0].frame, 3, 1, F.udp(A1, "10.244.1.77"), to_ip=A1,
                             gateway_ip="10.244.1.1")


def test_bridge_forgets_stations_after_300_seconds_via_handle_timer():
    n = bridged()
    n.dp.process(F.arp_request(A1, B1), n.a, 10.0)
    assert n.dp.next_deadline() == 310.0
    n.dp.handle_timer(math.nextafter(310.0, 0.0))
    assert n.dp.bridge.statistics().entries == 1
    n.dp.handle_timer(310.0)
    assert n.dp.bridge.statistics().entries == 0 and n.dp.next_deadline() is None
    actions = n.dp.process(F.udp(B1, A1, src_mac=F.POD_MAC_B, dst_mac=F.POD_MAC_A), n.b, 311.0)
    assert sorted(a.port for a in actions) == [n.a, n.c]               # unknown again: flooded


def test_bridge_with_one_pod_has_nowhere_to_flood():
    dp = Datapath(mode=NodeMode.BRIDGE, node_cidr="10.244.1.0/24")
    a = dp.add_port("pod-a", PortKind.POD, F.POD_MAC_A, A1)
    assert dp.process(F.arp_request(A1, B1), a, 0.0) == [Drop(DropReason.BRIDGE_SAME_PORT, a, "ff:ff:ff:ff:ff:ff")]


def test_bridge_does_not_hairpin_known_unicast():
    n = bridged()
    n.dp.process(F.arp_request(A1, B1), n.a, 0.0)                    # learns A on pod-a
    to_self = F.udp(A1, "10.244.1.50", dst_mac=F.POD_MAC_A)
    assert [(type(a), a.reason) for a in n.dp.process(to_self, n.a, 1.0)] == [(Drop, DropReason.BRIDGE_SAME_PORT)]


def test_bridge_trace_changes_no_bridge_counters():
    n = bridged()
    n.dp.process(F.arp_request(B1, A1, sender_mac=F.POD_MAC_B), n.b, 0.0)
    before, stats = n.dp.bridge.statistics(), n.dp.statistics()
    fdb = {mac: (e.port, e.last_seen) for mac, e in n.dp.bridge.fdb.items()}
    n.dp.trace(F.arp_request(A1, B1), n.a, 5.0)                          # a flood
    n.dp.trace(F.udp(C1, B1, src_mac=C_MAC, dst_mac=F.POD_MAC_B), n.c, 5.0)  # a new station, switched
    assert n.dp.bridge.statistics() == before and n.dp.statistics() == stats
    assert {mac: (e.port, e.last_seen) for mac, e in n.dp.bridge.fdb.items()} == fdb


def test_bridge_trace_calls_a_broadcast_a_flood_even_with_one_other_port():
    dp = Datapath(mode=NodeMode.BRIDGE, node_cidr="10.244.1.0/24")
    a = dp.add_port("pod-a", PortKind.POD, F.POD_MAC_A, A1)
    dp.add_port("pod-b", PortKind.POD, F.POD_MAC_B, B1)
    trace = dp.trace(F.arp_request(A1, B1), a, 0.0)
    assert trace.steps[-1].stage == "bridge" and trace.steps[-1].decision == "flood"


def test_bridge_fast_path_traffic_keeps_the_station_known():
    # Linux's bridge refreshes the FDB on every frame a port receives; a pod whose traffic all takes
    # cached flows must not age out and then have frames to it flooded to every other pod
    n = bridged()
    up = n.dp.add_port("uplink", PortKind.UPLINK, UPLINK_MAC)
    n.dp.add_route("0.0.0.0/0", up)
    for t in range(0, 400, 10):
        n.dp.process(F.udp(A1, "8.8.8.8"), n.a, float(t))
        n.dp.handle_timer(float(t))
    assert n.dp.statistics().fast_path_packets == 39
    assert n.dp.bridge.lookup(A_MAC, 400.0) == n.a
    actions = n.dp.process(F.udp(B1, A1, src_mac=F.POD_MAC_B, dst_mac=F.POD_MAC_A), n.b, 400.0)
    assert [a.port for a in actions] == [n.a]
    # and once A falls silent, it ages out 300 s after its last frame (at 390), not before
    n.dp.handle_timer(689.0)
    assert n.dp.bridge.lookup(A_MAC, 689.0) == n.a
    n.dp.handle_timer(690.0)
    assert n.dp.bridge.lookup(A_MAC, 690.0) is None


# --- randomized: the fast path agrees with the slow path, and nothing raises --------------------

def mutate_outside_the_flow_key(rng: random.Random, frame: bytearray) -> bytearray:
    """Change what the fast path must still validate, never (proto, src, dst, ports)."""
    g = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        what = rng.randrange(9)
        if what == 0:
            g[14] = rng.choice([0x45, 0x45, 0x46, 0x44, 0x55, 0x4F, rng.randrange(256)])
        elif what == 1:
            struct.pack_into("!H", g, 16, rng.choice([rng.randrange(0, 80), len(g) - 14, len(g) - 13,
                                                      rng.randrange(65536)]))
        elif what == 2:
            struct.pack_into("!H", g, 20, rng.choice([0, 0x4000, 0x2000, 0x2000 | rng.randrange(1, 0x2000),
                                                      rng.randrange(1, 0x2000), rng.randrange(65536)]))
        elif what == 3:
            g[22] = rng.choice([0, 1, 2, 255, rng.randrange(256)])
        elif what == 4:
            g[0:6] = rng.choice([GW_MAC, B_MAC, b"\xff" * 6, rng.randbytes(6)])
        elif what == 5:
            del g[rng.randrange(38, len(g) + 1):]
        elif what == 6:
            g += rng.randbytes(rng.randrange(1, 30))
        elif what == 7:
            g[15] = rng.randrange(256)                           # TOS
            g[18:20] = rng.randbytes(2)                          # id
        elif len(g) > 38:
            g[rng.randrange(38, len(g))] ^= 0xFF                  # L4 bytes past the ports
    if rng.random() < 0.75:
        fix_ip_checksum(g)
    return g


def test_fast_path_answers_exactly_like_the_slow_path():
    rng = random.Random(2024)
    cached, reference = routed(), routed(max_flows=0)
    seeds = []
    for i in range(6):
        seeds.append((a_to_b(sport=1000 + i, payload=rng.randbytes(rng.randrange(0, 30))), "a"))
        seeds.append((F.udp(A_IP, B_IP, sport=2000 + i, payload=rng.randbytes(rng.randrange(0, 30))), "a"))
        seeds.append((F.tcp(B_IP, A_IP, sport=80, dport=3000 + i, src_mac=F.POD_MAC_B), "b"))
    ports = {"a": (cached.a, reference.a), "b": (cached.b, reference.b)}
    for frame, who in seeds:
        cached.dp.process(bytearray(frame), ports[who][0], 0.0)
        reference.dp.process(bytearray(frame), ports[who][1], 0.0)
    assert cached.dp.statistics().flows == len(seeds)

    for i in range(4000):
        frame, who = rng.choice(seeds)
        mutated = mutate_outside_the_flow_key(rng, frame)
        vnet = VNET if rng.random() < 0.3 else None
        now = 1.0 + i / 100
        got = cached.dp.process(bytearray(mutated), ports[who][0], now, vnet)
        want = reference.dp.process(bytearray(mutated), ports[who][1], now, vnet)
        assert normalized(got) == normalized(want), mutated.hex()
    fast, ref = cached.dp.statistics(), reference.dp.statistics()
    assert fast.fast_path_packets > 500                          # the fast path really was exercised
    assert ref.fast_path_packets == 0
    assert fast.ports == ref.ports and fast.drops == ref.drops and fast.icmp_sent == ref.icmp_sent


def random_frame(rng: random.Random, bases: list[bytearray]) -> bytearray:
    base = bytearray(rng.choice(bases))
    kind = rng.randrange(8)
    if kind == 0:
        return bytearray(rng.randbytes(rng.randrange(0, 90)))
    if kind == 1:
        return base[:rng.randrange(len(base) + 1)]
    if kind == 2:
        for _ in range(rng.randrange(1, 7)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        return base
    if kind == 3:                                           # damage beyond Ethernet, keep the IP checksum right
        for _ in range(rng.randrange(1, 5)):
            base[rng.randrange(14, len(base))] = rng.randrange(256)
        return fix_ip_checksum(base) if base[12:14] == b"\x08\x00" else base
    if kind == 4 and base[12:14] == b"\x08\x00":            # plausible but wrong header fields
        base[14] = rng.choice([0x45, 0x46, 0x4F, 0x44, rng.randrange(256)])
        struct.pack_into("!H", base, 16, rng.choice([rng.randrange(0, 100), rng.randrange(65536)]))
        struct.pack_into("!H", base, 20, rng.choice([0, 0x4000, 0x2000, rng.randrange(65536)]))
        base[22] = rng.choice([0, 1, 2, rng.randrange(256)])
        base[23] = rng.choice([1, 6, 17, 132, rng.randrange(256)])
        return fix_ip_checksum(base[:rng.randrange(34, len(base) + 1)])
    if kind == 5:
        return base + rng.randbytes(rng.randrange(1, 40))
    if kind == 6:
        struct.pack_into("!H", base, 12, rng.choice([0x0800, 0x0806, 0x86DD, 0x8100, rng.randrange(65536)]))
        return base
    return base


def check_robust(dp: Datapath, port_ids: list[int], bases: list[bytearray], seed: int, count: int) -> None:
    rng = random.Random(seed)
    known = {p.id for p in dp.ports()}
    start = dp.statistics()
    n_tx, n_drop, on_known_ports = (sum(p.tx_packets for p in start.ports), start.dropped,
                                    sum(p.rx_packets for p in start.ports))
    now = 0.0
    for i in range(count):
        frame = random_frame(rng, bases)
        in_port = rng.choice(port_ids + [99])
        now += rng.random()
        vnet = VNET if rng.random() < 0.2 else None
        if i % 10 == 0:
            stats = dp.statistics()
            trace = dp.trace(frame, in_port, now, vnet)
            assert dp.statistics() == stats
            assert all(isinstance(a, Transmit | Drop) for a in trace.actions)
        actions = dp.process(bytearray(frame), in_port, now, vnet)
        assert isinstance(actions, list) and actions, frame.hex()
        for action in actions:
            assert isinstance(action, Transmit | Drop), action
            if isinstance(action, Transmit):
                assert action.port in known and len(action.frame) >= 14
                n_tx += 1
            else:
                assert isinstance(action.reason, DropReason) and action.port == in_port
                n_drop += 1
        on_known_ports += in_port in known
        if i % 50 == 0:
            dp.handle_timer(now)
            assert dp.next_deadline() is None or dp.next_deadline() > now
    stats = dp.statistics()
    assert stats.dropped == n_drop
    assert sum(p.tx_packets for p in stats.ports) == n_tx
    assert sum(p.rx_packets for p in stats.ports) == on_known_ports
    assert stats.fast_path_packets + stats.slow_path_packets == on_known_ports
    assert n_tx > count // 20 and len(stats.drops) >= 8      # the frames reached deep into the pipeline


def routed_bases() -> list[bytearray]:
    inner = bytes(dpkt.ip.IP(src=socket.inet_aton(B_IP), dst=socket.inet_aton(A_IP), p=17,
                             data=dpkt.udp.UDP(sport=1, dport=2, ulen=8)))
    error = dpkt.icmp.ICMP(type=3, code=3, data=b"\x00" * 4 + inner)
    icmp_error = bytearray(bytes(dpkt.ethernet.Ethernet(
        src=A_MAC, dst=GW_MAC, type=0x0800,
        data=dpkt.ip.IP(src=socket.inet_aton(A_IP), dst=socket.inet_aton(B_IP), p=1, data=error))))
    return [a_to_b(), a_to_b(sport=1), F.udp(A_IP, B_IP), F.icmp_echo(A_IP, "169.254.1.1"),
            F.icmp_echo(A_IP, B_IP), F.arp_request(A_IP, "169.254.1.1"), F.arp_request(A_IP, B_IP),
            F.tcp(B_IP, A_IP, src_mac=F.POD_MAC_B), F.udp(A_IP, "10.99.0.1"), F.udp(A_IP, "8.8.8.8"),
            a_to_b(ttl=1), F.udp(A_IP, "169.254.1.1"), icmp_error]


def test_random_frames_never_raise_routed():
    n = routed()
    up = n.dp.add_port("uplink", PortKind.UPLINK, UPLINK_MAC)
    n.dp.add_route("8.0.0.0/8", up)
    for frame, port in ((a_to_b(), n.a), (a_to_b(sport=1), n.a), (F.tcp(B_IP, A_IP, src_mac=F.POD_MAC_B), n.b)):
        n.dp.process(frame, port, 0.0)
    check_robust(n.dp, [n.a, n.b, up], routed_bases(), seed=1, count=2000)


def test_random_frames_never_raise_bridge():
    n = bridged()
    bases = [F.tcp(A1, B1), F.udp(A1, B1, dst_mac=F.POD_MAC_B), F.arp_request(A1, B1),
             F.arp_request(A1, "10.244.1.1"), arp_reply(B_MAC, B1, A_MAC, A1),
             F.icmp_echo(A1, "10.244.1.1"), F.udp(B1, C1, src_mac=F.POD_MAC_B, dst_mac=C_MAC),
             F.udp(A1, "10.99.0.1")]
    check_robust(n.dp, [n.a, n.b, n.c], bases, seed=2, count=1000)


def test_a_reused_client_port_whose_reply_tuple_is_taken_gets_a_new_source_port():
    """Two Services with the same backend: a client that reuses a source port still held by a
    TIME_WAIT-like entry towards that backend would clash on the reply tuple; like nf_nat's
    get_unique_tuple, the datapath moves the source port instead of dropping the SYN."""
    from podnet.core.services.base import Decision, NO_SERVICE, ServiceBackend, SyncReport

    class TwoVips(ServiceBackend):
        name = "two-vips"

        def sync(self, services, *, full=True):
            return SyncReport(full, 0, 0, 0)

        def decide(self, pkt, now, *, local_source=False, effects=True):
            if pkt.dst in (pk.ip_int("10.96.0.1"), pk.ip_int("10.96.0.2")):
                return Decision(dnat=(pk.ip_int(B_IP), 8080))
            return NO_SERVICE

        def dump(self):
            return ""

    n = routed()
    n.dp.set_backend(TwoVips())
    first = n.dp.process(F.tcp(A_IP, "10.96.0.1", 40000, 80, flags=dpkt.tcp.TH_SYN), n.a, 0.0)
    assert isinstance(first[0], Transmit)
    second = n.dp.process(F.tcp(A_IP, "10.96.0.2", 40000, 80, flags=dpkt.tcp.TH_SYN), n.a, 1.0)
    assert isinstance(second[0], Transmit), second           # not a ct_clash drop
    moved = F.decode(second[0].frame).data.data
    assert moved.dport == 8080 and moved.sport != 40000       # a new source port towards the backend
    # and the backend's reply to the moved port comes back to the client as 10.96.0.2:80 -> :40000
    reply = n.dp.process(F.tcp(B_IP, A_IP, 8080, moved.sport, flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK,
                               src_mac=F.POD_MAC_B), n.b, 1.1)
    back = F.decode(reply[0].frame).data
    assert (pk.ip_str(int.from_bytes(back.src, "big")), back.data.sport, back.data.dport) == ("10.96.0.2", 80, 40000)
