"""IPVS's connection table and kube-proxy's residual rules, piece by piece."""

from __future__ import annotations

import gc
import ipaddress
import weakref

from podnet.core.services.base import Verdict
from podnet.core.services.iptables import Ruleset
from podnet.core.services.ipvs import IpvsBackend
from podnet.core.services.ipvs.residual import IpSets, ResidualRules, Walk
from podnet.core.services.ipvs.schedulers import make_scheduler
from podnet.core.services.ipvs.table import (
    IPPROTO_TCP, IPPROTO_UDP, ConnectionTable, IpvsState, IpvsTimeouts, VirtualService,
)
from podnet.core.services.kubeproxy import ProxyEndpoint, ProxyServicePort
from podnet.core.services.packetinfo import PacketInfo


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


VIP = ip("10.96.0.10")


def one_dest(protocol: int = IPPROTO_TCP):
    vs = VirtualService(protocol, VIP, 80, make_scheduler("rr"))
    return vs, vs.add_dest(ip("10.244.1.5"), 8080, 1)


class Held:
    """Something a weak reference can point at, like a Decision on a conntrack entry."""


def test_a_connection_is_bound_inactive_and_established_makes_it_active():
    vs, dest = one_dest()
    table = ConnectionTable()
    conn = table.new(IPPROTO_TCP, ip("10.0.0.1"), 1000, VIP, 80, dest, 0.0, state=IpvsState.SYN_RECV)
    assert (dest.activeconns, dest.inactconns, conn.deadline) == (0, 1, 60.0)
    table.set_state(conn, IpvsState.ESTABLISHED, 1.0)
    assert (dest.activeconns, dest.inactconns, conn.deadline) == (1, 0, 901.0)
    table.set_state(conn, IpvsState.TIME_WAIT, 2.0)
    assert (dest.activeconns, dest.inactconns, conn.deadline) == (0, 1, 122.0)
    table.expire(conn)
    assert (dest.activeconns, dest.inactconns, len(table)) == (0, 0, 0)


def test_ipvsadm_set_changes_the_three_timeouts():
    timeouts = IpvsTimeouts(tcp=3600, tcpfin=30, udp=60)
    assert timeouts.of(IPPROTO_TCP, IpvsState.ESTABLISHED) == 3600
    assert timeouts.of(IPPROTO_TCP, IpvsState.FIN_WAIT) == 30
    assert timeouts.of(IPPROTO_UDP, IpvsState.UDP) == 60
    assert timeouts.of(IPPROTO_TCP, IpvsState.CLOSE) == 10


def test_the_upper_threshold_overloads_a_destination_until_three_quarters():
    vs, dest = one_dest()
    dest.u_threshold = 4
    table = ConnectionTable()
    conns = [table.new(IPPROTO_TCP, ip("10.0.0.1"), p, VIP, 80, dest, 0.0, state=IpvsState.ESTABLISHED)
             for p in range(4)]
    assert dest.overloaded
    assert vs.scheduler.schedule(vs, PacketInfo(1, VIP, 6, 1, 80))[0] is None
    table.expire(conns[0])
    assert dest.overloaded                     # 3 * 4 < 4 * 3 is false
    table.expire(conns[1])
    assert not dest.overloaded                 # 2 * 4 < 12


def test_a_deleted_destination_lives_on_in_the_trash_and_comes_back_with_its_counters():
    vs, dest = one_dest()
    table = ConnectionTable()
    conn = table.new(IPPROTO_TCP, ip("10.0.0.1"), 1, VIP, 80, dest, 0.0, state=IpvsState.ESTABLISHED)
    vs.del_dest(dest)
    assert not dest.available and vs.trash == {dest.key: dest} and vs.dests == []
    again = vs.add_dest(dest.addr, dest.port, 1)
    assert again is dest and again.activeconns == 1 and vs.trash == {}
    vs.del_dest(dest)
    table.expire(conn)
    assert vs.trash == {}                       # the last reference left: gone for good


def test_timers_re_arm_while_the_decision_is_held_and_expire_once_it_is_not():
    vs, dest = one_dest(IPPROTO_UDP)
    table = ConnectionTable()
    conn = table.new(IPPROTO_UDP, ip("10.0.0.1"), 53, VIP, 80, dest, 0.0, state=IpvsState.UDP)
    held = Held()
    conn.decision = weakref.ref(held)
    assert table.next_deadline() == 300.0
    assert table.handle_timer(300.0) == 0 and conn.deadline == 600.0
    del held
    gc.collect()
    assert table.handle_timer(600.0) == 1 and len(table) == 0 and dest.inactconns == 0
    assert table.next_deadline() is None


def test_an_invalidated_template_is_unhashed_but_stays_until_it_expires():
    vs, dest = one_dest()
    table = ConnectionTable()
    key = (IPPROTO_TCP, ip("10.0.0.1"), VIP, 80)
    ct = table.new(IPPROTO_TCP, ip("10.0.0.1"), 0, VIP, 80, dest, 0.0, template=True, timeout=100)
    table.add_template(key, ct)
    vs.update_dest(dest, 0)
    assert not table.template_valid(ct)          # expire_quiescent_template=1
    table.invalidate_template(ct)
    assert key not in table.templates and (ct.vport, ct.dport, ct.cport) == (0xFFFF, 0xFFFF, 0)
    assert ct.id in table.conns and dest.persistconns == 1
    table.handle_timer(100.0)
    assert ct.id not in table.conns and dest.persistconns == 0


