"""A cluster of three nodes seen from outside: NodePort and LoadBalancer from the external client.

The external client is a namespace on the underlay segment (172.18.0.1, no route into the pod
network). The Services' only backends are on node-2 and node-3, under every Service backend and
both pod networks:

- NodePort on node-1 (externalTrafficPolicy Cluster) is forwarded across the pod network and
  masqueraded to the address of the device it leaves node-1 by, as MASQUERADE picks it: node-1's
  own address over direct routes (host-gw), flannel.1's - node-1's subnet's .0 - into VXLAN;
- Local: node-1, without a local endpoint, does not answer (iptables and eBPF drop; IPVS forwards
  unmasqueraded, as kube-proxy's IPVS mode does, and the reply never makes sense to the client);
  node-2 does, from its own backend, and the backend sees the client's own address;
- a LoadBalancer IP is answered (ARP) by exactly one node, the one MetalLB's L2 election picks (with
  Local policy, among the nodes with an endpoint), and the client's neighbour entry names it; when
  that node loses its endpoint, the IP moves to the other node, which says so by gratuitous ARP.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from podnet.cluster.topology import ClusterConfig
from podnet.cluster_lab import run_cluster
from podnet.core.services.registry import BACKENDS

from .external_cluster import (ARP_PROBE, LB_IP, LB_LOCAL_IP, NODE_PORT, NODE_PORT_LOCAL, connect, manifests,
                               metallb_winner)

pytestmark = pytest.mark.root

NODE_IP = {"node-1": "172.18.0.11", "node-2": "172.18.0.12", "node-3": "172.18.0.13"}


@pytest.fixture(scope="module", params=["direct", "vxlan"])
def three(request, tmp_path_factory):
    config = ClusterConfig(network=request.param, prefix="pn-mx-", min_sync_period_s=0.2,
                           state_dir=str(tmp_path_factory.mktemp("state")))
    with run_cluster(manifests(), config) as c:
        yield c


def _masquerade_source(c, node: str) -> str:
    """Where a NodePort connection to `node` comes from at a backend on another node."""
    if c.config.network == "direct":
        return NODE_IP[node]
    return c.cluster.node(node).subnet.replace(".0/24", ".0")   # flannel.1's address


def _uplink_mac(c, node: str) -> str:
    return c.plan.node(node).uplink_mac


def _answering(c, ip: str) -> list[str]:
    """The nodes whose datapath answers ARP for `ip` now."""
    from podnet.core.packet import ip_int
    return [n for n in ("node-1", "node-2", "node-3")
            if c.call(lambda n=n: ip_int(ip) in c.cluster.node(n).lab.datapath.uplink_arp.addresses)]


def _neighbour(c, ip: str) -> str:
    out = c.exec_external(["ip", "-4", "neigh", "show", ip]).stdout.decode().split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else ""


def test_the_external_client_is_a_host_on_the_underlay_with_no_way_into_the_pod_network(three):
    ext = three.external
    assert (ext.ip, ext.netns) == ("172.18.0.1", "pn-mx-external")
    routes = three.exec_external(["ip", "-4", "route"]).stdout.decode().splitlines()
    assert [r.strip() for r in routes] == ["172.18.0.0/24 dev eth0 proto kernel scope link src 172.18.0.1"]
    addr = three.exec_external(["ip", "-o", "link", "show", "eth0"]).stdout.decode()
    assert ext.mac in addr
    pod_ip = three.pod("web-2").ip
    refused = three.exec_external(["ip", "route", "get", pod_ip])
    assert refused.returncode != 0 and "unreachable" in refused.stderr.decode()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_nodeport_on_node1_reaches_the_backends_on_node2_and_node3_masqueraded(three, backend):
    three.set_backend(backend)
    before = three.statistics("node-1")
    answers = [line.split() for line in connect(three, NODE_IP["node-1"], NODE_PORT, 16)]
    assert all(len(a) == 2 and a[0] != "failed" for a in answers), answers
    assert set(Counter(name for name, _ in answers)) == {"web-2", "web-3"}
    # externalTrafficPolicy Cluster: MASQUERADE, to the address of the device towards the backend
    assert {peer for _, peer in answers} == {_masquerade_source(three, "node-1")}
    after = three.statistics("node-1")
    assert after.decisions - before.decisions == 16   # node-1's backend decided every connection


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_local_policy_answers_only_on_a_node_with_a_local_endpoint_and_keeps_the_client_address(three, backend):
    three.set_backend(backend)
    before = three.statistics("node-1")
    refused = connect(three, NODE_IP["node-1"], NODE_PORT_LOCAL, 2, timeout_s=1.0)
    assert all(line.startswith("failed") for line in refused), refused
    after = three.statistics("node-1")
    if backend == "ipvs":
        # kube-proxy's IPVS mode has no such drop: without a local endpoint the node port's real
        # servers are the Cluster ones (kubernetes PR 97081, for local pods' sake), not masqueraded;
        # the backend's reply carries its own pod address, and the client has no use for it
        assert after.decisions - before.decisions == 2 and after.drops == before.drops
    else:   # iptables: KUBE-EXT's "has no local endpoints" DROP; Cilium: no backend in the EXT scope
        assert sum(after.drops.values()) > sum(before.drops.values())
    answers = [line.split() for line in connect(three, NODE_IP["node-2"], NODE_PORT_LOCAL, 6)]
    assert answers == [["web-2", three.external.ip]] * 6


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_load_balancer_ip_is_answered_by_the_one_node_metallb_elects(three, backend):
    three.set_backend(backend)
    owner = metallb_winner(("node-1", "node-2", "node-3"), LB_IP)
    assert owner == "node-1"
    assert _answering(three, LB_IP) == [owner]
    # on the wire: one ARP request, answers from the owner's uplink MAC only
    probe = three.exec_external(["python3", "-c", ARP_PROBE, LB_IP, three.external.ip, "1.0"])
    assert set(json.loads(probe.stdout)) == {_uplink_mac(three, owner)}, probe.stderr.decode()
    three.exec_external(["ip", "neigh", "flush", "dev", "eth0"])
    answers = [line.split() for line in connect(three, LB_IP, 80, 8)]
    assert set(Counter(name for name, _ in answers)) == {"web-2", "web-3"}
    assert {peer for _, peer in answers} == {_masquerade_source(three, owner)}
    assert _neighbour(three, LB_IP) == _uplink_mac(three, owner)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_local_policy_load_balancer_ip_is_elected_among_the_nodes_with_endpoints(three, backend):
    three.set_backend(backend)
    owner = metallb_winner(("node-2", "node-3"), LB_LOCAL_IP)
    assert metallb_winner(("node-1", "node-2", "node-3"), LB_LOCAL_IP) == "node-1" != owner
    assert _answering(three, LB_LOCAL_IP) == [owner]
    three.exec_external(["ip", "neigh", "flush", "dev", "eth0"])
    answers = [line.split() for line in connect(three, LB_LOCAL_IP, 80, 6)]
    assert answers == [[f"web-{owner[-1]}", three.external.ip]] * 6
    assert _neighbour(three, LB_LOCAL_IP) == _uplink_mac(three, owner)


def test_when_the_owner_loses_its_endpoint_the_ip_moves_and_says_so_by_gratuitous_arp(three):
    """Last in the module: it deletes a pod."""
    owner = metallb_winner(("node-2", "node-3"), LB_LOCAL_IP)
    other = ({"node-2", "node-3"} - {owner}).pop()
    connect(three, LB_LOCAL_IP, 80, 1)
    assert _neighbour(three, LB_LOCAL_IP) == _uplink_mac(three, owner)
    three._run(three.cluster.node(owner).lab.delete_pod, f"web-{owner[-1]}")
    deadline = time.monotonic() + 30
    while _answering(three, LB_LOCAL_IP) != [other]:
        assert time.monotonic() < deadline, _answering(three, LB_LOCAL_IP)
        time.sleep(0.1)
    # the client sent nothing: the new owner's gratuitous ARP moved its neighbour entry
    while _neighbour(three, LB_LOCAL_IP) != _uplink_mac(three, other):
        assert time.monotonic() < deadline, _neighbour(three, LB_LOCAL_IP)
        time.sleep(0.1)
    answers = [line.split() for line in connect(three, LB_LOCAL_IP, 80, 4)]
    assert answers == [[f"web-{other[-1]}", three.external.ip]] * 4
