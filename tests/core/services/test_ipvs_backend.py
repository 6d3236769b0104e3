"""IpvsBackend: kube-proxy's IPVS mode end to end — sync, first-packet decisions, masquerading,
persistence, graceful termination, connection bookkeeping, O(1) syncs."""

from __future__ import annotations

import gc
import ipaddress

import pytest

from podnet.core.conntrack import TcpState
from podnet.core.services.base import Decision, Verdict
from podnet.core.services.ipvs import IpvsBackend, IpvsDecision
from podnet.core.services.kubeproxy import ProxyEndpoint, ProxyServicePort
from podnet.core.services.packetinfo import PacketInfo
from podnet.errors import ConfigError

NODE = "192.168.0.10"
POD_CIDR = "10.244.0.0/16"
TCP, UDP = 6, 17


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def E(addr: str, port: int = 8080, **kw) -> ProxyEndpoint:
    return ProxyEndpoint(addr, port, **kw)


def svc(name: str, cluster_ip: str, port: int, *endpoints: ProxyEndpoint, protocol: str = "TCP",
        **kw) -> ProxyServicePort:
    return ProxyServicePort("default", name, "", protocol, cluster_ip, port, endpoints=endpoints, **kw)


def backend(*services: ProxyServicePort, **kw) -> IpvsBackend:
    kw.setdefault("node_ips", (NODE,))
    kw.setdefault("local_addresses", (ip(NODE),))
    b = IpvsBackend(cluster_cidr=POD_CIDR, **kw)
    b.sync(services)
    return b


def pkt(src: str, dst: str, dport: int, sport: int = 40000, proto: int = TCP, **kw) -> PacketInfo:
    return PacketInfo(ip(src), ip(dst), proto, sport, dport, **kw)


def target(decision: Decision) -> str | None:
    if decision.dnat is None:
        return None
    return f"{ipaddress.IPv4Address(decision.dnat[0])}:{decision.dnat[1]}"


# -- services, real servers, the first packet ----------------------------------------------------

def test_cluster_ip_round_robin_from_the_list_head():
    # endpoints are added in "ip:port" order and each goes to the head: the list is reversed
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5"), E("10.244.2.7"), E("10.244.3.9")))
    got = [target(b.decide(pkt("10.244.1.20", "10.96.0.10", 80, sport=40000 + i), 1.0)) for i in range(4)]
    assert got == ["10.244.3.9:8080", "10.244.2.7:8080", "10.244.1.5:8080", "10.244.3.9:8080"]


def test_virtual_services_for_cluster_ip_external_ip_lb_and_node_port():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5"), node_port=30080, external_ips=("203.0.113.5",),
                    load_balancer_ips=("198.51.100.7",)))
    assert sorted((p, str(ipaddress.IPv4Address(a)), port) for p, a, port in b.services) == [
        (TCP, "10.96.0.10", 80), (TCP, NODE, 30080), (TCP, "198.51.100.7", 80), (TCP, "203.0.113.5", 80)]
    assert b.bound_addresses == {ip("10.96.0.10"), ip("203.0.113.5"), ip("198.51.100.7")}
    for dst, port in (("203.0.113.5", 80), ("198.51.100.7", 80), (NODE, 30080)):
        assert target(b.decide(pkt("198.51.100.200", dst, port), 1.0)) == "10.244.1.5:8080"


def test_no_virtual_service_is_no_service():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5")))
    d = b.decide(pkt("10.244.1.20", "10.244.2.30", 80), 1.0)
    assert d.verdict is Verdict.ACCEPT and d.dnat is None and not d.masquerade


def test_cluster_ip_at_a_port_without_a_service_is_rejected_by_kube_ipvs_filter():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5")))
    d = b.decide(pkt("10.244.1.20", "10.96.0.10", 81), 1.0)
    assert (d.verdict, d.reject_with) == (Verdict.REJECT, "icmp-port-unreachable")
    assert d.path[-1] == "filter/KUBE-IPVS-FILTER:6"


