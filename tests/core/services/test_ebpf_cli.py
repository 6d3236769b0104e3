"""The eBPF backend printed as Cilium prints it: `cilium service list`, `cilium bpf lb list`
(default, --revnat, --backends) and `cilium bpf ct list global`, with Go tabwriter's padding."""

from __future__ import annotations

import ipaddress

import pytest

from podnet.core.services.ebpf import EbpfBackend
from podnet.core.services.ebpf.cli import bpf_ct_list, bpf_lb_list, service_list, tabwriter
from podnet.core.services.kubeproxy import ProxyEndpoint, ProxyServicePort
from podnet.core.services.packetinfo import PacketInfo


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


@pytest.fixture(scope="module")
def node() -> EbpfBackend:
    b = EbpfBackend(node_ips=["192.168.1.10"], local_addresses=[ip("192.168.1.10")])
    b.sync([
        ProxyServicePort("kube-system", "kube-dns", "dns", "UDP", "10.96.0.10", 53, endpoints=(
            ProxyEndpoint("10.244.0.104", 53),
            ProxyEndpoint("10.244.0.77", 53, ready=False, serving=True, terminating=True))),
        ProxyServicePort("default", "web", "http", "TCP", "10.96.0.20", 80, node_port=31940, affinity_timeout_s=10800,
                         endpoints=(ProxyEndpoint("10.244.0.5", 8080),)),
    ])
    b.decide(PacketInfo(ip("10.244.0.9"), ip("10.96.0.10"), 17, 33000, 53), 120.0)
    b.decide(PacketInfo(ip("10.244.0.9"), ip("10.96.0.20"), 6, 41000, 80, tcp_flags=0x02), 120.0)
    return b


def test_tabwriter_pads_every_tab_terminated_cell_like_go():
    # NewWriter(minwidth 5, tabwidth 0, padding 3, ' ', 0): width = max(5, widest + 3), last column too
    assert tabwriter([["ID", "Frontend"], ["4", "10.104.239.135:80/TCP"]]) == \
        "ID   Frontend" + " " * 16 + "\n4    10.104.239.135:80/TCP   \n"
    assert tabwriter([["", ""]]) == " " * 10 + "\n"


def test_service_list(node):
    assert service_list(node) == (
        "ID   Frontend                 Service Type   Backend                                 \n"
        "1    10.96.0.10:53/UDP        ClusterIP      1 => 10.244.0.104:53/UDP (active)       \n"
        "                                             2 => 10.244.0.77:53/UDP (terminating)   \n"
        "2    10.96.0.20:80/TCP        ClusterIP      1 => 10.244.0.5:8080/TCP (active)       \n"
        "3    0.0.0.0:31940/TCP        NodePort       1 => 10.244.0.5:8080/TCP (active)       \n"
        "4    192.168.1.10:31940/TCP   NodePort       1 => 10.244.0.5:8080/TCP (active)       \n")


def test_bpf_lb_list(node):
    # the terminating backend has no slot: it is in lb4_backends_v3 only
    assert bpf_lb_list(node) == node.dump() == (
        "SERVICE ADDRESS          BACKEND ADDRESS (REVNAT_ID) (SLOT)                              \n"
        "0.0.0.0:31940/TCP        0.0.0.0:0 (3) (0) [NodePort, sessionAffinity, non-routable]     \n"
        "                         10.244.0.5:8080/TCP (3) (1)                                     \n"
        "10.96.0.10:53/UDP        0.0.0.0:0 (1) (0) [ClusterIP, non-routable]                     \n"
        "                         10.244.0.104:53/UDP (1) (1)                                     \n"
        "10.96.0.20:80/TCP        0.0.0.0:0 (2) (0) [ClusterIP, sessionAffinity, non-routable]    \n"
        "                         10.244.0.5:8080/TCP (2) (1)                                     \n"
        "192.168.1.10:31940/TCP   0.0.0.0:0 (4) (0) [NodePort, sessionAffinity]                   \n"
        "                         10.244.0.5:8080/TCP (4) (1)                                     \n")


def test_bpf_lb_list_revnat_and_backends(node):
    assert bpf_lb_list(node, revnat=True) == (
        "ID   BACKEND ADDRESS (REVNAT_ID) (SLOT)   \n"
        "1    10.96.0.10:53                        \n"
        "2    10.96.0.20:80                        \n"
        "3    0.0.0.0:31940                        \n"
        "4    192.168.1.10:31940                   \n")
    assert bpf_lb_list(node, backends=True) == (
        "ID   BACKEND ADDRESS (REVNAT_ID) (SLOT)   \n"
        "1    UDP://10.244.0.104                   \n"
        "2    UDP://10.244.0.77                    \n"
        "3    TCP://10.244.0.5                     \n")


def test_bpf_ct_list_global(node):
    tail = "RxFlagsSeen=0x00 LastRxReport=0 TxPackets=1 TxBytes=0 TxFlagsSeen={} LastTxReport=120 " \
           "Flags=0x0000 [ ] RevNAT={} SourceSecurityID=0 IfIndex=0 \n"
    assert bpf_ct_list(node.ct) == (
        # cilium_ct4_global: the CT_SERVICE entry (RxBytes is its backend_id) and the flow's own entry
        "TCP OUT 10.244.0.9:41000 -> 10.96.0.20:80 service expires=180 RxPackets=0 RxBytes=3 "
        + tail.format("0x02", 2)
        + "TCP OUT 10.244.0.9:41000 -> 10.244.0.5:8080 expires=180 RxPackets=0 RxBytes=0 " + tail.format("0x02", 2)
        + "\n"
        # cilium_ct_any4_global
        + "UDP OUT 10.244.0.9:33000 -> 10.96.0.10:53 service expires=180 RxPackets=0 RxBytes=1 "
        + tail.format("0x00", 1)
        + "UDP OUT 10.244.0.9:33000 -> 10.244.0.104:53 expires=180 RxPackets=0 RxBytes=0 " + tail.format("0x00", 1)
        + "\n")
