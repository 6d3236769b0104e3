"""podnet.testing.kernel_flannel makes a kernel node's flannel.1 as flanneld does: the kernel is
asked what it holds (ip -d link/route, ip neigh, bridge fdb) (root)."""

from __future__ import annotations

import subprocess

import pytest

from podnet.core.overlay import FlannelNode, Lease
from podnet.testing import kernel_flannel
from podnet.testing.kernel_flannel import create_flannel_device, program_like_flanneld

from plumbing import add_address

pytestmark = pytest.mark.root

OWN = Lease("10.244.1.0/24", "192.0.2.1", "0a:58:0a:f4:01:00")
PEERS = (Lease("10.244.2.0/24", "192.0.2.2", "0a:58:0a:f4:02:00"),
         Lease("10.244.3.0/24", "192.0.2.3", "0a:58:0a:f4:03:00"))


def _lines(text: str) -> list[str]:
    return sorted(line.strip() for line in text.splitlines())


def _kernel_node(plumbing) -> tuple[str, str]:
    """A namespace with an up veth `eth0` holding OWN's public address."""
    k, other = plumbing.add_netns("kn"), plumbing.add_netns("un")
    eth0, _ = plumbing.add_veth(k, "eth", other, "peer")
    add_address(k, eth0, OWN.public_ip, 24)
    return k, eth0


@pytest.mark.parametrize("port", [4789, None], ids=["dstport-4789", "kernel-default-port"])
def test_the_device_and_entries_are_flanneld_s(plumbing, ip, port):
    k, eth0 = _kernel_node(plumbing)
    node = FlannelNode(OWN, device=plumbing.lab.name("vx"), underlay_mtu=1400)
    node.add_lease(PEERS[0])
    create_flannel_device(k, node, eth0, port=port)
    vx = node.device
    details = ip("-n", k, "-d", "link", "show", vx)
    for word in ("mtu 1350 ", " state UNKNOWN ", f"link/ether {OWN.vtep_mac} ", f"vxlan id {OWN.vni} ",
                 f"local {OWN.public_ip} dev {eth0} ", f"dstport {port or 8472} ", " nolearning "):
        assert word in details, (word, details)
    assert f"inet {OWN.gateway}/32 " in ip("-n", k, "addr", "show", vx)

    # a lease that appears later: programming again adds its entries and keeps the first's
    node.add_lease(PEERS[1])
    program_like_flanneld(k, node)
    assert _lines(ip("-n", k, "-d", "route", "show", "dev", vx)) == [
        f"unicast {lease.subnet} via {lease.gateway} proto boot scope global onlink" for lease in PEERS]
    assert _lines(ip("-n", k, "neigh", "show", "dev", vx)) == [
        f"{lease.gateway} lladdr {lease.vtep_mac} PERMANENT" for lease in PEERS]
    fdb = subprocess.run(["bridge", "-n", k, "fdb", "show", "dev", vx], capture_output=True, text=True,
                         check=True).stdout
    assert _lines(fdb) == [f"{lease.vtep_mac} dst {lease.public_ip} self permanent" for lease in PEERS]


def test_a_failure_leaves_no_device(plumbing, ip, monkeypatch):
    k, eth0 = _kernel_node(plumbing)
    node = FlannelNode(OWN, device=plumbing.lab.name("vx"))
    node.add_lease(PEERS[0])
    with pytest.raises(LookupError, match="nosuch0"):
        create_flannel_device(k, node, "nosuch0")
    assert f" {node.device}:" not in ip("-n", k, "-o", "link")

    def fail(*_args):
        raise RuntimeError("half-way")

    monkeypatch.setattr(kernel_flannel, "_program", fail)   # after the link exists
    with pytest.raises(RuntimeError, match="half-way"):
        create_flannel_device(k, node, eth0)
    assert f" {node.device}:" not in ip("-n", k, "-o", "link")
