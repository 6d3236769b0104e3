"""The eBPF backend's decisions and syncs: the two-step lookup, selection, affinity, scopes, source
ranges, full maps, O(1) updates, conntrack hand-off, socket-LB and XDP. No root, explicit `now`."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from podnet.core.services.base import Verdict
from podnet.core.services.ebpf import EbpfBackend
from podnet.core.services.ebpf import lbmaps as lb
from podnet.core.services.ebpf.ct import RX_CLOSING, TX_CLOSING, CtEntry, CtTuple, TUPLE_F_SERVICE
from podnet.core.services.ebpf.lbmaps import LbMapSizes
from podnet.core.services.ebpf.programs import XdpAction
from podnet.core.services.kubeproxy import ProxyEndpoint, ProxyServicePort
from podnet.core.services.packetinfo import PacketInfo
from podnet.errors import ConfigError
from podnet.testing import frames as F

NODE_IP, GATEWAY = "192.168.1.10", "169.254.1.1"
CLIENT, OUTSIDE = "10.244.0.9", "172.18.0.2"
NOW = 1000.0


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def make(**kw) -> EbpfBackend:
    return EbpfBackend(cluster_cidr="10.244.0.0/16", node_ips=[NODE_IP], local_addresses=[ip(NODE_IP), ip(GATEWAY)],
                       seed=7, **kw)


def E(addr: str, port: int = 8080, **kw) -> ProxyEndpoint:
    return ProxyEndpoint(addr, port, **kw)


def svc(name: str, cluster_ip: str, *endpoints: ProxyEndpoint, port: int = 80, protocol: str = "TCP",
        **kw) -> ProxyServicePort:
    return ProxyServicePort("default", name, "http", protocol, cluster_ip, port, endpoints=endpoints, **kw)


def syn(src: str, dst: str, dport: int = 80, sport: int = 40000, proto: int = 6) -> PacketInfo:
    return PacketInfo(ip(src), ip(dst), proto, sport, dport, tcp_flags=0x02 if proto == 6 else 0, length=60)


WEB = svc("web", "10.96.0.10", E("10.244.0.5", is_local=True), E("10.244.1.6"), E("10.244.2.7"))
WEB_IPS = {ip("10.244.0.5"), ip("10.244.1.6"), ip("10.244.2.7")}


def test_two_step_lookup_master_then_slot_then_backend():
    b = make()
    b.sync([WEB])
    d = b.decide(syn(CLIENT, "10.96.0.10"), NOW)
    assert d.verdict is Verdict.ACCEPT and not d.masquerade
    master, slot_entry, backend_entry = d.path
    assert master == "lb4_services_v2[10.96.0.10:80/TCP slot 0]"
    slot = int(slot_entry.split(" slot ")[1].rstrip("]"))
    assert slot_entry == f"lb4_services_v2[10.96.0.10:80/TCP slot {slot}]" and 1 <= slot <= 3
    # read the same entries straight from the maps
    svc_value = lb.Lb4Service.unpack(b.maps.services.peek(lb.Lb4Key(ip("10.96.0.10"), 80, 0, 6).pack()))
    assert svc_value.count == 3
    backend_id = lb.Lb4Service.unpack(b.maps.services.peek(lb.Lb4Key(ip("10.96.0.10"), 80, slot, 6).pack())).backend_id
    assert backend_entry == f"lb4_backends_v3[{backend_id}]"
    backend = lb.Lb4Backend.unpack(b.maps.backends.peek(lb.pack_backend_key(backend_id)))
    assert d.dnat == (backend.address, 8080) and backend.address in WEB_IPS
    assert d.cost == 4          # master, CT_SERVICE, slot, backend: the same for 1 or 10,000 Services


def test_not_a_service_costs_one_lookup_and_icmp_none():
    b = make()
    b.sync([WEB])
    miss = b.decide(syn(CLIENT, "10.96.0.11"), NOW)
    assert not miss.is_service and miss.verdict is Verdict.ACCEPT and miss.cost == 1
    icmp = b.decide(PacketInfo(ip(CLIENT), ip("10.96.0.10"), 1), NOW)
    assert not icmp.is_service and icmp.cost == 0


def test_random_selection_is_uniform():
    b = make()
    b.sync([WEB])
    counts = {a: 0 for a in WEB_IPS}
    for i in range(3000):
        counts[b.decide(syn(CLIENT, "10.96.0.10", sport=10000 + i), NOW).dnat[0]] += 1
    chi2 = sum((n - 1000) ** 2 / 1000 for n in counts.values())
    assert chi2 < 13.82, counts      # the 0.1% point of chi-square with 2 degrees of freedom


def test_a_trace_predicts_the_next_decision_and_changes_nothing():
    b = make()
    b.sync([WEB])
    before = (b.maps.services.lookups, len(b.ct), b.rng.getstate(), b.statistics()["decisions"])
    traced = b.decide(syn(CLIENT, "10.96.0.10"), NOW, effects=False)
    assert (b.maps.services.lookups, len(b.ct), b.rng.getstate(), b.statistics()["decisions"]) == before
    real = b.decide(syn(CLIENT, "10.96.0.10"), NOW)
    assert (traced.dnat, traced.path, traced.cost) == (real.dnat, real.path, real.cost)


def test_conntrack_keeps_a_tuple_on_its_backend_and_records_ciliums_entries():
    b = make()
    b.sync([WEB])
    first = b.decide(syn(CLIENT, "10.96.0.10"), NOW)
    again = b.decide(syn(CLIENT, "10.96.0.10"), NOW + 1)
    assert again.dnat == first.dnat and again.path[1].startswith("ct4_global[TCP OUT 10.244.0.9:40000 -> "
                                                                 "10.96.0.10:80 service]")
    svc_entry = b.ct.lookup(CtTuple.of_flow(ip(CLIENT), 40000, ip("10.96.0.10"), 80, 6, TUPLE_F_SERVICE), NOW)
    # a SYN refreshes it with CT_SYN_TIMEOUT
    assert svc_entry.rev_nat_index == 1 and svc_entry.lifetime == int(NOW + 1) + 60 and svc_entry.tx_packets == 2
    out = b.ct.lookup(CtTuple.of_flow(ip(CLIENT), 40000, first.dnat[0], 8080, 6, 0), NOW)
    assert out.rev_nat_index == 1                 # a reply is reverse-NATed through lb4_reverse_nat[1]
    assert lb.Lb4ReverseNat.unpack(b.maps.reverse_nat.peek(lb.pack_revnat_key(1))) == (ip("10.96.0.10"), 80)


def test_session_affinity_sticks_then_expires():
    b = make()
    b.sync([svc("sticky", "10.96.0.20", *WEB.endpoints, affinity_timeout_s=60)])
    picks = {b.decide(syn(CLIENT, "10.96.0.20", sport=20000 + i), NOW).dnat for i in range(30)}
    assert len(picks) == 1
    d = b.decide(syn(CLIENT, "10.96.0.20", sport=30000), NOW + 59)
    assert d.dnat in picks and any(p.startswith("lb4_affinity[") for p in d.path)
    # refreshed at NOW + 59: still valid at NOW + 118, gone at NOW + 59 + 60
    assert any(p.startswith("lb4_affinity[") for p in b.decide(syn(CLIENT, "10.96.0.20", sport=30001), NOW + 118).path)
    late = b.decide(syn(CLIENT, "10.96.0.20", sport=30002), NOW + 118 + 60)
    assert "lb4_affinity: expired" in late.path
    key = lb.Lb4AffinityKey(ip(CLIENT), 1).pack()
    assert lb.LbAffinityVal.unpack(b.maps.affinity.peek(key)).last_used == int(NOW + 178)


def test_affinity_to_a_removed_backend_is_dropped():
    b = make()
    sticky = svc("sticky", "10.96.0.20", *WEB.endpoints, affinity_timeout_s=600)
    b.sync([sticky])
    chosen = b.decide(syn(CLIENT, "10.96.0.20"), NOW).dnat[0]
    b.sync([svc("sticky", "10.96.0.20", *[e for e in WEB.endpoints if ip(e.ip) != chosen], affinity_timeout_s=600)])
    d = b.decide(syn(CLIENT, "10.96.0.20", sport=41000), NOW + 1)
    assert d.dnat[0] != chosen and "lb_affinity_match: stale" in d.path


@pytest.mark.parametrize("response, verdict, reject_with", [("reject", Verdict.REJECT, "icmp-port-unreachable"),
                                                             ("drop", Verdict.DROP, None)])
def test_a_service_without_backends(response, verdict, reject_with):
    b = make(no_backend_response=response)
    b.sync([svc("empty", "10.96.0.99")])
    d = b.decide(syn(CLIENT, "10.96.0.99"), NOW)
    assert (d.verdict, d.reject_with, d.path[-1]) == (verdict, reject_with, "DROP_NO_SERVICE")
    assert b.statistics()["drops"] == {"DROP_NO_SERVICE": 1}


NP = svc("np", "10.96.0.30", E("10.244.0.5", is_local=True), E("10.244.1.6"), node_port=30080)


def test_outside_clients_cannot_reach_a_cluster_ip():
    b = make()
    b.sync([NP])
    d = b.decide(syn(OUTSIDE, "10.96.0.30"), NOW)
    assert d.verdict is Verdict.DROP and d.path[-1] == "DROP_IS_CLUSTER_IP"


def test_nodeport_snat_only_towards_remote_backends():
    b = make()
    b.sync([NP])
    seen = {}
    for i in range(200):
        d = b.decide(syn(OUTSIDE, NODE_IP, 30080, sport=10000 + i), NOW)
        assert d.path[0] == "lb4_services_v2[192.168.1.10:30080/TCP slot 0]"
        seen[d.dnat[0]] = d.masquerade
    assert seen == {ip("10.244.0.5"): False, ip("10.244.1.6"): True}
    # the node's other address has no entry of its own: the 0.0.0.0 surrogate answers
    d = b.decide(syn(OUTSIDE, GATEWAY, 30080), NOW)
    assert d.path[:2] == ("lb4_services_v2[0.0.0.0:30080/TCP slot 0]",) + d.path[1:2] and d.is_service


def test_external_traffic_policy_local_has_two_scopes():
    b = make()
    b.sync([svc("npl", "10.96.0.31", E("10.244.0.5", is_local=True), E("10.244.1.6"), node_port=30081,
                external_policy_local=True)])
    outside = {b.decide(syn(OUTSIDE, NODE_IP, 30081, sport=10000 + i), NOW).dnat for i in range(50)}
    assert outside == {(ip("10.244.0.5"), 8080)}
    inside = b.decide(syn(CLIENT, NODE_IP, 30081), NOW)
    assert inside.path[0] == "lb4_services_v2[192.168.1.10:30081/TCP/i slot 0]"
    assert {b.decide(syn(CLIENT, NODE_IP, 30081, sport=10000 + i), NOW).dnat[0] for i in range(50)} == \
        {ip("10.244.0.5"), ip("10.244.1.6")}
    ext = lb.Lb4Service.unpack(b.maps.services.peek(lb.Lb4Key(ip(NODE_IP), 30081, 0, 6).pack()))
    assert lb.ServiceFlags(ext.flags) & (lb.ServiceFlags.EXT_LOCAL_SCOPE | lb.ServiceFlags.TWO_SCOPES) == \
        lb.ServiceFlags.EXT_LOCAL_SCOPE | lb.ServiceFlags.TWO_SCOPES and ext.count == 1


def test_hairpin_is_masqueraded():
    b = make()
    b.sync([svc("solo", "10.96.0.40", E("10.244.0.5", is_local=True))])
    d = b.decide(syn("10.244.0.5", "10.96.0.40"), NOW)
    assert d.masquerade and d.dnat == (ip("10.244.0.5"), 8080)


LB_SVC = svc("lb", "10.96.0.50", E("10.244.0.5", is_local=True), node_port=30082, load_balancer_ips=("172.18.0.100",),
             source_ranges=("10.0.0.0/8",))


def test_load_balancer_source_ranges_in_tc_and_xdp():
    b = make()
    b.sync([LB_SVC])
    denied = b.decide(syn(OUTSIDE, "172.18.0.100"), NOW)
    assert denied.verdict is Verdict.DROP and denied.path[-1] == "DENIED_BY_LB_SRC_RANGE_CHECK"
    assert b.decide(syn("10.1.2.3", "172.18.0.100"), NOW).is_service
    assert b.xdp(F.tcp(OUTSIDE, "172.18.0.100", dport=80, flags=0x02)) is XdpAction.DROP
    assert b.xdp(F.tcp("10.1.2.3", "172.18.0.100", dport=80, flags=0x02)) == "XDP_PASS"
    assert b.xdp(F.arp_request(OUTSIDE, NODE_IP)) is XdpAction.PASS
    assert b.statistics()["xdp"] == {"XDP_DROP": 1, "XDP_PASS": 2}


def test_xdp_prefilter_drops_denied_sources_first():
    b = make(prefilter_cidrs=["203.0.113.0/24"])
    b.sync([WEB])
    assert b.xdp(F.udp("203.0.113.7", NODE_IP, dport=9)) is XdpAction.DROP
    assert b.xdp(F.udp("198.51.100.7", NODE_IP, dport=9)) is XdpAction.PASS
    b.prefilter_delete(["203.0.113.0/24"])
    assert b.xdp(F.udp("203.0.113.7", NODE_IP, dport=9)) is XdpAction.PASS


def _services(n: int) -> list[ProxyServicePort]:
    return [svc(f"s{i}", str(ipaddress.IPv4Address(ip("10.96.1.0") + i)),
                *(E(str(ipaddress.IPv4Address(ip("10.244.100.0") + 3 * i + j))) for j in range(3)))
            for i in range(n)]


def test_a_full_map_refuses_a_new_service_with_a_clear_error_and_the_others_go_on():
    b = make(map_sizes=LbMapSizes(services=10))
    first, second, third = _services(3)
    report = b.sync([first, second, third])        # 4 entries each: the third's second slot does not fit
    assert report.detail["failed"] == [
        "lb4_services_v2: map is full (max_entries 10): cannot add 10.96.1.2:80/TCP (default/s2:http) slot 2 (E2BIG)"]
    assert b.errors == report.detail["failed"] and b.statistics()["map_full_errors"] == 1
    # nothing of the third Service stayed behind: no entry, no backend, no id
    assert (len(b.maps.services), len(b.maps.backends), len(b.maps.reverse_nat)) == (8, 6, 2)
    assert b.decide(syn(CLIENT, "10.96.1.0"), NOW).is_service
    assert b.decide(syn(CLIENT, "10.96.1.1"), NOW).is_service
    assert not b.decide(syn(CLIENT, "10.96.1.2"), NOW).is_service
    # once there is room, the next (partial) sync installs it
    report = b.sync([second, third], full=False)
    assert report.detail["failed"] == [] and b.errors == []
    assert b.decide(syn(CLIENT, "10.96.1.2"), NOW).is_service and len(b.maps.services) == 8


def test_a_frontend_belongs_to_the_first_service_that_claims_it():
    b = make()
    a = svc("a", "10.96.0.91", E("10.244.5.1"), external_ips=("203.0.113.9",))
    other = svc("b", "10.96.0.92", E("10.244.5.2"), external_ips=("203.0.113.9",))
    b.sync([a, other])
    assert b.decide(syn(OUTSIDE, "203.0.113.9"), NOW).dnat == (ip("10.244.5.1"), 8080)
    b.sync([other], full=False)          # the owner goes: its frontend goes with it
    assert not b.decide(syn(OUTSIDE, "203.0.113.9", sport=1), NOW).is_service
    b.sync([other], full=True)           # the next full sync hands it to the other Service
    assert b.decide(syn(OUTSIDE, "203.0.113.9", sport=2), NOW).dnat == (ip("10.244.5.2"), 8080)


def test_a_failed_update_keeps_the_installed_version():
    b = make(map_sizes=LbMapSizes(services=5))
    one = _services(1)[0]
    b.sync([one])
    bigger = svc("s0", one.cluster_ip, *one.endpoints, E("10.244.200.1"), E("10.244.200.2"))
    report = b.sync([bigger], full=False)
    assert len(report.detail["failed"]) == 1
    assert lb.Lb4Service.unpack(b.maps.services.peek(lb.Lb4Key(ip(one.cluster_ip), 80, 0, 6).pack())).count == 3
    assert len(b.maps.backends) == 3 and b.decide(syn(CLIENT, one.cluster_ip), NOW).is_service


# remove the last: master count, last slot deleted, backend deleted; add: master, new slot, new
# backend; the first turns unready: master, slot 1 refilled from the last, last slot deleted, backend
@pytest.mark.parametrize("change, written", [("remove", 3), ("add", 3), ("unready", 4)])
def test_one_endpoint_change_writes_the_same_few_entries_for_10_or_1000_services(change, written):
    results = []
    for n in (10, 1000):
        b = make()
        services = _services(n)
        b.sync(services)
        target = services[n // 2]
        eps = list(target.endpoints)
        if change == "remove":
            eps = eps[:2]
        elif change == "add":
            eps.append(E("10.244.250.1"))
        else:
            eps[0] = E(eps[0].ip, ready=False)
        services[n // 2] = svc(target.name, target.cluster_ip, *eps)
        report = b.sync(services, full=False)
        results.append((report.objects_written, report.detail["services_examined"]))
        assert b.sync(services, full=True).objects_written == 0     # a full resync finds nothing to write
    assert results == [(written, 1), (written, 1)]


def test_a_partial_sync_of_a_rebuilt_but_equal_view_touches_nothing():
    b = make()
    services = _services(50)
    b.sync(services)
    entries = dict(b.maps.services.items())
    rebuilt = [dataclasses.replace(s) for s in services]     # what a new view of the same cluster is
    for view in (services, rebuilt):
        report = b.sync(view, full=False)
        assert (report.services, report.objects_written, report.detail["services_examined"]) == (50, 0, 0)
    assert dict(b.maps.services.items()) == entries


@pytest.mark.parametrize("view", ["renamed", "duplicate"])
def test_a_service_missing_from_a_view_of_the_same_size_is_removed(view):
    b = make()
    a, gone, other = _services(3)
    b.sync([a, gone])
    if view == "renamed":      # as many Services as before, one of them new
        services = [a, other]
    else:                      # as many entries as before, one Service twice (the last one counts)
        services = [a, svc(a.name, a.cluster_ip, *a.endpoints[:1])]
    report = b.sync(services, full=False)
    assert not b.decide(syn(CLIENT, gone.cluster_ip), NOW).is_service
    assert b.decide(syn(CLIENT, a.cluster_ip), NOW).is_service
    if view == "renamed":
        assert report.services == 2 and b.decide(syn(CLIENT, other.cluster_ip), NOW).is_service
    else:
        assert report.services == 1 and len(b.maps.backends) == 1


def test_slots_stay_put_when_a_backend_leaves():
    b = make()
    five = svc("five", "10.96.0.60", *(E(f"10.244.3.{i}") for i in range(1, 6)))
    b.sync([five])

    def slots():
        out = []
        for s in range(1, 6):
            raw = b.maps.services.peek(lb.Lb4Key(ip("10.96.0.60"), 80, s, 6).pack())
            out.append(lb.Lb4Service.unpack(raw).backend_id if raw else None)
        return out
    before = slots()
    report = b.sync([svc("five", "10.96.0.60", *[e for e in five.endpoints if e.ip != "10.244.3.2"])])
    after = slots()
    assert after == [before[0], before[4], before[2], before[3], None]
    assert report.objects_written == 4   # master count, slot 2 rewritten, slot 5 deleted, the backend deleted


def test_terminating_backends_keep_open_flows_but_get_no_new_ones():
    b = make()
    b.sync([WEB])
    first = b.decide(syn(CLIENT, "10.96.0.10"), NOW)
    going = [e for e in WEB.endpoints if ip(e.ip) == first.dnat[0]][0]
    rest = [e for e in WEB.endpoints if e is not going]
    b.sync([svc("web", "10.96.0.10", *rest, E(going.ip, ready=False, serving=True, terminating=True))])
    backend_ids = [lb.unpack_backend_key(k) for k, v in b.maps.backends.items()
                   if lb.Lb4Backend.unpack(v).address == first.dnat[0]]
    assert lb.Lb4Backend.unpack(b.maps.backends.peek(lb.pack_backend_key(backend_ids[0]))).flags == \
        lb.BackendState.TERMINATING
    # its CT entry still leads an open flow there (drain), but a SYN reopening the tuple goes to an
    # active backend (lb4_local: backend->flags != BE_STATE_ACTIVE && state->syn), and the entry follows
    established = dataclasses.replace(syn(CLIENT, "10.96.0.10"), tcp_flags=0x10)
    assert b.decide(established, NOW + 1).dnat == first.dnat
    reopened = b.decide(syn(CLIENT, "10.96.0.10"), NOW + 1)
    assert reopened.dnat[0] in {ip(e.ip) for e in rest} and "terminating, SYN: select again" in reopened.path[1]
    assert b.decide(established, NOW + 2).dnat == reopened.dnat
    # UDP has no SYN: a datagram on a tuple whose backend is terminating stays with it
    dns = svc("dns", "10.96.0.53", *WEB.endpoints, port=53, protocol="UDP")
    b.sync([svc("web", "10.96.0.10", *rest, E(going.ip, ready=False, serving=True, terminating=True)), dns])
    udp = syn(CLIENT, "10.96.0.53", dport=53, proto=17)
    before = b.decide(udp, NOW + 3).dnat
    going_udp = [e for e in WEB.endpoints if ip(e.ip) == before[0]][0]
    b.sync([svc("web", "10.96.0.10", *rest, E(going.ip, ready=False, serving=True, terminating=True)),
            svc("dns", "10.96.0.53", *[e for e in WEB.endpoints if e is not going_udp],
                E(going_udp.ip, ready=False, serving=True, terminating=True), port=53, protocol="UDP")])
    assert b.decide(udp, NOW + 4).dnat == before
    assert all(b.decide(syn(CLIENT, "10.96.0.10", sport=50000 + i), NOW).dnat[0] != first.dnat[0] for i in range(50))
    # only terminating-but-serving endpoints left: they take the slots (the fallback)
    b.sync([svc("web", "10.96.0.10", E(going.ip, ready=False, serving=True, terminating=True))])
    assert b.decide(syn(CLIENT, "10.96.0.10", sport=60000), NOW).dnat[0] == first.dnat[0]


def test_flow_closed_and_gc():
    b = make()
    b.sync([WEB])
    assert b.next_deadline() is None
    d = b.decide(syn(CLIENT, "10.96.0.10"), NOW)
    assert b.next_deadline() == NOW + 300 and len(b.ct) == 2
    b.flow_closed(d, NOW + 5)
    entries = [e for _, e in b.ct.entries()]
    assert all(e.flags & RX_CLOSING and e.flags & TX_CLOSING and e.lifetime == int(NOW) + 15 for e in entries)
    assert b.statistics()["open_flows"] == 0
    b.handle_timer(NOW + 100)          # not due yet
    assert len(b.ct) == 2
    b.handle_timer(NOW + 300)
    assert len(b.ct) == 0 and b.next_deadline() is None and b.statistics()["ct_gc_deleted"] == 2


def test_gc_forgets_flows_podnet_never_confirmed():
    b = make()
    b.sync([WEB])
    b.decide(syn(CLIENT, "10.96.0.10"), NOW)
    b.handle_timer(NOW + 300)          # the SYN's 60 s ran out
    assert len(b.ct) == 0 and b.statistics()["open_flows"] == 0


def test_maglev_backend_is_consistent_and_moves_one_nth():
    b = make(algorithm="maglev")
    ten = svc("ten", "10.96.0.70", *(E(f"10.244.4.{i}") for i in range(1, 11)))
    b.sync([ten])
    probes = [syn(f"10.244.{i % 250}.{i // 250 + 1}", "10.96.0.70", sport=1024 + i) for i in range(20000)]
    before = [b.decide(p, NOW, effects=False).dnat for p in probes]
    assert any(p.startswith("lb4_maglev[1][") for p in b.decide(probes[0], NOW, effects=False).path)
    assert before == [b.decide(p, NOW, effects=False).dnat for p in probes]       # same tuple, same backend
    report = b.sync([svc("ten", "10.96.0.70", *ten.endpoints[1:])])
    # master, slot 1 refilled, slot 10 deleted, backend deleted, one Maglev inner-map swap
    assert len(b.maps.maglev) == 1 and report.objects_written == 5
    after = [b.decide(p, NOW, effects=False).dnat for p in probes]
    moved = sum(x != y for x, y in zip(before, after)) / len(probes)
    assert 0.08 < moved < 0.12


def test_socket_lb_translates_at_connect_without_a_service_ct_entry():
    b = make(socket_lb=True)
    b.sync([WEB, svc("dns", "10.96.0.53", E("10.244.0.8", 53), E("10.244.1.8", 53), port=53, protocol="UDP"),
            svc("ext", "10.96.0.80", E("10.244.0.5"), external_ips=("203.0.113.50",)), svc("empty", "10.96.0.99")])
    d = b.decide(syn(CLIENT, "10.96.0.10"), NOW)
    assert d.path[0] == "cgroup/connect4: pre-xlate-fwd 10.96.0.10:80" and d.path[-2].startswith("post-xlate-fwd")
    assert len(b.ct) == 0 and len(b.maps.reverse_sk) == 1
    b.flow_closed(d, NOW + 1)                      # sock_release
    assert len(b.maps.reverse_sk) == 0
    # a connected UDP socket keeps its backend (the socket cookie picks the slot)
    udp = {b.decide(syn(CLIENT, "10.96.0.53", 53, sport=5353, proto=17), NOW).dnat for _ in range(10)}
    assert len(udp) == 1
    # an externalIP that is not this node's is left alone (CVE-2020-8554), a Service without backends refused
    assert not b.decide(syn(CLIENT, "203.0.113.50"), NOW).is_service
    refused = b.decide(syn(CLIENT, "10.96.0.99"), NOW)
    assert (refused.verdict, refused.reject_with) == (Verdict.REJECT, "icmp-host-unreachable")
    # outside clients still take the tc path
    assert b.decide(syn(OUTSIDE, "10.96.0.10"), NOW).path[-1] == "DROP_IS_CLUSTER_IP"


def test_bad_configuration_names_the_option():
    with pytest.raises(ConfigError, match="algorithm"):
        make(algorithm="rr")
    with pytest.raises(ConfigError, match="maglev_table_size"):
        make(maglev_table_size=1000)
    with pytest.raises(ConfigError, match="no_backend_response"):
        make(no_backend_response="ignore")
    with pytest.raises(ConfigError, match="12 bytes"):
        make(maglev_hash_seed="AAAA")


def test_ct_entry_of_the_service_holds_the_backend_id():
    b = make()
    b.sync([WEB])
    d = b.decide(syn(CLIENT, "10.96.0.10"), NOW)
    key = CtTuple.of_flow(ip(CLIENT), 40000, ip("10.96.0.10"), 80, 6, TUPLE_F_SERVICE).pack()
    entry = CtEntry.unpack(b.ct.tcp.peek(key))
    assert d.path[-1] == f"lb4_backends_v3[{entry.backend_id}]"


def test_deciding_the_same_tuple_again_does_not_pile_up_state():
    b = make()
    b.sync([WEB])
    for i in range(100):
        b.decide(syn(CLIENT, "10.96.0.10"), NOW + i)
    assert b.statistics()["open_flows"] == 1 and len(b.ct) == 2
    s = make(socket_lb=True)
    s.sync([svc("dns", "10.96.0.53", E("10.244.0.8", 53), port=53, protocol="UDP")])
    for i in range(100):
        s.decide(syn(CLIENT, "10.96.0.53", 53, sport=5353, proto=17), NOW + i)
    assert s.statistics()["open_flows"] == 1 and len(s.maps.reverse_sk) == 1
