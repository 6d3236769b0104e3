"""Three nodes on one machine, in one process (the embedded store), over direct routing and VXLAN.

Each node is its own Datapath with its own pods and uplink TAP on the underlay bridge; they learn
each other's subnets, Services and endpoints from the store. A pod on node-1 fetches 20 MB from a
pod on node-3 (bytes verified, its own address seen by the server), and reaches a Service whose
backends are on node-2 and node-3 under every Service backend.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import sys
from collections import Counter

import pytest

from podnet.cluster.topology import ClusterConfig
from podnet.cluster_lab import run_cluster
from podnet.core.services.registry import BACKENDS

from .cluster_pods import ASK, cluster
from .pods import BLOB_BYTES, BLOB_SEED, CLIENT

pytestmark = pytest.mark.root

EXPECTED = hashlib.sha256(random.Random(BLOB_SEED).randbytes(BLOB_BYTES)).hexdigest()


@pytest.fixture(scope="module", params=["direct", "vxlan"])
def three(request, tmp_path_factory):
    config = ClusterConfig(network=request.param, prefix="pn-mn-", state_dir=str(tmp_path_factory.mktemp("state")))
    with run_cluster(cluster(), config) as c:
        yield c


def _port(stats, name):
    return next(p for p in stats.ports if p.name == name)


def test_every_node_runs_its_own_pods_in_its_own_subnet(three):
    rows = {r["name"]: r for r in three.status()}
    assert {name: r["node"] for name, r in rows.items()} == {
        "client": "node-1", "web-2": "node-2", "web-3": "node-3", "blob": "node-3"}
    for name, row in rows.items():
        node = three.cluster.node(row["node"])
        assert ipaddress.IPv4Address(row["ip"]) in ipaddress.IPv4Network(node.subnet)
        assert row["ready"] == "1/1"
    assert [three.cluster.node(n).subnet for n in ("node-1", "node-2", "node-3")] == [
        "10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]


def test_20mb_from_node3_to_node1_bytes_verified_source_preserved(three):
    before = three.statistics("node-3")
    client_ip, blob_ip = three.pod("client").ip, three.pod("blob").ip
    result = three.exec("client", [sys.executable, "-c", CLIENT, blob_ip], timeout_s=120)
    assert result.returncode == 0, result.stderr.decode()
    peer, length, digest = result.stdout.decode().split()
    assert (peer, int(length), digest) == (f"peer={client_ip}", BLOB_BYTES, EXPECTED)
    after = three.statistics("node-3")
    # the bytes left node-3 on its uplink, in VXLAN datagrams in vxlan mode
    sent = _port(after, "uplink").tx_bytes - _port(before, "uplink").tx_bytes
    assert sent > BLOB_BYTES
    if three.cluster.config.network == "vxlan":
        assert after.tunnel.tx_packets - before.tunnel.tx_packets > BLOB_BYTES // 1450
        if three.call(lambda: three.cluster.node("node-3").lab.datapath.internode.tunnel.udp_tunnel_gso):
            # GSO over UDP tunnels: whole super-frames crossed the uplink, far fewer than the segments
            frames = _port(after, "uplink").tx_packets - _port(before, "uplink").tx_packets
            assert frames < BLOB_BYTES // 1450 // 3, frames
        assert after.tunnel.drops == {}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_service_on_node1_reaches_backends_on_node2_and_node3(three, backend):
    three.set_backend(backend)
    cluster_ip = next(s["cluster_ip"] for s in three.services_status() if s["name"] == "web")
    before = three.statistics("node-1")
    result = three.exec("client", [sys.executable, "-c", ASK, cluster_ip, "80", "24"], timeout_s=60)
    assert result.returncode == 0, result.stderr.decode()
    answers = [line.split() for line in result.stdout.decode().splitlines()]
    # both backends answered, and each saw the client pod's own address (no masquerade)
    assert set(Counter(name for name, _ in answers)) == {"web-2", "web-3"}
    assert {peer for _, peer in answers} == {three.pod("client").ip}
    after = three.statistics("node-1")
    assert after.decisions - before.decisions == 24   # node-1's backend decided every connection


def test_a_trace_follows_the_first_packet_to_a_service_across_nodes(three):
    """podnet trace: node-1 DNATs to a backend on another node; that node delivers it unchanged."""
    from podnet.packet_trace import trace_from_pod

    cluster_ip = next(s["cluster_ip"] for s in three.services_status() if s["name"] == "web")
    three.exec("client", ["ping", "-c1", "-W2", three.pod("web-2").ip])   # neighbours resolved, as after traffic
    three.exec("client", ["ping", "-c1", "-W2", three.pod("web-3").ip])
    before = three.statistics("node-1")
    hops = three.call(lambda: trace_from_pod(three.cluster, "client", cluster_ip, dport=80))
    assert [h.node for h in hops][0] == "node-1" and len(hops) == 2, [h.outputs for h in hops]
    first, second = hops
    stages = [step.stage for step in first.trace.steps]
    assert "nat" in stages and stages.index("route") < stages.index("forward")
    if three.config.network == "vxlan":
        assert "vxlan" in stages and second.trace.steps[1].stage == "vxlan"
    backend_ip = next(step.detail.split()[1].split(":")[0] for step in first.trace.steps if step.stage == "nat")
    owner = next(r for r in three.status() if r["ip"] == backend_ip)
    assert second.node == owner["node"] and second.node in ("node-2", "node-3")
    # the next node sees the DNATed packet from the client's own address, and delivers it
    inner = next(step for step in second.trace.steps if step.stage == "ipv4")
    assert inner.detail.startswith(f"{three.pod('client').ip} > {backend_ip} ")
    assert len(second.outputs) == 1 and second.outputs[0].startswith(
        f"delivered to {owner['namespace']}/{owner['name']} (eth0, {three.pod(owner['name']).mac}): IP ")
    # a trace changes nothing
    after = three.statistics("node-1")
    assert (after.decisions, after.flows, after.slow_path_packets) == (before.decisions, before.flows,
                                                                       before.slow_path_packets)


def test_the_nodes_show_what_flannel_would_program(three):
    show = three.show("node-1")
    if three.cluster.config.network == "vxlan":
        assert show["ip route show dev flannel.1"] == [
            "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink", "10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink"]
        assert show["bridge fdb show dev flannel.1"] == [
            "0e:00:ac:12:00:0c dev flannel.1 dst 172.18.0.12 self permanent",
            "0e:00:ac:12:00:0d dev flannel.1 dst 172.18.0.13 self permanent"]
    else:
        assert show["ip route"] == ["10.244.2.0/24 via 172.18.0.12 dev uplink",
                                    "10.244.3.0/24 via 172.18.0.13 dev uplink"]


def test_podnet_up_with_nodes_status_exec_and_down(state_dir):
    import json
    from pathlib import Path

    from .clitools import netns_with, podnet
    cluster_yaml = str(Path(__file__).resolve().parents[2] / "examples" / "demo" / "cluster.yaml")
    podnet(state_dir, "up", "-d", "-f", cluster_yaml, "--network", "direct", "--prefix", "pn-mc-")
    try:
        status = podnet(state_dir, "status").stdout.splitlines()
        assert [line.split()[1::5] for line in status[1:]] == [["client", "node-1"], ["web-2", "node-2"],
                                                                ["web-3", "node-3"]]
        got = podnet(state_dir, "exec", "-n", "demo", "client", "--", "curl", "-sS", "-m", "5",
                     "http://10.244.3.2:8080/").stdout
        assert got.strip() == "web-3 (from 10.244.1.2)"
        trace = podnet(state_dir, "trace", "-n", "demo", "client", "10.244.3.2:8080").stdout
        assert trace.startswith("node-1: IP 10.244.1.2.40000 > 10.244.3.2.8080: tcp 0  (in demo/client)")
        assert "\nnode-3: " in trace and "\n  => delivered to demo/web-3 (eth0, " in trace
        bad = podnet(state_dir, "trace", "nosuch", "10.244.3.2", check=False)
        assert bad.returncode != 0 and "no pod 'nosuch'" in bad.stderr
        bad = podnet(state_dir, "trace", "-n", "demo", "client", "10.244.3", check=False)
        assert bad.returncode != 0 and "is not an IPv4 address" in bad.stderr

        # --node: web-2 -> web-3 crosses node-2 and node-3; node-1 (the default) sees none of it
        got = podnet(state_dir, "exec", "-n", "demo", "web-2", "--", "curl", "-sS", "-m", "5", "--local-port", "45678",
                     "http://10.244.3.2:8080/").stdout
        assert got.strip() == "web-3 (from 10.244.2.2)"
        flow = "src=10.244.2.2 dst=10.244.3.2 sport=45678 dport=8080"
        listed = [podnet(state_dir, "conntrack", "-L", *node).stdout for node in ([], ["--node", "node-2"])]
        assert flow not in listed[0] and flow in listed[1], listed
        first, second = (json.loads(podnet(state_dir, "stats", "-o", "json", *node).stdout)
                         for node in ([], ["--node", "node-2"]))
        assert (first["node"], second["node"]) == ("node-1", "node-2") and first["pid"] == second["pid"]
        assert [p["name"] for p in first["ports"]] == ["demo/client", "uplink"]
        web2 = next(p for p in second["ports"] if p["name"] == "demo/web-2")
        assert web2["rx_packets"] >= 5 and web2["tx_packets"] >= 5   # SYN, ACK, request, ACK, FIN; the replies
        unknown = podnet(state_dir, "stats", "--node", "node-9", check=False)
        assert unknown.returncode == 1 and "no node 'node-9' (nodes: node-1, node-2, node-3)" in unknown.stderr
        # one node's backend switched: the others keep theirs, and each tool asks the node it names
        assert "now ipvs on node-2" in podnet(state_dir, "backend", "set", "ipvs", "--node", "node-2").stdout
        assert [podnet(state_dir, "backend", *node).stdout.strip() for node in ([], ["--node", "node-2"])] == [
            "iptables", "ipvs"]
        assert "  -> 10.244.3.2:8080" in podnet(state_dir, "ipvsadm", "-Ln", "--node", "node-2").stdout
        assert "backend is iptables" in podnet(state_dir, "ipvsadm", "-Ln", check=False).stderr
    finally:
        podnet(state_dir, "down")
    assert netns_with("pn-mc-") == []


def test_vxlan_with_and_without_tunnel_gso_carries_the_same_bytes(tmp_path):
    """--no-tunnel-gso: no uplink takes whole super-frames, every lease says so, and the 20 MB still
    arrive intact through software segmentation (segments counted on the tunnel)."""
    config = ClusterConfig(network="vxlan", prefix="pn-ng-", state_dir=str(tmp_path / "state"), udp_tunnel_gso=False)
    with run_cluster(cluster(web_replicas_on=("node-2",)), config) as c:
        for name in ("node-1", "node-2", "node-3"):
            tunnel = c.call(lambda: c.cluster.node(name).lab.datapath.internode.tunnel)
            assert tunnel.udp_tunnel_gso is False
        before = c.statistics("node-3")
        blob = c.pod("blob")
        result = c.exec("client", [sys.executable, "-c", CLIENT, blob.ip], timeout_s=120)
        assert result.returncode == 0, result.stderr.decode()
        peer, length, digest = result.stdout.decode().split()
        assert (peer, int(length), digest) == (f"peer={c.pod('client').ip}", BLOB_BYTES, EXPECTED)
        after = c.statistics("node-3")
        # every segment of 1450 bytes or less was encapsulated and written on its own
        frames = _port(after, "uplink").tx_packets - _port(before, "uplink").tx_packets
        assert frames > BLOB_BYTES // 1450
