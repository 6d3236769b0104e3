"""The eBPF backend inside podnet's datapath (no root): a pod reaches a ClusterIP, the reply comes
back from it, a Service without backends is refused, a trace shows the map entries, and podnet's
conntrack tells the backend when a flow is gone."""

from __future__ import annotations

import ipaddress

import dpkt

from podnet.core.datapath import Drop
from podnet.core.packet import DropReason
from podnet.core.services.ebpf import EbpfBackend
from podnet.testing import frames as F

from onenode import WEB_MAC, ip_layer, one_node


def _node():
    return one_node(EbpfBackend)


def test_a_pod_reaches_a_cluster_ip_and_the_reply_comes_from_it():
    dp, backend, client, web = _node()
    out = dp.process(F.tcp("10.244.0.9", "10.96.0.10", 40000, 80, flags=dpkt.tcp.TH_SYN), client, 10.0)
    assert len(out) == 1 and out[0].port == web
    syn = ip_layer(out[0])
    assert (str(ipaddress.IPv4Address(syn.dst)), syn.data.dport) == ("10.244.0.5", 8080)
    reply = dp.process(F.tcp("10.244.0.5", "10.244.0.9", 8080, 40000, flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK,
                             src_mac=WEB_MAC), web, 10.1)
    back = ip_layer(reply[0])
    assert reply[0].port == client and (str(ipaddress.IPv4Address(back.src)), back.data.sport) == ("10.96.0.10", 80)
    assert dp.statistics().decision_cost == 4 and len(backend.ct) == 2


def test_a_service_without_backends_is_refused_and_a_trace_names_the_map_entries():
    dp, backend, client, _ = _node()
    out = dp.process(F.tcp("10.244.0.9", "10.96.0.99", 40001, 80, flags=dpkt.tcp.TH_SYN), client, 10.0)
    assert isinstance(out[-1], Drop) and out[-1].reason is DropReason.SERVICE_REJECT
    icmp = ip_layer(out[0]).data
    assert (icmp.type, icmp.code) == (3, 3)          # destination unreachable, port unreachable
    trace = str(dp.trace(F.tcp("10.244.0.9", "10.96.0.10", 40002, 80, flags=dpkt.tcp.TH_SYN), client, 10.0))
    assert "ebpf     ACCEPT DNAT to 10.244.0.5:8080  lb4_services_v2[10.96.0.10:80/TCP slot 0] " \
           "lb4_services_v2[10.96.0.10:80/TCP slot 1] lb4_backends_v3[1]" in trace
    assert backend.statistics()["decisions"] == 1      # the trace decided nothing


def test_podnets_conntrack_tells_the_backend_when_a_flow_is_gone():
    dp, backend, client, _ = _node()
    dp.process(F.tcp("10.244.0.9", "10.96.0.10", 40000, 80, flags=dpkt.tcp.TH_SYN), client, 10.0)
    assert backend.statistics()["open_flows"] == 1
    dp.conntrack.handle_timer(10.0 + 3600)           # the unanswered SYN's conntrack entry expires
    assert backend.statistics()["open_flows"] == 0
    backend.handle_timer(backend.next_deadline())
    assert len(backend.ct) == 0
