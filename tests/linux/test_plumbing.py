"""The kernel interop tests' plumbing (plumbing.py) leaves nothing behind, even when a test fails
half-way (root)."""

from __future__ import annotations

import os

import pytest

from podnet.core.overlay import FlannelNode, Lease
from podnet.linux.netns import list_netns

from plumbing import Plumbing, add_address, link_mac

pytestmark = pytest.mark.root

LEASE = Lease("10.244.1.0/24", "192.0.2.1", "0a:58:0a:f4:01:00")


def test_everything_it_made_goes_when_the_test_fails(lab, ip):
    with pytest.raises(RuntimeError, match="half-way"), Plumbing(lab) as plumbing:
        bridge = plumbing.add_bridge("br")
        uplink = plumbing.open_bridge_tap(bridge, "uplink")
        k = plumbing.add_bridge_host(bridge, "kn")
        pp, pod = plumbing.open_pod("pp", "10.244.2.2")
        kp = plumbing.add_netns("kp")
        kh, ke = plumbing.add_veth(k, "kh", kp, "ke")
        add_address(k, "eth0", LEASE.public_ip, 24)
        vx = FlannelNode(LEASE, device=lab.name("vx"))
        plumbing.add_flannel_vxlan(k, vx, "eth0", port=None)
        assert list_netns(lab.prefix) == sorted([bridge.netns, k, pp, kp])
        ports = ip("-n", bridge.netns, "-o", "link", "show", "master", bridge.bridge).splitlines()
        assert len(ports) == 2 and all("state UP" in line or "state UNKNOWN" in line for line in ports), ports
        assert link_mac(pp, "eth0") == pod.mac
        assert f"{kh}@" in ip("-n", k, "link") and f"{ke}@" in ip("-n", kp, "link")
        assert f"{LEASE.gateway}/32" in ip("-n", k, "addr", "show", vx.device)
        journal = plumbing.resources.journal_path
        assert os.path.exists(journal)
        raise RuntimeError("half-way")
    assert uplink.closed and pod.closed
    assert lab.leftovers() == [] and not os.path.exists(journal)