def test_no_endpoints_answers_icmp_port_unreachable_for_tcp_and_udp():
    # ip_vs_leave(): "the TCP RST packet cannot be sent, instead that ICMP_PORT_UNREACH is sent"
    b = backend(svc("empty", "10.96.0.11", 80), svc("dns", "10.96.0.12", 53, protocol="UDP"))
    for dst, port, proto in (("10.96.0.11", 80, TCP), ("10.96.0.12", 53, UDP)):
        d = b.decide(pkt("10.244.1.20", dst, port, proto=proto), 1.0)
        assert (d.verdict, d.reject_with) == (Verdict.REJECT, "icmp-port-unreachable")
        assert d.path[-1].endswith("no destination available")
    assert b.statistics()["no_destination"] == 2


def test_a_tcp_first_packet_without_syn_is_not_scheduled():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5")))
    d = b.decide(pkt("10.244.1.20", "10.96.0.10", 80, tcp_flags=0x10), 1.0)     # a bare ACK
    assert (d.verdict, d.reject_with) == (Verdict.REJECT, "tcp-reset")
    assert len(b.conns) == 0
    assert b.decide(pkt("10.244.1.20", "10.96.0.10", 80, tcp_flags=0x02), 1.0).dnat is not None


# -- masquerade by the residual rules -------------------------------------------------------------

def test_masquerade_for_off_cluster_sources_hairpin_and_node_ports():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5", is_local=True), node_port=30080))
    pod = b.decide(pkt("10.244.9.9", "10.96.0.10", 80), 1.0)
    assert not pod.masquerade
    hairpin = b.decide(pkt("10.244.1.5", "10.96.0.10", 80), 1.0)     # KUBE-LOOP-BACK
    assert hairpin.masquerade and not hairpin.random_fully
    assert "nat/KUBE-POSTROUTING:1" in hairpin.path
    outside = b.decide(pkt("172.16.0.1", "10.96.0.10", 80), 1.0)      # ! -s clusterCIDR -> KUBE-MARK-MASQ
    assert outside.masquerade and outside.random_fully
    assert "nat/KUBE-MARK-MASQ:1" in outside.path
    node_port = b.decide(pkt("172.16.0.1", NODE, 30080), 1.0)
    assert node_port.masquerade and "nat/KUBE-NODE-PORT:1" in node_port.path
    assert node_port.mark == 0       # the mark is cleared (--xor-mark) in KUBE-POSTROUTING


def test_external_traffic_policy_local_keeps_the_source_and_uses_local_endpoints():
    s = svc("web", "10.96.0.10", 80, E("10.244.1.5", is_local=True), E("10.244.2.7"), node_port=30080,
            load_balancer_ips=("198.51.100.7",), external_policy_local=True)
    b = backend(s)
    for dst, port in ((NODE, 30080), ("198.51.100.7", 80)):
        for i in range(3):
            d = b.decide(pkt("172.16.0.1", dst, port, sport=41000 + i), 1.0)
            assert target(d) == "10.244.1.5:8080" and not d.masquerade
    # the ClusterIP keeps every endpoint
    got = {target(b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=42000 + i), 1.0)) for i in range(2)}
    assert got == {"10.244.1.5:8080", "10.244.2.7:8080"}


def test_external_traffic_policy_local_without_local_endpoints_falls_back_to_cluster():
    # syncEndpoint: "Allow access from local PODs even if no local endpoints exist" (PR 97081)
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.2.7"), node_port=30080, external_policy_local=True))
    assert target(b.decide(pkt("172.16.0.1", NODE, 30080), 1.0)) == "10.244.2.7:8080"


