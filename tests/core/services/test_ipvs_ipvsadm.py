"""ipvsadm's listings, character for character: checked against a real `ipvsadm -ln` of a
kube-proxy node (kubernetes/kubernetes issue 75443) and against ipvsadm.c's own printf formats,
which Python's % operator applies with C's semantics."""

from __future__ import annotations

import ipaddress

from podnet.core.services.ipvs import IpvsBackend
from podnet.core.services.ipvs.ipvsadm import print_largenum, sorted_services
from podnet.core.services.ipvs.table import SVC_F_SCHED2, IpvsState, VirtualService
from podnet.core.services.ipvs.schedulers import make_scheduler
from podnet.core.services.kubeproxy import ProxyEndpoint, ProxyServicePort
from podnet.core.services.packetinfo import PacketInfo

HEADER = ("IP Virtual Server version 1.2.1 (size=4096)\n"
          "Prot LocalAddress:Port Scheduler Flags\n"
          "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def port(ns: str, name: str, port_name: str, cluster_ip: str, number: int, *eps: tuple[str, int], **kw):
    return ProxyServicePort(ns, name, port_name, kw.pop("protocol", "TCP"), cluster_ip, number,
                            endpoints=tuple(ProxyEndpoint(a, p) for a, p in eps), **kw)


def issue_75443_node() -> tuple[IpvsBackend, list]:
    """The node, and the Decisions of its open connections (held, as conntrack entries hold them)."""
    b = IpvsBackend(node_ips=["172.16.1.7"], local_addresses=[ip("172.16.1.7")])
    b.sync([
        port("default", "kubernetes", "https", "10.96.0.1", 443,
             ("172.16.1.3", 6443), ("172.16.1.5", 6443), ("172.16.1.7", 6443)),
        port("kube-system", "kube-dns", "dns-tcp", "10.96.0.10", 53, ("10.244.0.2", 53), ("10.244.2.2", 53)),
        port("kube-system", "kube-dns", "metrics", "10.96.0.10", 9153, ("10.244.0.2", 9153), ("10.244.2.2", 9153)),
        port("default", "secure", "", "10.96.175.60", 443, ("10.244.3.2", 443)),
        port("default", "web", "", "10.106.48.173", 80, ("10.244.0.4", 80), ("10.244.3.3", 80), node_port=31481),
    ])
    # the connections of the listing: one to the apiserver on 172.16.1.7, two to 10.244.3.2
    held = [b.decide(PacketInfo(ip("10.244.0.9"), ip("10.96.0.1"), 6, 40000, 443), 1.0),
            b.decide(PacketInfo(ip("10.244.0.9"), ip("10.96.175.60"), 6, 40001, 443), 1.0),
            b.decide(PacketInfo(ip("10.244.0.9"), ip("10.96.175.60"), 6, 40002, 443), 1.0)]
    return b, held


def test_ipvsadm_ln_as_a_real_kube_proxy_node_shows_it():
    b, _held = issue_75443_node()
    assert b.dump() == HEADER + (
        "TCP  172.16.1.7:31481 rr\n"
        "  -> 10.244.0.4:80                Masq    1      0          0         \n"
        "  -> 10.244.3.3:80                Masq    1      0          0         \n"
        "TCP  10.96.0.1:443 rr\n"
        "  -> 172.16.1.3:6443              Masq    1      0          0         \n"
        "  -> 172.16.1.5:6443              Masq    1      0          0         \n"
        "  -> 172.16.1.7:6443              Masq    1      1          0         \n"
        "TCP  10.96.0.10:53 rr\n"
        "  -> 10.244.0.2:53                Masq    1      0          0         \n"
        "  -> 10.244.2.2:53                Masq    1      0          0         \n"
        "TCP  10.96.0.10:9153 rr\n"
        "  -> 10.244.0.2:9153              Masq    1      0          0         \n"
        "  -> 10.244.2.2:9153              Masq    1      0          0         \n"
        "TCP  10.96.175.60:443 rr\n"
        "  -> 10.244.3.2:443               Masq    1      2          0         \n"
        "TCP  10.106.48.173:80 rr\n"
        "  -> 10.244.0.4:80                Masq    1      0          0         \n"
        "  -> 10.244.3.3:80                Masq    1      0          0         \n")


def test_service_flags_persistence_and_protocol_order():
    b = IpvsBackend(schedulers={"kube-system/kube-dns": "mh"})
    b.sync([
        port("kube-system", "kube-dns", "dns", "10.96.0.10", 53, ("10.244.1.5", 53), protocol="UDP"),
        port("default", "sticky", "", "10.96.0.20", 80, ("10.244.1.6", 80), affinity_timeout_s=10800),
        port("default", "sctp", "", "10.96.0.30", 9999, ("10.244.1.7", 9999), protocol="SCTP"),
    ])
    assert b.dump() == HEADER + (
        "TCP  10.96.0.20:80 rr persistent 10800\n"
        "  -> 10.244.1.6:80                Masq    1      0          0         \n"
        "UDP  10.96.0.10:53 mh (mh-port)\n"
        "  -> 10.244.1.5:53                Masq    1      0          0         \n"
        "SCTP 10.96.0.30:9999 rr\n"
        "  -> 10.244.1.7:9999              Masq    1      0          0         \n")
    assert b.ipvsadm(save=True) == (
        "-A -t 10.96.0.20:80 -s rr -p 10800\n"
        "-a -t 10.96.0.20:80 -r 10.244.1.6:80 -m -w 1\n"
        "-A -u 10.96.0.10:53 -s mh -b mh-port\n"
        "-a -u 10.96.0.10:53 -r 10.244.1.5:53 -m -w 1\n"
        "-A --sctp-service 10.96.0.30:9999 -s rr\n"
        "-a --sctp-service 10.96.0.30:9999 -r 10.244.1.7:9999 -m -w 1\n")


def test_lines_follow_ipvsadm_c_format_strings():
    b, _held = issue_75443_node()
    vs = b.services[(6, ip("10.96.0.1"), 443)]
    dest = vs.by_key[(ip("172.16.1.7"), 6443)]
    svc_name = ("%-4s %s" % ("TCP", "10.96.0.1:443"))[:33]
    assert f"{svc_name} rr\n" in b.dump()
    assert ("  -> %-28s %-7s %-6d %-10u %-10u\n" % ("172.16.1.7:6443", "Masq", 1, 1, 0)) in b.dump()
    stats = b.ipvsadm(5.0, stats=True)
    assert stats.splitlines()[1:3] == [
        "%-33s %8s %8s %8s %8s %8s" % ("Prot LocalAddress:Port", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"),
        "  -> RemoteAddress:Port"]
    assert ("%-33s" % svc_name + "%9u%9u%9u%9u%9u" % (1, 1, 0, 0, 0)) in stats.splitlines()
    assert ("  -> %-28s" % "172.16.1.7:6443" + "%9u%9u%9u%9u%9u" % (1, 1, 0, 0, 0)) in stats.splitlines()
    pc = b.ipvsadm(persistent_conn=True)
    assert ("  -> %-28s %-9u %-11u %-10u %-10u" % ("172.16.1.7:6443", 1, 0, 1, 0)) in pc.splitlines()
    th = b.ipvsadm(thresholds=True)
    assert ("%-33s %-10s %-10s %-10s %-10s" % ("Prot LocalAddress:Port", "Uthreshold", "Lthreshold",
                                               "ActiveConn", "InActConn")) in th.splitlines()
    assert dest.activeconns == 1


def test_large_numbers_get_suffixes():
    assert print_largenum(99_999_999) == " 99999999"
    assert print_largenum(123_456_789) == "  123456K"
    assert print_largenum(12_345_678_901) == "   12345M"
    assert print_largenum(123_456_789_012_345) == "     123T"
    assert print_largenum(123_456_789, exact=True) == " 123456789"


def test_rate_uses_the_kernels_estimator():
    b = IpvsBackend()
    b.sync([port("default", "web", "", "10.96.0.10", 80, ("10.244.1.5", 80))])
    for i in range(8):       # 8 connections of 100 bytes before the first estimator tick (t = 2)
        b.decide(PacketInfo(ip("10.244.0.9"), ip("10.96.0.10"), 6, 40000 + i, 80, length=100), 0.5 + i * 0.1)
    rate = b.ipvsadm(2.0, rate=True).splitlines()
    assert rate[1] == "%-33s %8s %8s %8s %8s %8s" % ("Prot LocalAddress:Port", "CPS", "InPPS", "OutPPS",
                                                     "InBPS", "OutBPS")
    # cps: (8 << 9) >> 2 = 1024, read (1024 + 0x1FF) >> 10 = 1; inbps: (800 << 4) >> 2 = 3200 -> 100
    assert rate[3] == "%-33s" % "TCP  10.96.0.10:80" + "%9u%9u%9u%9u%9u" % (1, 1, 0, 100, 0)
    assert rate[4] == "  -> %-28s %8u %8u %8u" % ("10.244.1.5:80", 1, 1, 0) + "%9u%9u" % (100, 0)
    # no more connections: the average decays by a quarter every 2 s: 768, 576, 432 -> 0
    assert b.ipvsadm(6.0, rate=True).splitlines()[3].split()[2] == "1"
    assert b.ipvsadm(8.0, rate=True).splitlines()[3].split()[2] == "0"


def test_connection_listing():
    b = IpvsBackend()
    b.sync([port("default", "web", "", "10.96.0.10", 80, ("10.244.2.7", 8080), affinity_timeout_s=10800),
            port("kube-system", "dns", "", "10.96.0.53", 53, ("10.244.3.3", 53), protocol="UDP")])
    held = [b.decide(PacketInfo(ip("10.244.1.9"), ip("10.96.0.10"), 6, 40000, 80), 100.0),
            b.decide(PacketInfo(ip("10.244.1.9"), ip("10.96.0.53"), 17, 5353, 53), 100.0)]
    assert held and b.ipvsadm(130.5, connections=True) == (
        "IPVS connection entries\n"
        "pro expire state       source             virtual            destination\n"
        "TCP 179:29 NONE        10.244.1.9:0       10.96.0.10:80      10.244.2.7:8080\n"
        "TCP 14:29  ESTABLISHED 10.244.1.9:40000   10.96.0.10:80      10.244.2.7:8080\n"
        "UDP 04:29  UDP         10.244.1.9:5353    10.96.0.53:53      10.244.3.3:53\n")
    row = "%-3s %-6s %-11s %-18s %-18s %s" % ("TCP", "14:29", "ESTABLISHED", "10.244.1.9:40000",
                                              "10.96.0.10:80", "10.244.2.7:8080")
    assert row in b.ipvsadm(130.5, connections=True).splitlines()
    assert b.ipvsadm(timeout=True) == "Timeout (tcp tcpfin udp): 900 120 300\n"


def test_addresses_far_apart_sort_as_the_wrapped_c_int_says():
    vs = [VirtualService(6, ip(a), 80, make_scheduler("rr")) for a in ("10.96.0.1", "172.16.1.7", "10.1.0.1")]
    assert [str(ipaddress.IPv4Address(v.addr)) for v in sorted_services(vs)] == \
        ["172.16.1.7", "10.1.0.1", "10.96.0.1"]


def test_a_tcp_connection_in_fin_wait_lists_as_such():
    b = IpvsBackend(track_tcp_states=True)
    b.sync([port("default", "web", "", "10.96.0.10", 80, ("10.244.2.7", 8080))])
    d = b.decide(PacketInfo(ip("10.244.1.9"), ip("10.96.0.10"), 6, 40000, 80), 0.0)
    assert " SYN_RECV " in b.ipvsadm(0.0, connections=True)
    b.flow_state(d, 1.0, IpvsState.FIN_WAIT)
    assert "TCP 02:00  FIN_WAIT    10.244.1.9:40000" in b.ipvsadm(1.0, connections=True)
    assert SVC_F_SCHED2 == 0x10
