"""The IPVS backend inside podnet's datapath (no root): a pod reaches a ClusterIP and the reply
comes back from it, a Service without endpoints answers port unreachable, a trace shows the rules
and the virtual service, and podnet's conntrack tells IPVS when a flow is gone."""

from __future__ import annotations

import gc
import ipaddress

import dpkt

from podnet.core.datapath import Drop
from podnet.core.packet import DropReason
from podnet.core.services.ipvs import IpvsBackend
from podnet.core.services.kubeproxy import ProxyEndpoint, ProxyServicePort
from podnet.testing import frames as F

from onenode import WEB_MAC, ip_layer, one_node


def _node(**kw):
    return one_node(IpvsBackend, **kw)


def _dest(backend: IpvsBackend):
    return backend.services[(6, int(ipaddress.IPv4Address("10.96.0.10")), 80)].dests[0]


def test_a_pod_reaches_a_cluster_ip_and_the_reply_comes_from_it():
    dp, backend, client, web = _node()
    out = dp.process(F.tcp("10.244.0.9", "10.96.0.10", 40000, 80, flags=dpkt.tcp.TH_SYN), client, 10.0)
    assert len(out) == 1 and out[0].port == web
    syn = ip_layer(out[0])
    assert (str(ipaddress.IPv4Address(syn.dst)), syn.data.dport) == ("10.244.0.5", 8080)
    assert str(ipaddress.IPv4Address(syn.src)) == "10.244.0.9"          # a pod source: no masquerade
    reply = dp.process(F.tcp("10.244.0.5", "10.244.0.9", 8080, 40000, flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK,
                             src_mac=WEB_MAC), web, 10.1)
    back = ip_layer(reply[0])
    assert reply[0].port == client and (str(ipaddress.IPv4Address(back.src)), back.data.sport) == ("10.96.0.10", 80)
    # the datapath reports conntrack's TCP states, so IPVS follows the handshake as the kernel's
    # table does: SYN_RECV counts as inactive, ESTABLISHED (after the client's ACK) as active
    assert (_dest(backend).activeconns, _dest(backend).inactconns) == (0, 1)
    dp.process(F.tcp("10.244.0.9", "10.96.0.10", 40000, 80, flags=dpkt.tcp.TH_ACK), client, 10.2)
    assert (_dest(backend).activeconns, _dest(backend).inactconns) == (1, 0)
    assert "TCP  10.96.0.10:80 rr\n  -> 10.244.0.5:8080              Masq    1      1          0" in backend.dump()


def test_a_service_without_endpoints_and_a_wrong_port_are_refused():
    dp, backend, client, _ = _node()
    out = dp.process(F.tcp("10.244.0.9", "10.96.0.99", 40001, 80, flags=dpkt.tcp.TH_SYN), client, 10.0)
    assert isinstance(out[-1], Drop) and out[-1].reason is DropReason.SERVICE_REJECT
    icmp = ip_layer(out[0]).data
    assert (icmp.type, icmp.code) == (3, 3)          # ip_vs_leave(): ICMP port unreachable, even for TCP
    out = dp.process(F.tcp("10.244.0.9", "10.96.0.10", 40002, 443, flags=dpkt.tcp.TH_SYN), client, 10.0)
    assert isinstance(out[-1], Drop) and out[-1].reason is DropReason.SERVICE_REJECT   # KUBE-IPVS-FILTER


def test_a_trace_shows_the_rules_and_the_virtual_service_and_decides_nothing():
    dp, backend, client, _ = _node()
    trace = str(dp.trace(F.tcp("10.244.0.9", "10.96.0.10", 40003, 80, flags=dpkt.tcp.TH_SYN), client, 10.0))
    assert "ipvs/TCP 10.96.0.10:80 rr -> 10.244.0.5:8080 (scheduled)" in trace
    assert "filter/KUBE-IPVS-FILTER:2" in trace
    assert backend.statistics()["decisions"] == 0 and len(backend.conns) == 0


def test_podnets_conntrack_tells_ipvs_when_a_flow_is_gone():
    dp, backend, client, _ = _node()
    dp.process(F.tcp("10.244.0.9", "10.96.0.10", 40000, 80, flags=dpkt.tcp.TH_SYN), client, 10.0)
    assert _dest(backend).activeconns + _dest(backend).inactconns == 1
    dp.conntrack.handle_timer(10.0 + 3600)           # the unanswered SYN's conntrack entry expires
    assert _dest(backend).activeconns + _dest(backend).inactconns == 0 and len(backend.conns) == 0


def test_a_first_packet_the_datapath_drops_leaves_no_connection_behind():
    dp, backend, client, _ = _node()
    backend.sync([ProxyServicePort("default", "far", "http", "TCP", "10.96.0.20", 80,
                                   endpoints=(ProxyEndpoint("10.244.0.77", 80),))])   # in the node's block: no route
    out = dp.process(F.tcp("10.244.0.9", "10.96.0.20", 40000, 80, flags=dpkt.tcp.TH_SYN), client, 10.0)
    assert isinstance(out[-1], Drop)
    gc.collect()
    # nothing holds the Decision: the TCP connection goes at the backend's next call
    assert backend.statistics()["connections"] == 0
    assert "Masq    1      0          0" in backend.dump()