def test_load_balancer_source_ranges_drop_other_sources():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.2.7"), load_balancer_ips=("198.51.100.7",),
                    source_ranges=("203.0.113.0/24",)))
    allowed = b.decide(pkt("203.0.113.9", "198.51.100.7", 80), 1.0)
    assert target(allowed) == "10.244.2.7:8080" and allowed.masquerade
    blocked = b.decide(pkt("192.0.2.1", "198.51.100.7", 80), 1.0)
    assert blocked.verdict is Verdict.DROP
    assert blocked.path[-1] == "filter/KUBE-SOURCE-RANGES-FIREWALL:2"   # after the CIDR RETURN
    # the node is not in the ranges: kube-proxy drops its own traffic to the LB IP (KUBE-IPVS-OUT-FILTER)
    own = b.decide(pkt("198.51.100.7", "198.51.100.7", 80), 1.0, local_source=True)
    assert own.verdict is Verdict.DROP and own.path[-1] == "filter/KUBE-IPVS-OUT-FILTER:1"


def test_node_traffic_to_a_cluster_ip_is_masqueraded():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.2.7")))
    d = b.decide(pkt(NODE, "10.96.0.10", 80), 1.0, local_source=True)
    assert target(d) == "10.244.2.7:8080" and d.masquerade
    assert d.path[0] == "nat/OUTPUT:1"


def test_masquerade_all():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.2.7")), masquerade_all=True)
    assert b.decide(pkt("10.244.9.9", "10.96.0.10", 80), 1.0).masquerade


# -- the connection table -------------------------------------------------------------------------

def test_connections_count_as_active_and_go_when_conntrack_forgets_them():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5")))
    decisions = [b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=43000 + i), 1.0) for i in range(3)]
    dest = next(iter(b.services.values())).dests[0]
    assert (dest.activeconns, dest.inactconns) == (3, 0)
    assert all(isinstance(d, IpvsDecision) and d.conn for d in decisions)
    b.flow_closed(decisions[0], 50.0)
    assert (dest.activeconns, dest.inactconns) == (2, 0)
    b.flow_closed(decisions[0], 51.0)            # twice: nothing more
    assert dest.activeconns == 2


def test_track_tcp_states_starts_in_syn_recv_and_follows_reports():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5")), track_tcp_states=True)
    dest = next(iter(b.services.values())).dests[0]
    d = b.decide(pkt("10.244.9.9", "10.96.0.10", 80), 1.0)
    assert (dest.activeconns, dest.inactconns) == (0, 1)
    conn = b.conns.conns[d.conn]
    assert conn.deadline == 61.0                     # SYN_RECV: 60 s
    b.flow_state(d, 1.1, TcpState.ESTABLISHED)
    assert (dest.activeconns, dest.inactconns) == (1, 0) and conn.deadline == pytest.approx(901.1)
    b.flow_state(d, 5.0, "FIN_WAIT")
    assert (dest.activeconns, dest.inactconns) == (0, 1) and conn.deadline == 125.0


def test_udp_is_inactive_and_outlives_conntrack_until_its_own_timeout():
    b = backend(svc("dns", "10.96.0.10", 53, E("10.244.1.5", 53), protocol="UDP"))
    dest = next(iter(b.services.values())).dests[0]
    d = b.decide(pkt("10.244.9.9", "10.96.0.10", 53, proto=UDP), 10.0)
    assert (dest.activeconns, dest.inactconns) == (0, 1)
    assert b.next_deadline() == 310.0
    b.flow_closed(d, 40.0)                       # conntrack's 30 s are up; IPVS keeps 300 s
    del d
    gc.collect()
    b.handle_timer(309.9)
    assert dest.inactconns == 1
    b.handle_timer(310.0)
    assert dest.inactconns == 0 and len(b.conns) == 0


def test_a_flow_still_held_by_the_datapath_is_not_expired():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5")))
    dest = next(iter(b.services.values())).dests[0]
    held = b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=1), 0.0)
    b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=2), 0.0)     # dropped by the datapath
    gc.collect()
    assert dest.activeconns == 2                # until the backend is called again
    assert b.next_deadline() == 900.0 and dest.activeconns == 1
    b.handle_timer(2000.0)
    assert dest.activeconns == 1
    assert b.conns.conns[held.conn].deadline == 2700.0        # re-armed every 900 s


