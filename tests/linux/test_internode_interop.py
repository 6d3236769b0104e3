"""A podnet node and a kernel node route pod traffic to each other over a shared underlay (root).

Namespaces, all `pn-<token>-...`, journalled before they are made and removed at the end:

    kp (kernel pod 10.244.1.2) ─veth─ K (kernel node 192.0.2.1) ─veth─┐
                                                                     U: bridge (the underlay)
    pp (podnet pod 10.244.2.2) ─TAP─ podnet Datapath ─uplink TAP─────┘   (podnet node 192.0.2.2)

The Datapath is served by podnet's runtime (runtime/serve.py) on the two TAPs' fds. It has no
address in any namespace: it answers ARP for its node address itself and resolves K's MAC with its
own neighbour table. Two ways to join the pod networks:

- direct: K routes 10.244.2.0/24 via 192.0.2.2; podnet routes 10.244.1.0/24 via 192.0.2.1;
- vxlan: K holds a vxlan device set up as flanneld sets up flannel.1, with the neighbour, FDB and
  route entries FlannelNode derives for podnet's lease, on the IANA port or the kernel's default
  8472; podnet holds the same Flannel state for K's lease and its own VTEP.

Pings go both ways, and a TCP stream each way (TSO super-frames from podnet's pod, which VXLAN must
cut in software; the kernel's checksum offloads on the way back) arrives intact with the client
pod's own address as its source. Nothing is sent outside these namespaces.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import trio

from podnet.core import packet as pk
from podnet.core.datapath import Datapath, PortKind
from podnet.core.overlay import FlannelNode, Lease, Vtep
from podnet.linux.netns import popen_in_netns, set_sysctl
from podnet.runtime.ports import FdPort
from podnet.runtime.serve import Node

from plumbing import RTPROT_BOOT, add_address, add_route, set_up

pytestmark = pytest.mark.root

K_LEASE = Lease("10.244.1.0/24", "192.0.2.1", "0a:58:0a:f4:01:00")
P_LEASE = Lease("10.244.2.0/24", "192.0.2.2", "0a:58:0a:f4:02:00")
K_POD, P_POD = "10.244.1.2", "10.244.2.2"
P_UPLINK_MAC = "02:00:c0:00:02:02"

SERVER = """
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001))
s.listen(1)
s.settimeout(30)
print("listening", flush=True)
c, peer = s.accept()
h, n = hashlib.sha256(), 0
while data := c.recv(65536):
    h.update(data)
    n += len(data)