# -- the residual rules --------------------------------------------------------------------------

def test_kube_ipvs_filter_lets_health_checks_through_and_rejects_pings_to_cluster_ips():
    b = IpvsBackend(node_ips=["192.168.0.10"], local_addresses=[ip("192.168.0.10")])
    b.sync([ProxyServicePort("default", "lb", "", "TCP", "10.96.0.10", 80,
                             endpoints=(ProxyEndpoint("10.244.1.5", 80, is_local=True),), node_port=30080,
                             load_balancer_ips=("198.51.100.7",), external_policy_local=True,
                             health_check_node_port=32000)])
    ping = b.decide(PacketInfo(ip("10.244.9.9"), VIP, 1), 1.0)
    assert ping.verdict is Verdict.REJECT
    health = b.decide(PacketInfo(ip("172.16.0.1"), ip("192.168.0.10"), 6, 1, 32000), 1.0)
    assert health.verdict is Verdict.ACCEPT and health.dnat is None
    assert "filter/KUBE-NODE-PORT:1" in health.path


def test_external_ips_masquerade_unless_their_policy_is_local():
    services = [ProxyServicePort("default", n, "", "TCP", f"10.96.0.{i + 10}", 80, external_ips=(f"203.0.113.{i + 1}",),
                                 endpoints=(ProxyEndpoint("10.244.1.5", 80),), external_policy_local=local)
                for i, (n, local) in enumerate((("cluster", False), ("local", True)))]
    b = IpvsBackend()
    b.sync(services)
    cluster = b.decide(PacketInfo(ip("172.16.0.1"), ip("203.0.113.1"), 6, 1, 80), 1.0)
    local = b.decide(PacketInfo(ip("172.16.0.1"), ip("203.0.113.2"), 6, 1, 80), 1.0)
    assert cluster.masquerade and not local.masquerade
    assert cluster.dnat == local.dnat == (ip("10.244.1.5"), 80)


def test_the_restore_payload_is_kube_proxys_and_parses_but_for_the_missing_matches():
    b = IpvsBackend(node_ips=["192.168.0.10"])
    b.sync([ProxyServicePort("default", "web", "", "TCP", "10.96.0.10", 80,
                             endpoints=(ProxyEndpoint("10.244.1.5", 80, is_local=True),), node_port=30080,
                             external_ips=("203.0.113.1",), load_balancer_ips=("198.51.100.7",),
                             source_ranges=("203.0.113.0/24",))])
    payload = b.iptables_restore_payload()
    lines = payload.splitlines()
    assert lines[:7] == ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-NODE-PORT - [0:0]",
                         ":KUBE-LOAD-BALANCER - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
                         "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN"]
    assert ('-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" '
            "-m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ") in lines
    assert ("-A KUBE-IPVS-OUT-FILTER -s 198.51.100.7 -m ipvs --vaddr 198.51.100.7 --vproto tcp --vport 80 -j DROP"
            in lines)
    assert lines[-1] == "COMMIT" and lines.count("COMMIT") == 2
    # podnet's chain engine lacks -m set, -m ipvs and -m physdev: everything else must load
    kept = [line for line in lines if not any(m in line for m in ("-m set", "-m ipvs", "-m physdev"))]
    Ruleset().restore("\n".join(kept) + "\n", noflush=True)


def test_rules_for_empty_sets_are_left_out_and_come_back():
    sets = IpSets()
    rules = ResidualRules(sets, cluster_cidr="10.244.0.0/16")
    assert not any("KUBE-CLUSTER-IP dst,dst !" in r.words for r in rules.chains[("nat", "KUBE-SERVICES")])
    sets["KUBE-CLUSTER-IP"].add((VIP, 6, 80))
    assert rules.rebuild() and not rules.rebuild()
    w = Walk(ip("172.16.0.1"), VIP, 6, 1, 80, src_local=False, dst_local=True)
    rules.walk("nat", "PREROUTING", w)
    # marked for masquerade, then the jump to KUBE-NODE-PORT (a local destination), then ACCEPT
    assert w.mark == 0x4000 and w.path == ["nat/PREROUTING:1", "nat/KUBE-SERVICES:2", "nat/KUBE-MARK-MASQ:1",
                                           "nat/KUBE-SERVICES:3", "nat/KUBE-SERVICES:4"]


def test_source_cidr_sets_match_by_prefix():
    sets = IpSets()
    cidrs = sets["KUBE-LOAD-BALANCER-SOURCE-CIDR"]
    cidrs.add((ip("198.51.100.7"), 6, 80, ip("203.0.113.0"), 24))
    w = Walk(ip("203.0.113.77"), ip("198.51.100.7"), 6, 1, 80, src_local=False, dst_local=True)
    assert cidrs.match(w, "dst,dst,src")
    w.src = ip("203.0.114.1")
    assert not cidrs.match(w, "dst,dst,src")
    assert cidrs.entries_text() == ["198.51.100.7,tcp:80,203.0.113.0/24"]