def test_repeated_decisions_nobody_keeps_are_new_connections_each():
    # what a benchmark or a trace-like caller does: each decide is a NEW flow, none is kept
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5"), E("10.244.2.7")))
    got = [target(b.decide(pkt("10.244.9.9", "10.96.0.10", 80), 1.0)) for _ in range(4)]
    assert got == ["10.244.2.7:8080", "10.244.1.5:8080"] * 2
    assert b.statistics()["connections"] == 0


def test_reusing_a_client_tuple_reuses_the_udp_connection():
    b = backend(svc("dns", "10.96.0.10", 53, E("10.244.1.5", 53), E("10.244.2.7", 53), protocol="UDP"))
    first = b.decide(pkt("10.244.9.9", "10.96.0.10", 53, sport=5353, proto=UDP), 1.0)
    b.flow_closed(first, 31.0)
    again = b.decide(pkt("10.244.9.9", "10.96.0.10", 53, sport=5353, proto=UDP), 40.0)
    assert target(again) == target(first) and again.conn == first.conn
    other = b.decide(pkt("10.244.9.9", "10.96.0.10", 53, sport=5354, proto=UDP), 40.0)
    assert target(other) != target(first)           # rr moved on only once


def test_a_trace_changes_nothing():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5"), E("10.244.2.7")))
    traced = b.decide(pkt("10.244.9.9", "10.96.0.10", 80), 1.0, effects=False)
    assert len(b.conns) == 0 and b.statistics()["decisions"] == 0
    real = b.decide(pkt("10.244.9.9", "10.96.0.10", 80), 1.0)
    assert target(traced) == target(real)


# -- persistence ----------------------------------------------------------------------------------

def test_session_affinity_pins_a_client_with_a_template():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5"), E("10.244.2.7"), affinity_timeout_s=60))
    vs = next(iter(b.services.values()))
    assert vs.persistent and vs.timeout == 60
    d1 = b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=1), 0.0)
    d2 = b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=2), 10.0)
    other = b.decide(pkt("10.244.9.8", "10.96.0.10", 80, sport=1), 10.0)
    assert target(d1) == target(d2) != target(other)
    assert "persistence template" in d2.path[-3]
    dest = vs.by_key[d1.dnat]
    assert dest.persistconns == 1 and dest.activeconns == 2
    b.flow_closed(d1, 20.0)
    b.flow_closed(d2, 20.0)
    b.handle_timer(69.9)                        # the template was refreshed at 10: 10 + 60
    assert dest.persistconns == 1
    b.handle_timer(70.0)
    assert dest.persistconns == 0 and len(b.conns) == 2   # the other client's connection and template


def test_a_template_outlives_its_timeout_while_it_controls_connections():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5"), affinity_timeout_s=30))
    d = b.decide(pkt("10.244.9.9", "10.96.0.10", 80), 0.0)
    template = next(c for c in b.conns if c.template)
    b.handle_timer(30.0)
    assert template.id in b.conns.conns and template.deadline == 90.0   # expire_later: 60 s more
    b.flow_closed(d, 40.0)
    b.handle_timer(90.0)
    assert template.id not in b.conns.conns


def test_a_quiesced_destination_invalidates_its_templates():
    # expire_quiescent_template=1: the pinned client is scheduled afresh once its server drains
    s1 = svc("web", "10.96.0.10", 80, E("10.244.1.5"), E("10.244.2.7"), affinity_timeout_s=600)
    b = backend(s1)
    d = b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=1), 0.0)
    pinned = target(d)
    remaining = tuple(ep for ep in s1.endpoints if f"{ep.ip}:{ep.port}" != pinned)
    b.sync([svc("web", "10.96.0.10", 80, *remaining, affinity_timeout_s=600)], full=False)
    again = b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=2), 1.0)
    assert target(again) != pinned
    assert b.ipvsadm(2.0, connections=True).count(":65535") == 2     # the unhashed template