c.sendall(h.hexdigest().encode())
c.close()
print(peer[0], n, h.hexdigest())
"""
CLIENT = """
import hashlib, random, socket, sys
data = random.Random(7).randbytes(int(sys.argv[2]))
c = socket.create_connection((sys.argv[1], 5001), timeout=30)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
print(c.recv(100).decode() == hashlib.sha256(data).hexdigest())
"""


@dataclass
class Nodes:
    mode: str
    k: str
    kp: str
    pp: str
    vk: str
    dp: Datapath
    ports: dict


@pytest.fixture(params=["direct", "vxlan-4789", "vxlan-8472"])
def nodes(request, plumbing):
    mode = request.param
    port = int(mode.split("-")[1]) if mode.startswith("vxlan") else None
    # the underlay: a bridge in U; K on a veth, podnet on a TAP it holds
    underlay = plumbing.add_bridge("ul")
    k, vk = plumbing.add_bridge_host(underlay, "kn"), "eth0"
    set_sysctl(k, "net/ipv4/ip_forward", 1)
    uplink = plumbing.open_bridge_tap(underlay, "uplink", mtu=1500)
    mtu = 1500 if port is None else 1450          # Flannel gives pods the tunnel's MTU
    pp, pod = plumbing.open_pod("pp", P_POD, mtu=mtu)
    kp = plumbing.add_netns("kp")
    kh, ke = plumbing.add_veth(k, "kh", kp, "ke")
    add_address(k, vk, K_LEASE.public_ip, 24)
    add_address(k, kh, "10.244.1.1", 24)
    if port is None:
        add_route(k, P_LEASE.subnet, P_LEASE.public_ip, vk)
    else:
        kernel = FlannelNode(K_LEASE, device=plumbing.lab.name("vx"))
        kernel.add_lease(P_LEASE)
        plumbing.add_flannel_vxlan(k, kernel, vk, port=None if port == 8472 else port)
    add_address(kp, ke, K_POD, 24)
    set_up(kp, "lo")
    add_route(kp, "0.0.0.0/0", "10.244.1.1", ke, proto=RTPROT_BOOT)

    dp = Datapath(node_cidr=P_LEASE.subnet, node_ip=P_LEASE.public_ip)
    up = dp.add_uplink("uplink", P_UPLINK_MAC, cidr="192.0.2.0/24")
    pod_port = dp.add_port("pod", PortKind.POD, pod.mac, P_POD)
    if port is None:
        dp.add_route(K_LEASE.subnet, up, via=K_LEASE.public_ip)
    else:
        vtep = Vtep(local_ip=P_LEASE.public_ip, mac=P_LEASE.vtep_mac, underlay_mac=P_UPLINK_MAC, port=port)
        dp.add_tunnel(vtep, FlannelNode(P_LEASE))
        dp.internode.add_lease(K_LEASE)
    ports = {up: FdPort(uplink.fd, vnet_hdr=True, name="uplink"),
             pod_port: FdPort(pod.fd, vnet_hdr=True, name="pod")}
    return Nodes(mode, k, kp, pp, vk, dp, ports)


def _unexpected(drops: dict[str, int]) -> dict[str, int]:
    """Drops other than the underlay's multicast (IGMP reports of the namespaces' interfaces, to
    01:00:5e:...), which podnet does not take part in and counts as not addressed to it."""
    return {k: v for k, v in drops.items() if k != "not_for_gateway"}


def _serving(n: Nodes, work):
    """Run podnet's serve loop on the TAPs while `work()` runs in a thread; returns its result."""
    async def main():
        node = Node(n.dp)
        for port_id, port in n.ports.items():
            node.attach(port_id, port)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve)
            try:
                return await trio.to_thread.run_sync(work)
            finally:
                nursery.cancel_scope.cancel()
    return trio.run(main)


def _run(ns: str, argv: list[str], timeout_s: float = 60.0) -> str:
    proc = popen_in_netns(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def _ping(ns: str, target: str) -> str:
    return _run(ns, ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "3", target])


def _stream(server_ns: str, server_ip: str, client_ns: str, size: int) -> tuple[str, str]:
    server = popen_in_netns(server_ns, [sys.executable, "-c", SERVER, server_ip], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        client = _run(client_ns, [sys.executable, "-c", CLIENT, server_ip, str(size)])
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return out.strip(), client.strip()


def test_pods_ping_each_other_both_ways_and_the_kernel_learned_the_podnet_node(nodes, ip):
    n = nodes
    to_kernel, to_podnet = _serving(n, lambda: (_ping(n.pp, K_POD), _ping(n.kp, P_POD)))
    assert " 3 received" in to_kernel, to_kernel
    assert " 3 received" in to_podnet, to_podnet
    # podnet resolved K's address with ARP, and K resolved podnet's node address to its uplink MAC
    k_mac = ip("-n", n.k, "-br", "link", "show", "dev", n.vk).split()[2]
    assert n.dp.internode.neighbors.get(pk.ip_int(K_LEASE.public_ip)).mac == pk.mac_bytes(k_mac)
    assert f"lladdr {P_UPLINK_MAC}" in ip("-n", n.k, "neigh", "show", P_LEASE.public_ip)
    stats = n.dp.statistics()
    assert stats.neighbors.resolved >= 1 and not _unexpected(stats.drops)
    if n.mode.startswith("vxlan"):
        assert stats.tunnel.rx_packets >= 3 and stats.tunnel.tx_packets >= 3 and stats.tunnel.drops == {}


def test_tcp_streams_both_ways_arrive_intact_from_the_client_pods_own_address(nodes):
    n = nodes
    size = 3_000_000
    (to_kernel, client_p), (to_podnet, client_k) = _serving(
        n, lambda: (_stream(n.kp, K_POD, n.pp, size), _stream(n.pp, P_POD, n.kp, size)))
    assert client_p == "True" and client_k == "True", (client_p, client_k)
    assert to_kernel.split()[:2] == [P_POD, str(size)], to_kernel         # the kernel pod saw podnet's pod
    assert to_podnet.split()[:2] == [K_POD, str(size)], to_podnet
    stats = n.dp.statistics()
    assert stats.fast_path_packets > 100
    assert not _unexpected(stats.drops), stats.drops
