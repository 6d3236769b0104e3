"""A kernel node joins a podnet cluster's VXLAN network, and tshark reads the underlay as VXLAN.

The kernel node is a namespace on the cluster's underlay bridge (a veth) holding a Linux `vxlan`
device set up as flanneld sets up flannel.1: its lease is written to the store, so the podnet nodes
route its subnet through their tunnels; for each podnet node's lease in the store it gets the
neighbour, FDB entry and route flanneld would add. Pings go both ways and the kernel opens TCP
connections to a podnet pod, which sees the kernel pod's own address. Meanwhile an AF_PACKET
capture of the bridge (podnet's UnderlayCapture) writes a pcap that tshark decodes as VXLAN.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from podnet.cluster.topology import ClusterConfig
from podnet.cluster_lab import run_cluster
from podnet.core.overlay import FlannelNode, Lease
from podnet.linux.netns import open_iproute, run_in_netns
from podnet.linux.resources import Resources
from podnet.linux.underlay import UnderlayCapture, add_veth_host
from podnet.store.flannel import LeaseAttrs, acquire_subnet_lease, list_subnet_leases
from podnet.testing.kernel_flannel import create_flannel_device

from .cluster_pods import ASK, cluster

pytestmark = pytest.mark.root

K_IP, K_VTEP_MAC, K_SUBNET, K_POD = "172.18.0.20", "0e:00:ac:12:00:14", "10.244.9.0/24", "10.244.9.1"


@pytest.fixture
def with_kernel_node(tmp_path):
    config = ClusterConfig(network="vxlan", prefix="pn-mk-", state_dir=str(tmp_path / "state"))
    with run_cluster(cluster(web_replicas_on=("node-2",)), config) as c, \
            Resources(prefix=config.prefix, state_dir=str(tmp_path / "kstate")) as res:
        k = f"{config.prefix}kernel-node"
        add_veth_host(c.cluster.underlay, res, k)
        store = c.cluster.store
        lease = acquire_subnet_lease(store, LeaseAttrs.vxlan(K_IP, K_VTEP_MAC), now=time.monotonic(),
                                     previous_subnet=K_SUBNET)
        own = Lease(str(lease.subnet), K_IP, K_VTEP_MAC)
        flannel = FlannelNode(own)
        for peer in list_subnet_leases(store)[0]:
            if peer.attrs.public_ip != K_IP:
                flannel.add_lease(Lease(str(peer.subnet), peer.attrs.public_ip, peer.attrs.vtep_mac))
        with open_iproute(k) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=K_IP, prefixlen=24)
            # the kernel node's "pod": an address of its own subnet (no dummy module here: on lo)
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=K_POD, prefixlen=32)
        # flannel.1 and its entries, on the port the podnet nodes' VTEPs use
        create_flannel_device(k, flannel, "eth0", port=config.vxlan_port)
        # the podnet nodes saw the kernel node's lease
        deadline = time.monotonic() + 10
        while not all(K_SUBNET in c.call(lambda n=n: set(n.peers)) for n in c.cluster.nodes.values()):
            assert time.monotonic() < deadline, "podnet nodes did not program the kernel node's lease"
            time.sleep(0.05)
        yield c, k, flannel


def _run(ns: str, argv: list[str]) -> str:
    return run_in_netns(ns, subprocess.run, argv, capture_output=True, text=True, timeout=60).stdout


def test_a_kernel_vxlan_node_and_podnet_nodes_route_to_each_other(with_kernel_node, tmp_path):
    c, k, flannel = with_kernel_node
    assert [str(r) for r in flannel.routes()] == [
        "10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink", "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink",
        "10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink"]
    # the kernel node holds them as flanneld's netlink library writes them: proto boot
    held = _run(k, ["ip", "-d", "route", "show", "dev", "flannel.1"]).splitlines()
    assert [line.strip() for line in held] == [f"unicast {r.dst} via {r.via} proto boot scope global onlink"
                                               for r in flannel.routes()]
    assert any("10.244.9.0/24 via 10.244.9.0 dev flannel.1 onlink" == line
               for line in c.show("node-1")["ip route show dev flannel.1"])
    pcap = tmp_path / "underlay.pcap"
    client_ip, web_ip = c.pod("client").ip, c.pod("web-2").ip
    with UnderlayCapture(c.cluster.underlay, str(pcap)) as capture:
        to_kernel = c.exec("client", ["ping", "-c", "3", "-i", "0.2", "-W", "3", K_POD]).stdout.decode()
        to_podnet = _run(k, ["ping", "-c", "3", "-i", "0.2", "-W", "3", "-I", K_POD, client_ip])
        # TCP from the kernel node's pod address to a podnet pod on another node: the pod sees it
        asked = _run(k, [sys.executable, "-c", ASK.replace("create_connection((", "create_connection(source_address=("
                                                                                  f"'{K_POD}', 0), address=("),
                         web_ip, "8080", "3"])
        time.sleep(0.2)
    assert " 3 received" in to_kernel, to_kernel
    assert " 3 received" in to_podnet, to_podnet
    assert asked.split("\n")[:3] == [f"web-2 {K_POD}"] * 3, asked
    assert capture.frames > 0
    if shutil.which("tshark") is None:
        pytest.fail("tshark is missing (`make setup` installs it)")
    fields = ["vxlan.vni", "ip.src", "ip.dst", "udp.dstport"]
    done = subprocess.run(["tshark", "-r", str(pcap), "-n", "-d", "udp.port==4789,vxlan", "-Y", "vxlan",
                           "-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,",
                           *[a for f in fields for a in ("-e", f)]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [dict(zip(fields, line.split("|"))) for line in done.stdout.splitlines()]
    pairs = {(r["ip.src"], r["ip.dst"]) for r in rows}
    assert all(r["vxlan.vni"] == "1" and r["udp.dstport"] == "4789" for r in rows)
    node1, node2 = c.cluster.node("node-1").spec.ip, c.cluster.node("node-2").spec.ip
    # (outer, inner source), (outer, inner destination): podnet's encapsulation and the kernel's, both ways
    assert {(f"{node1},{client_ip}", f"{K_IP},{K_POD}"), (f"{K_IP},{K_POD}", f"{node1},{client_ip}"),
            (f"{K_IP},{K_POD}", f"{node2},{web_ip}"), (f"{node2},{web_ip}", f"{K_IP},{K_POD}")} == pairs