# -- graceful termination -------------------------------------------------------------------------

def test_a_removed_tcp_endpoint_drains_at_weight_0_then_goes():
    a, c = E("10.244.1.5"), E("10.244.2.7")
    b = backend(svc("web", "10.96.0.10", 80, a, c))
    held = [b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=44000 + i), 1.0) for i in range(2)]
    vs = next(iter(b.services.values()))
    draining = vs.by_key[(ip("10.244.2.7"), 8080)]
    assert draining.activeconns == 1
    report = b.sync([svc("web", "10.96.0.10", 80, a)], full=False)
    assert draining.weight == 0 and draining in vs.dests
    assert report.objects_written == 1 and report.detail["terminating_real_servers"] == 1
    for i in range(4):                            # no new connection goes there
        assert target(b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=45000 + i), 2.0)) == "10.244.1.5:8080"
    b.flow_closed(next(d for d in held if target(d) == "10.244.2.7:8080"), 3.0)
    assert draining not in vs.dests and b.statistics()["graceful_deletes"] == 1
    assert "10.244.2.7" not in b.dump()


def test_a_removed_udp_endpoint_is_deleted_at_once():
    b = backend(svc("dns", "10.96.0.10", 53, E("10.244.1.5", 53), E("10.244.2.7", 53), protocol="UDP"))
    for i in range(2):
        b.decide(pkt("10.244.9.9", "10.96.0.10", 53, sport=100 + i, proto=UDP), 1.0)
    b.sync([svc("dns", "10.96.0.10", 53, E("10.244.1.5", 53), protocol="UDP")], full=False)
    assert [f"{ipaddress.IPv4Address(d.addr)}" for d in next(iter(b.services.values())).dests] == ["10.244.1.5"]


def test_an_endpoint_back_while_draining_is_deleted_and_added_again():
    a, c = E("10.244.1.5"), E("10.244.2.7")
    b = backend(svc("web", "10.96.0.10", 80, a, c))
    held = [b.decide(pkt("10.244.9.9", "10.96.0.10", 80, sport=i), 1.0) for i in range(2)]
    b.sync([svc("web", "10.96.0.10", 80, a)], full=False)
    report = b.sync([svc("web", "10.96.0.10", 80, a, c)], full=False)
    vs = next(iter(b.services.values()))
    back = vs.by_key[(ip("10.244.2.7"), 8080)]
    assert back.weight == 1 and report.detail["real_servers_written"] == 2
    assert back.activeconns == 1                # the same real server, revived with its connections
    assert vs.dests[0] is back                  # re-added: at the head of the list
    assert held


def test_terminating_endpoints_are_used_only_without_ready_ones():
    s = svc("web", "10.96.0.10", 80, E("10.244.1.5"), E("10.244.2.7", ready=False, serving=True, terminating=True))
    b = backend(s)
    assert [f"{ipaddress.IPv4Address(d.addr)}" for d in next(iter(b.services.values())).dests] == ["10.244.1.5"]
    b2 = backend(svc("web", "10.96.0.10", 80, E("10.244.2.7", ready=False, serving=True, terminating=True)))
    assert target(b2.decide(pkt("10.244.9.9", "10.96.0.10", 80), 1.0)) == "10.244.2.7:8080"


# -- sync is O(changes) ---------------------------------------------------------------------------

def many(n: int, endpoints_of_first: int = 2) -> list[ProxyServicePort]:
    out = []
    for i in range(n):
        eps = [E(f"10.244.{i // 250}.{i % 250 + 1}", 8080 + j) for j in range(endpoints_of_first if i == 0 else 2)]
        out.append(svc(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}", 80, *eps))
    return out


@pytest.mark.parametrize("n", [10, 1000])
def test_one_endpoint_change_writes_one_real_server_whatever_the_size(n):
    services = many(n)
    b = IpvsBackend(cluster_cidr=POD_CIDR)
    first = b.sync(services)
    assert first.objects_total == 3 * n
    services[0] = many(1, endpoints_of_first=3)[0]
    report = b.sync(services, full=False)
    assert report.objects_written == 1
    assert report.detail == {"virtual_services_written": 0, "real_servers_written": 1, "ipset_entries_written": 0,
                             "services_examined": 1, "iptables_rules": report.detail["iptables_rules"],
                             "iptables_rules_changed": False, "terminating_real_servers": 0}
    again = b.sync(services, full=True)           # a full resync recomputes, and writes nothing
    assert again.objects_written == 0 and again.detail["services_examined"] == n


def test_removing_a_service_deletes_its_virtual_service_and_set_entries():
    b = backend(svc("web", "10.96.0.10", 80, E("10.244.1.5")), svc("api", "10.96.0.11", 443, E("10.244.1.6", 443)))
    report = b.sync([svc("api", "10.96.0.11", 443, E("10.244.1.6", 443))], full=False)
    assert report.detail["virtual_services_written"] == 1
    assert report.detail["ipset_entries_written"] == 2          # KUBE-CLUSTER-IP and KUBE-IPVS-IPS
    assert b.bound_addresses == {ip("10.96.0.11")}
    assert b.decide(pkt("10.244.9.9", "10.96.0.10", 80), 1.0).dnat is None


def test_two_ports_claiming_one_virtual_service_is_a_config_error():
    b = IpvsBackend(cluster_cidr=POD_CIDR)
    with pytest.raises(ConfigError, match="10.96.0.10:80"):
        b.sync([svc("a", "10.96.0.10", 80), svc("b", "10.96.0.10", 80)])
    assert b.services == {}


def test_an_address_can_move_between_services_in_one_sync():
    b = backend(svc("a", "10.96.0.10", 80, E("10.244.1.5")))
    b.sync([svc("b", "10.96.0.10", 80, E("10.244.2.7"))], full=False)
    assert target(b.decide(pkt("10.244.9.9", "10.96.0.10", 80), 1.0)) == "10.244.2.7:8080"


# -- choosing schedulers --------------------------------------------------------------------------

def test_schedulers_per_service_and_default():
    s1 = svc("web", "10.96.0.10", 80, E("10.244.1.5"))
    s2 = ProxyServicePort("default", "api", "https", "TCP", "10.96.0.11", 443, endpoints=(E("10.244.1.6", 443),))
    b = backend(s1, s2, scheduler="wlc", schedulers={"default/api:https": "mh"})
    names = {vs.owner: vs.sched_name for vs in b.services.values()}
    assert names == {"default/web": "wlc", "default/api:https": "mh"}
    mh = b.services[(TCP, ip("10.96.0.11"), 443)]
    assert "mh (mh-port)" in b.dump()              # kube-proxy's FlagSourceHash
    assert mh.flags == 0x10
    b.set_scheduler("default/web", "sh")
    report = b.sync([s1, s2], full=False)
    assert report.detail["virtual_services_written"] == 1
    assert b.services[(TCP, ip("10.96.0.10"), 80)].sched_name == "sh"


def test_unknown_schedulers_are_config_errors():
    with pytest.raises(ConfigError, match="foo"):
        IpvsBackend(scheduler="foo")
    with pytest.raises(ConfigError, match="default/web"):
        IpvsBackend(schedulers={"default/web": "bar"})


def test_decide_cost_does_not_grow_with_the_number_of_services():
    small, large = IpvsBackend(cluster_cidr=POD_CIDR), IpvsBackend(cluster_cidr=POD_CIDR)
    small.sync(many(10))
    large.sync(many(1000))
    probe = pkt("10.244.9.9", "10.96.0.1", 80)
    assert small.decide(probe, 1.0, effects=False).cost == large.decide(probe, 1.0, effects=False).cost
